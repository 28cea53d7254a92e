"""The text progress (ui/progress.py) as users see it: on a real terminal (terminal IPython in a
tmux pane, read back from the screen), in a file (a script's stdout redirected), and the status
line's text for runs with any metrics or none."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lepton_magic.run import Run
from lepton_magic.store import Store
from lepton_magic.ui import progress as progress_module
from lepton_magic.ui.progress import TextProgress
from procs import descendants, wait_gone

TMUX_BIN = shutil.which("tmux")

# Stdlib only, so the ranks start light and fast; longer than QUIET_SECONDS, so the status line
# is on screen while most of the rank lines arrive.
STEPS = 12
CELL_LINES = [
    "%%lepton --nodes 2",
    "import time",
    f"for i in range({STEPS}):",
    '    print(f"at step {i}", flush=True)',
    "    time.sleep(0.3)",
]
RANK_LINE = re.compile(r"\[rank [01]\] at step \d+")
SUMMARY_LINE = re.compile(r"✓ run-\d+ succeeded in [0-9.e+]+ s on 2 nodes \(world size 2\)( · bound: i)?")


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll until ``condition()`` is truthy; its value, or a failure that says what never came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    value = condition()
    assert value, f"{what} did not happen within {timeout:g} s"
    return value


def lepton_env(home) -> dict:
    """The environment of a child process with a store of its own."""
    return {**os.environ, "LEPTON_HOME": str(home), "LEPTON_CONFIG": str(home / "no-config.toml")}


# --- a real terminal ---------------------------------------------------------------------------
class TmuxPane:
    """One detached tmux session on a private socket (the user's own tmux is never touched)."""

    def __init__(self, socket_path):
        self.socket = str(socket_path)

    def tmux(self, *args: str) -> str:
        done = subprocess.run([TMUX_BIN, "-S", self.socket, *args], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def start(self, command: list[str], env: dict) -> None:
        # -x/-y fix the screen size: what wraps, and where, does not depend on the caller's terminal.
        # Without $TMUX: run from inside a tmux session, this server is still a new one of its own.
        env = {k: v for k, v in env.items() if k != "TMUX"}
        subprocess.run([TMUX_BIN, "-S", self.socket, "new-session", "-d", "-s", "t", "-x", "120", "-y", "40",
                        *command], env=env, check=True, timeout=30)

    def lines(self) -> list[str]:
        # -J joins wrapped lines, so anything left behind on a row shows up on that row's line;
        # -S - includes what scrolled off. tmux pads rows with spaces, which mean nothing here.
        text = self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")
        return [line.rstrip(" ") for line in text.splitlines()]

    def cursor(self) -> tuple[int, int]:
        x, y = self.tmux("display-message", "-p", "-t", "t", "#{cursor_x} #{cursor_y}").split()
        return int(x), int(y)

    def pane_pid(self) -> int:
        return int(self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}"))

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def kill(self) -> None:
        subprocess.run([TMUX_BIN, "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


def prompts(pane: TmuxPane) -> int:
    return sum(1 for line in pane.lines() if re.match(r"In \[\d+\]:", line))


def still_editing(pane: TmuxPane) -> bool:
    """Whether the cursor rests after a '...:' prompt (IPython still takes the cell's text),
    looked at once the screen has stopped changing after the last key."""
    previous = None
    for _ in range(20):
        now = (pane.cursor(), pane.tmux("capture-pane", "-p", "-t", "t").splitlines())
        if now == previous:
            break
        previous = now
        time.sleep(0.15)
    (x, y), rows = now
    return y < len(rows) and rows[y].lstrip().startswith("...:") and x > 0


def run_cell_on_screen(pane: TmuxPane, lines: list[str]) -> None:
    """Type a cell, then press Enter until IPython runs it (a cell magic ends with a blank line
    or two, depending on the IPython version)."""
    for line in lines:
        pane.type(line)
    for _ in range(4):
        if not still_editing(pane):
            return
        pane.tmux("send-keys", "-t", "t", "Enter")
    raise AssertionError("IPython did not run the cell:\n" + "\n".join(pane.lines()))


@pytest.fixture
def terminal_ipython(tmp_path):
    """Terminal IPython in a 120x40 tmux pane, the extension loaded, its own store."""
    if TMUX_BIN is None:
        pytest.skip("tmux is not installed: scripts/ci_tmux_deps.sh installs Debian's tmux (as root)")
    pane = TmuxPane(tmp_path / "tmux.sock")
    home = tmp_path / "home"
    home.mkdir()
    ipython_pid = None
    try:
        # No autoindent: the cell is typed with its own indentation.
        pane.start([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "--no-confirm-exit",
                    "--HistoryManager.hist_file=:memory:", "--TerminalInteractiveShell.autoindent=False"],
                   env=lepton_env(home))
        ipython_pid = pane.pane_pid()
        wait_for(lambda: prompts(pane) >= 1, 120, "IPython's first prompt")
        pane.type("%load_ext lepton_magic")
        wait_for(lambda: prompts(pane) >= 2, 120, "%load_ext lepton_magic")
        yield pane
    finally:
        agents = descendants(ipython_pid) if ipython_pid else []  # looked up while IPython lives
        pane.kill()
        # The agents see their kernel go (the dead-man switch); the test makes sure they did.
        for pid in wait_gone(agents, 30):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def finished_screen(pane: TmuxPane) -> list[str] | None:
    lines = pane.lines()
    done = any(line.startswith("✓ ") for line in lines) and prompts(pane) >= 3
    return lines if done else None


def test_rank_lines_on_a_terminal_keep_nothing_of_the_status_line(terminal_ipython):
    pane = terminal_ipython
    run_cell_on_screen(pane, CELL_LINES)
    screen = wait_for(lambda: finished_screen(pane), 180, "the run's summary and the next prompt")
    text = "\n".join(screen)
    rank_lines = [line for line in screen if line.startswith("[rank ")]
    # Nothing of an erased status line may trail a rank line (the bug: `at step 10     s`).
    stray = [line for line in rank_lines if not RANK_LINE.fullmatch(line)]
    assert not stray, f"rank lines with leftovers: {stray}\n{text}"
    assert sorted(rank_lines) == sorted(f"[rank {r}] at step {i}" for r in (0, 1) for i in range(STEPS)), text
    summaries = [line for line in screen if line.startswith("✓ ")]
    assert len(summaries) == 1 and SUMMARY_LINE.fullmatch(summaries[0]), text
    assert "⏳" not in text  # the status line is erased before the summary, not left above it


# --- a file --------------------------------------------------------------------------------------
SCRIPT = """\
# What a script user runs: IPython's shell without a terminal, the extension, one %%lepton cell.
import sys
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "lepton_magic")
result = shell.run_cell(sys.argv[1])
sys.exit(0 if result.success else 1)
"""


def test_output_to_a_file_has_one_line_per_event_and_no_redraws(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    log = tmp_path / "train.log"
    home = tmp_path / "home"
    home.mkdir()
    # A short progress interval, so a 3.6 s run prints some progress lines in between.
    env = {**lepton_env(home), "LEPTON_PROGRESS_INTERVAL": "1"}
    cell = "\n".join(CELL_LINES) + "\n"
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, str(script), cell], stdout=out, stderr=subprocess.PIPE,
                              env=env, timeout=240)
    text = log.read_bytes().decode()
    assert done.returncode == 0, f"{text}\n{done.stderr.decode()}"
    assert "\r" not in text and "\x1b" not in text, repr(text)
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"⏳ run-\d+ started · 2 ranks", line)]
    ranks = [i for i, line in enumerate(lines) if line.startswith("[rank ")]
    assert len(starts) == 1 and starts[0] < min(ranks), text
    assert sorted(lines[i] for i in ranks) == sorted(f"[rank {r}] at step {i}" for r in (0, 1)
                                                      for i in range(STEPS)), text
    assert any(re.fullmatch(r"⏳ run-\d+ · running · 2 ranks · [0-9.]+ s", line) for line in lines), text
    assert SUMMARY_LINE.fullmatch(lines[-1]), text


# --- the text, from a store --------------------------------------------------------------------
@pytest.fixture
def store_run(tmp_path):
    """A running 2-rank run recorded in a real store (no nodes: only the text is under test)."""
    store = Store(tmp_path)
    seq, _name = store.add_run("r-1", "demo", pool="p-1", backend="local")
    store.update_run(seq, status="running", started=time.time() - 5, world_size=2)
    return store, Run(store, seq)


def add_points(store, seq, name, steps):
    store.add_metrics(seq, 0, list(steps), [name] * len(steps), [s / 100 for s in steps],
                      [time.time()] * len(steps))


def test_status_line_with_only_an_accuracy(store_run):
    store, run = store_run
    add_points(store, run.seq, "acc", range(5))
    text = TextProgress(run).status_text()
    assert "step 4" in text and "acc 0.04" in text and "loss" not in text


def test_status_line_with_metrics_in_any_order(store_run):
    store, run = store_run
    add_points(store, run.seq, "zeta", range(3))
    add_points(store, run.seq, "acc", range(7))
    text = TextProgress(run).status_text()
    assert "step 6" in text and "acc 0.06" in text and "zeta 0.02" in text


def test_status_line_and_summary_without_metrics(store_run):
    _store, run = store_run
    out = io.StringIO()
    progress = TextProgress(run, out=out)
    assert re.fullmatch(r"⏳ demo · running · 2 ranks · [0-9.]+ s", progress.status_text())
    progress.tick()
    progress.finish()
    last = out.getvalue().splitlines()[-1]
    assert re.fullmatch(r"· demo running in [0-9.]+ s on 0 nodes \(world size 2\)", last), last


def test_summary_alone_prints_nothing_else(store_run):
    # Callers build a TextProgress only for its summary_text(): that must not write anything.
    _store, run = store_run
    out = io.StringIO()
    TextProgress(run, out=out).summary_text()
    assert out.getvalue() == ""


def test_plain_output_prints_progress_lines_at_the_interval(store_run, monkeypatch):
    store, run = store_run
    monkeypatch.setattr(progress_module, "PLAIN_PROGRESS_SECONDS", 0.5)
    out = io.StringIO()  # not a terminal
    progress = TextProgress(run, out=out)
    progress.tick()
    add_points(store, run.seq, "loss", range(3))
    time.sleep(0.6)
    progress.tick()
    progress.tick()  # within the interval: nothing new
    progress.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "⏳ demo started · 2 ranks"
    assert re.fullmatch(r"⏳ demo · running · 2 ranks · step 2 · loss 0.02 · [0-9.]+ s", lines[1])
    assert len(lines) == 3 and lines[2].startswith("· demo running")


def test_terminal_output_erases_the_line_it_redraws(store_run, monkeypatch):
    _store, run = store_run
    monkeypatch.setattr(progress_module, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(progress_module, "MIN_REDRAW_SECONDS", 0.0)
    out = io.StringIO()
    progress = TextProgress(run, out=out, terminal=True)
    progress.tick()
    progress.tick()
    progress.finish()
    text = out.getvalue()
    # Erase to the end of the line, whatever the width of what was there (⏳ takes two columns).
    assert text.count("\r\x1b[K⏳ demo · running") == 2
    assert re.search(r"\r\x1b\[K· demo running in [0-9.]+ s on 0 nodes \(world size 2\)\n$", text), \
        repr(text)
    assert "  \r" not in text  # no padding with spaces


@pytest.fixture
def narrow_pty():
    """A real pseudo-terminal 30 columns wide: (what the program writes to, what the screen gets)."""
    import fcntl
    import struct
    import termios

    screen, program = os.openpty()
    fcntl.ioctl(program, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    out = open(program, "w", encoding="utf-8")
    yield out, screen
    out.close()
    os.close(screen)


def read_available(fd) -> str:
    import select

    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        data += os.read(fd, 65536)
    return data.decode()


def test_status_line_fits_a_narrow_terminal(store_run, narrow_pty, monkeypatch):
    # A line wider than the screen wraps, and the erase reaches only its last row: every
    # redraw would leave a row behind.
    _store, run = store_run
    out, screen = narrow_pty
    monkeypatch.setattr(progress_module, "QUIET_SECONDS", 0.0)
    progress = TextProgress(run, out=out)  # a tty: found by isatty()
    assert progress.terminal
    progress.tick()
    drawn = read_available(screen).rsplit("\x1b[K", 1)[-1]
    assert drawn.startswith("⏳ demo · running") and drawn.endswith("…"), repr(drawn)
    assert len(drawn) + 1 <= 29  # ⏳ takes two columns; the last one stays free
