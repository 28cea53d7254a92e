"""A local package whose build takes two minutes (an in-tree build backend: nothing to download),
for tests of what a cancel does to a long ``--pip`` install."""

import threading
import time

BACKEND = """
import os, time
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(os.environ["SLOW_BUILD_PID"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.environ["SLOW_BUILD_PID"] + ".tmp", os.environ["SLOW_BUILD_PID"])
    time.sleep(120)
    raise RuntimeError("never built")
"""


def slow_package(tmp_path, monkeypatch):
    """(the package's folder, the file its build writes its pid to once it runs)."""
    package = tmp_path / "slowpkg"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "slowback"\nbackend-path = ["."]\n'
        '[project]\nname = "slowpkg"\nversion = "0"\n')
    (package / "slowback.py").write_text(BACKEND)
    marker = tmp_path / "build.pid"
    monkeypatch.setenv("SLOW_BUILD_PID", str(marker))  # (the agents, started after, inherit it)
    return package, marker


def once_building(marker, action) -> list:
    """Call ``action`` on a thread once the build runs; the list gets the moment it was called."""
    called: list = []

    def wait_then_act():
        deadline = time.monotonic() + 120
        while not marker.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        called.append(time.monotonic())
        action()

    threading.Thread(target=wait_then_act, daemon=True).start()
    return called
