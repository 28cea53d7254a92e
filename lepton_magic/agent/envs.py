"""Packages a run asks for (``--pip``, requirements.txt, ``node_requirements``), installed on the
node into an environment kept for every later run and pool that asks for the same.

    ~/.cache/lepton_magic/envs/<hash of Python and requirements>/

The environment is a venv made with ``--system-site-packages`` plus a ``.pth`` naming the
agent's own site folders, so the installer sees what the node has (the image's CUDA torch is
never installed again) whether the agent runs in the system Python or in a venv of its own.
Ranks keep the agent's interpreter and put the environment's site-packages first on sys.path.

The agent never waits for an install: it starts this module as a process of its own
(``python -m lepton_magic.agent.envs DIR REQUIREMENTS``), relays its output as log lines and
reads its verdict from its last line (the agent ignores SIGCHLD, so exit codes are not seen).
That process takes a lock on the folder, so two agents on one host install once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ENVS = Path(os.path.expanduser("~")) / ".cache" / "lepton_magic" / "envs"
READY = ".lepton-ready"
OK, FAILED = "LEPTON-ENV-OK", "LEPTON-ENV-FAILED"


def env_dir(requirements: list[str]) -> Path:
    what = "\n".join([platform.python_version(), os.path.realpath(sys.base_prefix), *sorted(requirements)])
    return ENVS / hashlib.sha256(what.encode()).hexdigest()[:16]


def site_packages(folder: Path) -> str:
    return str(folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages")


def ready(folder: Path) -> bool:
    return (folder / READY).exists()


def start_install(folder: Path, requirements: list[str], cwd: str | None) -> subprocess.Popen:
    """The installer as a process of its own; its stdout (merged stderr) is for the caller."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec = folder.parent / f"{folder.name}.requirements.txt"
    spec.write_text("\n".join(requirements) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # A session of its own, so that a cancel stops pip, its builds and all (agent/prepare.py).
    return subprocess.Popen([sys.executable, "-m", "lepton_magic.agent.envs", str(folder), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=cwd if cwd and os.path.isdir(cwd) else None, env=env, close_fds=True,
                            start_new_session=True)


# --- the installer process ---------------------------------------------------------------------
def install(folder: Path, spec: Path) -> tuple[bool, str]:
    """(ok, site-packages) or (False, "PACKAGE\\tWHY")."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another agent on this host may be installing it
        if ready(folder):
            print(f"lepton: {folder} was made meanwhile", flush=True)
            return True, site_packages(folder)
        shutil.rmtree(folder, ignore_errors=True)  # what a killed install left
        uv = shutil.which("uv")
        if uv:
            made = _run([uv, "venv", "--system-site-packages", "--python", sys.executable, str(folder)])
        else:
            made = _run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)])
        if made[0] != 0:
            return False, "(the environment)\tcould not make a venv: " + _last_error(made[1]) + (
                "" if uv else " (install the python3-venv package, or uv)")
        _see_agent_packages(Path(site_packages(folder)))
        python = str(folder / "bin" / "python")
        if uv:
            done = _run([uv, "pip", "install", "--python", python, "-r", str(spec)])
        else:
            done = _run([python, "-m", "pip", "install", "-r", str(spec)])
        if done[0] != 0:
            return False, f"{_failed_package(done[1])}\t{_last_error(done[1])}"
        (folder / READY).write_text("")
        return True, site_packages(folder)


def _see_agent_packages(site_dir: Path) -> None:
    """Name the agent's site folders in the venv (an agent inside a venv has its own packages,
    which --system-site-packages does not see)."""
    theirs = [p for p in {*site.getsitepackages(), site.getusersitepackages(),
                          sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
              if p and os.path.isdir(p)]
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "_lepton_agent_packages.pth").write_text("".join(f"{p}\n" for p in sorted(theirs)))


def _run(argv: list[str]) -> tuple[int, list[str]]:
    print("$ " + " ".join(argv), flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    return proc.wait(), lines


def _failed_package(lines: list[str]) -> str:
    patterns = (r"No matching distribution found for (\S+)", r"Failed (?:to )?build(?:ing wheel for)? (\S+)",
                r"Because (\S+) was not found", r"No solution found when resolving dependencies.*?(\S+)$",
                r"Could not find a version that satisfies the requirement (\S+)")
    for line in reversed(lines):
        for pattern in patterns:
            m = re.search(pattern, line)
            if m:
                return m.group(1)
    return "(the requirements)"


def _last_error(lines: list[str]) -> str:
    errors = [line.strip() for line in lines if line.strip().lower().startswith(("error", "×", "  ×"))]
    chosen = errors[-1] if errors else next((line.strip() for line in reversed(lines) if line.strip()), "failed")
    return chosen[:300]


def main(argv: list[str]) -> int:
    # The agent ignores SIGCHLD and that survives exec: without this, every child here would be
    # reaped unseen and "exit" 0 (subprocess reads ECHILD as success).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    folder, spec = Path(argv[0]), Path(argv[1])
    try:
        ok, what = install(folder, spec)
    except Exception as e:  # the agent reads the verdict: never leave without one
        ok, what = False, f"(the environment)\t{type(e).__name__}: {e}"
    print(f"{OK if ok else FAILED}\t{what}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
