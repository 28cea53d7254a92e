"""Browser tests: a real JupyterLab server on 127.0.0.1 and headless Debian Chromium driven by
Playwright's sync API.

Fixtures (session-scoped unless said otherwise):
- ``browser_deps``: skips every browser test, with the reason, when chromium, playwright or
  jupyterlab is missing (``bash scripts/ci_browser_deps.sh`` installs them).
- ``lab``: ``jupyter lab`` in its own process group, in a temporary root dir, with its own
  LEPTON_HOME, Jupyter config/data/runtime dirs, user settings, workspaces, and an app-settings
  ``overrides.json`` that turns off the news and update checks (they cover screenshots and would
  go to the internet). Killed (the whole process group) at the end.
- ``browser``: headless Chromium (Debian's; never ``playwright install``).
- ``page`` (per test): a fresh context and page at 1280x900 that can reach 127.0.0.1 only.
- ``notebook`` (per test): ``notebook(cells, name)`` writes an .ipynb, opens it and waits for an
  idle kernel; returns a :class:`LabNotebook` that runs cells the way a person does (click into
  the cell, Shift+Enter).
- ``shot`` (per test): ``shot(name)`` saves a screenshot of the page (or ``shot(name, target=locator)``
  of one element) to tests/artifacts/; a failed test leaves ``<test>-failed.png`` there too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
VIEWPORT = {"width": 1280, "height": 900}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Settings every lab here starts with: no news, no update check (both go to a website and the
#: news toast covers the page in screenshots).
OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}
LAB_START_TIMEOUT = 60.0
KERNEL_IDLE_TIMEOUT = 60.0


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: runs JupyterLab in headless Chromium")


# --- what the tests need ------------------------------------------------------------------------
def _missing() -> list[str]:
    missing = []
    if not shutil.which("chromium"):
        missing.append("chromium (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright; never `playwright install`)")
    if importlib.util.find_spec("jupyterlab") is None:
        missing.append("jupyterlab (pip install jupyterlab)")
    return missing


@pytest.fixture(scope="session")
def browser_deps():
    missing = _missing()
    if missing:
        pytest.skip("browser tests need " + ", ".join(missing) + "; bash scripts/ci_browser_deps.sh installs them")


# --- JupyterLab ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running JupyterLab server."""

    def __init__(self, proc: subprocess.Popen, root: Path, port: int, token: str, log: Path, started_in: float):
        self.proc = proc
        self.root = root
        self.port = port
        self.token = token
        self.log = log
        self.started_in = started_in
        self.base = f"http://127.0.0.1:{port}"

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str):
        req = urllib.request.Request(f"{self.base}/api/{path.lstrip('/')}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read().decode())

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it and its kernels, which then stop their workers),
    then SIGKILL whatever is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(0.5)  # kernels get a moment to stop their own children
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def lab(browser_deps, tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    dirs = {name: base / name for name in ("lepton-home", "jupyter-config", "jupyter-data", "jupyter-runtime",
                                            "app-settings", "user-settings", "workspaces")}
    for d in (root, *dirs.values()):
        d.mkdir(parents=True, exist_ok=True)
    (dirs["app-settings"] / "overrides.json").write_text(json.dumps(OVERRIDES, indent=2))

    env = dict(os.environ)
    env.update(
        LEPTON_HOME=str(dirs["lepton-home"]),
        LEPTON_CONFIG=str(dirs["lepton-home"] / "no-config.toml"),
        JUPYTER_CONFIG_DIR=str(dirs["jupyter-config"]),
        JUPYTER_DATA_DIR=str(dirs["jupyter-data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["jupyter-runtime"]),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("JPY_SESSION_NAME", None)

    port = _free_port()
    token = secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser", "--ip", "127.0.0.1", "--port", str(port), f"--ServerApp.token={token}", "--allow-root",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.port_retries=0",
        f"--LabApp.app_settings_dir={dirs['app-settings']}",
        f"--LabApp.user_settings_dir={dirs['user-settings']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
        "--LabApp.extension_manager=readonly",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: the kernel's state for wait_idle
    ]
    log = base / "lab.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(proc, root, port, token, log, 0.0)
    try:
        deadline = t0 + LAB_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.api("status")
                # the lab page itself, not only the REST API
                with urllib.request.urlopen(server.url("lab"), timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer in {LAB_START_TIMEOUT:.0f} s:\n{server.log_tail()}")
            time.sleep(0.1)
        server.started_in = time.monotonic() - t0
        print(f"\njupyter lab answered in {server.started_in:.1f} s on port {port} (log: {log})")
        yield server
    finally:
        _stop_group(proc)


# --- Chromium -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _playwright(browser_deps):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(_playwright):
    browser = _playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


_LOCAL = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """A test that fails leaves tests/artifacts/<test>-failed.png, taken at once (before the
    fixtures shut its kernel down)."""
    report = yield
    page = getattr(item, "funcargs", {}).get("page")
    if report.when == "call" and report.failed and page is not None:
        with contextlib.suppress(Exception):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            path = ARTIFACTS / f"{_stem(item.name)}-failed.png"
            page.screenshot(path=str(path))
            report.sections.append(("failure screenshot", str(path)))
            print(f"\nfailure screenshot: {path}")
    return report


@pytest.fixture
def page(browser, lab):
    """A fresh context (no state from other tests) and page, 1280x900, 127.0.0.1 only (other
    requests are aborted and listed in page.blocked_requests)."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(30_000)
    blocked: list[str] = []

    def only_local(route):
        url = route.request.url
        if _LOCAL.match(url) or url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    page.blocked_requests = blocked
    yield page
    if blocked:
        print(f"\nblocked non-local requests: {blocked}")
    context.close()


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


@pytest.fixture
def shot(page, request):
    """shot(name) -> Path: a PNG of the page in tests/artifacts/ (git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(name: str | None = None, target=None, **kwargs) -> Path:
        """The page as shown (1280x900), or only `target` (a locator) when given."""
        path = ARTIFACTS / f"{_stem(name or request.node.name)}.png"
        (target or page).screenshot(path=str(path), **kwargs)
        return path

    return take


# --- notebooks ----------------------------------------------------------------------------------
def write_notebook(path: Path, cells: list[str]) -> Path:
    """An nbformat-4 notebook with the given code cells, for the python3 kernel."""
    nb = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {}, "outputs": [],
             "source": src}
            for i, src in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))
    return path


# JS: the current notebook's kernel as the app sees it (window.jupyterapp: expose_app_in_browser).
_KERNEL_JS = """() => {
    const app = window.jupyterapp;
    const w = app && app.shell.currentWidget;
    const ctx = w && w.sessionContext;
    const k = ctx && ctx.session && ctx.session.kernel;
    return {
        app: !!app,
        ready: !!(ctx && ctx.isReady),
        connection: k ? k.connectionStatus : null,
        status: k ? k.status : null,
    };
}"""
# JS: the text of cell i's prompt in the visible notebook.
_PROMPT_JS = """([panelSel, i]) => {
    const cell = document.querySelectorAll(panelSel + ' .jp-Notebook .jp-Cell')[i];
    const p = cell && cell.querySelector('.jp-InputArea-prompt');
    return p ? p.textContent : null;
}"""
_PANEL_SEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


class LabNotebook:
    """An open notebook in the lab page."""

    def __init__(self, page, lab: Lab, path: Path):
        self.page = page
        self.lab = lab
        self.path = path
        self.panel = page.locator(_PANEL_SEL).first

    # -- locators
    def cell(self, index: int):
        return self.panel.locator(".jp-Notebook .jp-Cell").nth(index)

    def output(self, index: int):
        """The output area of cell `index`."""
        return self.cell(index).locator(".jp-OutputArea")

    def prompt(self, index: int) -> str:
        return (self.page.evaluate(_PROMPT_JS, [_PANEL_SEL, index]) or "").strip()

    # -- kernel
    def kernel_status(self) -> str:
        """What the notebook toolbar's kernel indicator shows ('' until it is there)."""
        ind = self.panel.locator(".jp-Notebook-ExecutionIndicator")
        if ind.count():
            return ind.first.get_attribute("data-status") or ""
        return ""

    def kernel(self) -> dict:
        """The kernel as the app sees it: ready, connection, status."""
        return self.page.evaluate(_KERNEL_JS)

    def _idle(self) -> bool:
        k = self.kernel()
        if k["app"] and not (k["ready"] and k["connection"] == "connected" and k["status"] == "idle"):
            return False
        return self.kernel_status() == "idle"

    def wait_idle(self, timeout: float = KERNEL_IDLE_TIMEOUT) -> None:
        """Until the kernel is connected and idle, both in the app and on the toolbar's indicator,
        for 0.5 s in a row (a kernel that just started or just ran a cell flickers).

        Note: while a %%lepton cell blocks, the kernel can still report idle between the widget
        events the panel handles: wait for the cell's prompt ([N]) first (wait_done)."""
        deadline = time.monotonic() + timeout
        idle_since = None
        while time.monotonic() < deadline:
            if self._idle():
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= 0.5:
                    return
            else:
                idle_since = None
            self.page.wait_for_timeout(100)
        raise AssertionError(f"kernel not idle after {timeout:.0f} s (app: {self.kernel()}, "
                             f"indicator: {self.kernel_status()!r})\nlab log:\n{self.lab.log_tail()}")

    # -- running
    def _wait_prompt(self, index: int, pattern: str, timeout: float) -> bool:
        try:
            self.page.wait_for_function(
                """([panelSel, i, pattern]) => {
                    const cell = document.querySelectorAll(panelSel + ' .jp-Notebook .jp-Cell')[i];
                    const p = cell && cell.querySelector('.jp-InputArea-prompt');
                    return p && new RegExp(pattern).test(p.textContent);
                }""",
                arg=[_PANEL_SEL, index, pattern],
                timeout=timeout * 1000,
            )
            return True
        except Exception as e:  # playwright's TimeoutError
            if type(e).__name__ != "TimeoutError":
                raise
            return False

    def run(self, index: int) -> None:
        """Run cell `index` as a person does: click into its editor and press Shift+Enter.
        Returns as soon as the cell is queued or running (its prompt shows [*] or [N]).

        JupyterLab marks a cell [*] before it sends it; a cell still [ ] after a few seconds was
        never sent (seen about 1 run in 5 right after a notebook opened, with an idle kernel), so
        it is sent again, with Ctrl+Enter (run in place) this time."""
        cell = self.cell(index)
        for attempt, keys in enumerate(("Shift+Enter", "Control+Enter", "Control+Enter")):
            cell.scroll_into_view_if_needed()
            cell.locator(".jp-InputArea-editor").click()
            self.page.locator(_PANEL_SEL + " .jp-Cell.jp-mod-active .cm-editor.cm-focused").first.wait_for(
                state="attached", timeout=5_000)
            self.page.keyboard.press(keys)
            if self._wait_prompt(index, r"\[(\*|\d+)\]", 5):
                return
            prompt = self.prompt(index)
            if prompt.strip(" :") not in ("[ ]", "[]", ""):
                break  # something else: do not risk running it twice
            print(f"cell {index} was not sent after {keys} (prompt {prompt!r}, kernel {self.kernel()}): again")
        raise AssertionError(f"cell {index} did not start: prompt {self.prompt(index)!r}, kernel {self.kernel()}")

    def wait_done(self, index: int, timeout: float = 120.0) -> int:
        """Until cell `index` has finished (its prompt shows [N]); returns N."""
        if not self._wait_prompt(index, r"\[\d+\]", timeout):
            raise AssertionError(f"cell {index} not done after {timeout:.0f} s: prompt {self.prompt(index)!r}")
        return int(re.search(r"\[(\d+)\]", self.prompt(index)).group(1))

    def run_and_wait(self, index: int, timeout: float = 120.0) -> int:
        self.run(index)
        n = self.wait_done(index, timeout)
        self.wait_idle()
        return n


def open_notebook(page, lab: Lab, cells: list[str], name: str) -> LabNotebook:
    """Write `cells` to <lab root>/<name>.ipynb, open it in a workspace of its own, and wait for
    its kernel to be idle."""
    path = write_notebook(lab.root / f"{name}.ipynb", cells)
    page.goto(lab.url(f"lab/workspaces/{name}/tree/{path.name}?reset"), wait_until="domcontentloaded")
    nb = LabNotebook(page, lab, path)
    nb.panel.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=60_000)
    nb.wait_idle()
    return nb


@pytest.fixture
def notebook(page, lab):
    """notebook(cells, name) -> LabNotebook, open with an idle kernel. Its kernel is shut down
    after the test."""
    opened: list[LabNotebook] = []

    def make(cells: list[str], name: str) -> LabNotebook:
        nb = open_notebook(page, lab, cells, name)
        opened.append(nb)
        return nb

    yield make
    # Shut down the kernels this test started (a cancelled or failed run must not leave workers).
    with contextlib.suppress(Exception):
        for session in lab.api("sessions"):
            if any(session.get("path", "").endswith(nb.path.name) for nb in opened):
                req = urllib.request.Request(f"{lab.base}/api/sessions/{session['id']}", method="DELETE",
                                             headers={"Authorization": f"token {lab.token}"})
                urllib.request.urlopen(req, timeout=10).close()
