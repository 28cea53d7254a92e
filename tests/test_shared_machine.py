"""A machine shared with other users (issue 9, items 1 and 2): what lepton leaves under
LEPTON_HOME is private to the user, and another user can neither read large results through
/dev/shm nor swap them.

Another local user is a child started with setpriv under uid 5001: real permission checks of
the kernel, no mocks. It runs a system interpreter with the stdlib only (a venv under /root
cannot be executed by another uid).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_magic import sharedmem
from lepton_magic.liverun import OUTPUTS_FILE, outputs_dir
from lepton_magic.store import Store

OTHER_UID = 5001
#: Large enough to travel through shared memory.
BIG_CELL = "import numpy as np\nbig = np.full({n}, 7, dtype=np.uint8)\n".format(n=2 * sharedmem.SHM_MIN_BYTES)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _system_python() -> str | None:
    candidates = ["/usr/bin/python3.11", "/usr/bin/python3"]
    candidates += sorted(str(p) for p in Path("/usr/bin").glob("python3.*") if p.name[8:].isdigit())
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


class OtherUser:
    """Runs stdlib-only Python as another uid (no supplementary groups)."""

    def __init__(self, python: str, uid: int = OTHER_UID):
        self.prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-I", "-c"]

    def run(self, code: str, *args: str) -> str:
        done = subprocess.run([*self.prefix, textwrap.dedent(code), *args], capture_output=True, text=True,
                              timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, code: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix, textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def other_user() -> OtherUser:
    if os.geteuid() != 0:
        pytest.skip("acting as another local user needs root (setpriv --reuid)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot act as another local user")
    python = _system_python()
    if python is None:
        pytest.skip("no system python3 under /usr/bin that another uid could execute")
    user = OtherUser(python)
    try:
        seen = user.run("import os; print(os.getuid())").strip()
    except (AssertionError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run {python} as uid {OTHER_UID} through setpriv: {e}")
    if seen != str(OTHER_UID):
        pytest.skip(f"setpriv ran {python} as uid {seen}, not {OTHER_UID}")
    return user


@pytest.fixture
def shared_tmp():
    """A scratch folder everyone may enter and create in (sticky, as /tmp and /dev/shm are):
    what is private in it is private because lepton made it so."""
    folder = Path(tempfile.mkdtemp(prefix="lepton-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def umask_022():
    """The usual umask, which makes new files 0644: lepton must not depend on a stricter one."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@contextlib.contextmanager
def lepton_session(home: Path):
    from lepton_magic.session import Session

    store = Store(home)
    session = Session(store=store)
    try:
        session.up(nodes=1, preload="numpy")
        yield session
    finally:
        session.close()
        store.close()


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _warnings_naming(folder: Path, caplog, capsys) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    lines += capsys.readouterr().err.splitlines()
    return [line for line in lines if str(folder) in line]


# --- item 1: what lepton leaves under LEPTON_HOME ------------------------------------------------

READ_EACH = """
import json, sys
seen = {}
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        seen[path] = "read"
    except OSError as e:
        seen[path] = type(e).__name__
print(json.dumps(seen))
"""


def test_another_user_cannot_read_what_a_run_leaves(other_user, shared_tmp, umask_022):
    home = shared_tmp / "home"  # not there yet: lepton creates it, under umask 022
    ns: dict = {}
    with lepton_session(home) as session:
        run = session.submit(BIG_CELL, ns, outputs=["big"]).wait()
        assert run.status == "succeeded", run.error
        saved = outputs_dir(session.store, run.id) / OUTPUTS_FILE
        _wait_for(saved.exists)  # written by a thread after the run ends
        files = [home / "store.sqlite", home / "store.sqlite-wal", home / "store.sqlite-shm",
                 home / "logs" / "agent-local-0.log", saved]
        assert all(f.exists() for f in files), [str(f) for f in files if not f.exists()]
        seen = json.loads(other_user.run(READ_EACH, *map(str, files)))
        modes = {str(p.relative_to(home)): oct(_mode(p)) for p in files}
        folders = {str(p.relative_to(shared_tmp)): oct(_mode(p))
                   for p in (home, home / "logs", home / "runs", saved.parent)}
    assert seen == {str(f): "PermissionError" for f in files}
    assert modes == {name: "0o600" for name in modes}
    assert folders == {name: "0o700" for name in folders}


def test_an_open_home_is_made_private_with_one_warning(tmp_path, caplog, capsys):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    old_store = home / "store.sqlite"  # as an earlier version left it under umask 022
    old_store.touch()
    old_store.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        Store(home).close()
        Store(home).close()  # already private: nothing more to say
    assert oct(_mode(home)) == "0o700"
    assert oct(_mode(old_store)) == "0o600"
    lines = _warnings_naming(home, caplog, capsys)
    assert len(lines) == 1, lines
    assert "755" in lines[0]


# --- item 2: large results through /dev/shm -----------------------------------------------------

SQUAT = """
import os, sys
os.mkdir(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
"""

#: What the probe on the shared server did: watch the squatted folder and put a file of 66s in
#: place of every result that appears there. Prints the names it saw when told to stop.
WATCH_AND_SWAP = """
import os, sys, time
folder, stop = sys.argv[1], sys.argv[2]
seen, swapped = [], 0
print("ready", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    for name in os.listdir(folder):
        if name.startswith("squat-") or name in seen:
            continue
        seen.append(name)
        try:
            size = os.stat(os.path.join(folder, name)).st_size
            fake = os.path.join(folder, "squat-" + name)
            with open(fake, "wb") as f:
                f.write(b"\\x42" * size)
            os.rename(fake, os.path.join(folder, name))
            swapped += 1
        except OSError:
            pass
print(" ".join(seen) or "-", swapped)
"""


def test_a_squatted_shared_memory_folder_gets_nothing(other_user, shared_tmp, monkeypatch, caplog, capsys):
    shm_root = shared_tmp / "shm"
    shm_root.mkdir()
    shm_root.chmod(0o1777)
    monkeypatch.setattr(sharedmem, "SHM_ROOT", str(shm_root))
    squat = shm_root / f"lepton-{os.getuid()}"
    other_user.run(SQUAT, str(squat))
    stop = shared_tmp / "stop"
    watcher = other_user.start(WATCH_AND_SWAP, str(squat), str(stop))
    try:
        assert watcher.stdout.readline().strip() == "ready", watcher.stderr.read()
        ns: dict = {}
        with caplog.at_level(logging.WARNING), lepton_session(shared_tmp / "home") as session:
            run = session.submit(BIG_CELL, ns, outputs=["big"]).wait()
            used = session.pool().backend.shared_memory_dir()
    finally:
        stop.touch()
        out, err = watcher.communicate(timeout=30)
    assert run.status == "succeeded", run.error
    big = ns["big"]  # through the pipe, with the right values
    assert big.shape == (2 * sharedmem.SHM_MIN_BYTES,) and bool((big == 7).all()), np.unique(big)
    seen, swapped = out.split()
    assert (seen, swapped) == ("-", "0"), f"the squatter saw {seen} and swapped {swapped}"
    assert used is None
    assert os.listdir(squat) == []
    lines = _warnings_naming(squat, caplog, capsys)
    assert len(lines) == 1, lines


def _foreign_owned(folder: Path) -> None:
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)


def _open_to_everyone(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o777)


def _symlink_to_a_private_folder(folder: Path) -> None:
    target = folder.parent / "elsewhere"
    target.mkdir(mode=0o700)
    folder.symlink_to(target)


@pytest.mark.parametrize("squat", [_foreign_owned, _open_to_everyone, _symlink_to_a_private_folder],
                         ids=["owned by another uid", "mode 0777", "a symlink"])
def test_default_dir_refuses_a_folder_that_is_not_private(tmp_path, squat, caplog, capsys):
    if squat is _foreign_owned and os.geteuid() != 0:
        pytest.skip("giving a folder to another uid needs root (chown)")
    folder = tmp_path / f"lepton-{os.getuid()}"
    squat(folder)
    with caplog.at_level(logging.WARNING):
        assert sharedmem.default_dir(str(tmp_path)) is None
        assert sharedmem.default_dir(str(tmp_path)) is None
    assert len(_warnings_naming(folder, caplog, capsys)) == 1  # said once


def test_default_dir_makes_a_private_folder(tmp_path, umask_022):
    folder = sharedmem.default_dir(str(tmp_path))
    assert folder == str(tmp_path / f"lepton-{os.getuid()}")
    assert oct(_mode(Path(folder))) == "0o700"
    assert sharedmem.default_dir(str(tmp_path)) == folder  # and takes it again


def _replace_with_lookalike(path: str) -> None:
    """Same name, same size, another inode: what a squatter's rename leaves."""
    fake = f"{path}.fake"
    with open(fake, "wb") as f:
        f.write(b"\x42" * os.path.getsize(path))
    os.replace(fake, path)


def test_a_result_file_swapped_after_writing_is_refused(tmp_path):
    folder = tmp_path / "shm"
    folder.mkdir(mode=0o700)
    payload = np.full(sharedmem.SHM_MIN_BYTES, 7, dtype=np.uint8)
    info = sharedmem.write_buffers(str(folder), "r-swap", [memoryview(payload)])
    assert oct(_mode(Path(info["path"]))) == "0o600"
    _replace_with_lookalike(info["path"])
    with pytest.raises(OSError, match="replaced"):
        sharedmem.map_buffers(info)


def test_a_symlink_in_place_of_a_result_file_is_refused(tmp_path):
    folder = tmp_path / "shm"
    folder.mkdir(mode=0o700)
    info = sharedmem.write_buffers(str(folder), "r-link", [memoryview(bytes(1000))])
    os.rename(info["path"], f"{info['path']}.real")
    os.symlink(f"{info['path']}.real", info["path"])
    with pytest.raises(OSError):
        sharedmem.map_buffers(info)


def test_a_run_whose_result_file_was_swapped_skips_its_outputs(tmp_path, monkeypatch):
    shm_root = tmp_path / "shm"
    shm_root.mkdir()
    monkeypatch.setattr(sharedmem, "SHM_ROOT", str(shm_root))
    map_buffers = sharedmem.map_buffers

    def swap_then_map(info):
        _replace_with_lookalike(info["path"])
        return map_buffers(info)

    monkeypatch.setattr(sharedmem, "map_buffers", swap_then_map)
    ns: dict = {}
    with lepton_session(tmp_path / "home") as session:
        run = session.submit(BIG_CELL, ns, outputs=["big"]).wait()
        assert run.status == "succeeded", run.error
        skipped = run.skipped
    assert "big" not in ns, f"the notebook got {np.unique(ns['big'])}"
    assert "replaced" in skipped["big"], skipped
