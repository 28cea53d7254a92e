"""Shared fixtures: a throwaway LEPTON_HOME, a real IPython shell with the extension loaded, and
process helpers. Everything runs real worker processes on this machine."""

from __future__ import annotations

import os
import tempfile

# Before lepton_magic creates its default session: keep the tests' store apart from the user's.
os.environ["LEPTON_HOME"] = tempfile.mkdtemp(prefix="lepton-test-home-")
os.environ.setdefault("LEPTON_CONFIG", os.path.join(os.environ["LEPTON_HOME"], "no-config.toml"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ip():
    """A real InteractiveShell, as ipyparallel's tests use, with %load_ext lepton_magic done."""
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "lepton_magic")
    yield shell
    import lepton_magic

    lepton_magic.session().down()


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
