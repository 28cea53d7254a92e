"""Shared fixtures: a throwaway LEPTON_HOME, a real IPython shell with the extension loaded, and
process helpers. Everything runs real worker processes on this machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

# Before lepton_magic creates its default session: keep the tests' store apart from the user's.
os.environ["LEPTON_HOME"] = tempfile.mkdtemp(prefix="lepton-test-home-")
os.environ.setdefault("LEPTON_CONFIG", os.path.join(os.environ["LEPTON_HOME"], "no-config.toml"))

import psutil  # noqa: E402
import pytest  # noqa: E402


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 with its own host key; the test user's key is authorised."""
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    user = psutil.Process().username()
    keys = d / "authorized"
    keys.mkdir()
    shutil.copy(d / "user_key.pub", keys / user)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {keys}/%u\nUsePAM no\nPasswordAuthentication no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nAcceptEnv LEPTON_*\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-f", str(d / "sshd_config"), "-D", "-E", str(d / "sshd.log")])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    yield {"port": port, "user": user, "key": str(d / "user_key"), "known_hosts": str(d / "known_hosts"),
           "dir": d}
    proc.terminate()
    proc.wait(10)



@pytest.fixture(scope="session")
def ip():
    """A real InteractiveShell, as ipyparallel's tests use, with %load_ext lepton_magic done."""
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "lepton_magic")
    yield shell
    import lepton_magic

    lepton_magic.current_session().down()


@pytest.fixture
def run_cell(ip):
    """Run a cell; return (result, captured stdout)."""
    import contextlib
    import io

    def run(source: str):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = ip.run_cell(source)
        return result, out.getvalue()

    return run


def pytest_collection_modifyitems(session, config, items):
    """Browser tests last: Playwright's sync API keeps an event loop running in the main
    thread until the end of the session, which tests that run their own loop cannot share."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
