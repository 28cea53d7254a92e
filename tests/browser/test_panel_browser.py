"""The %%lepton panel as a person sees it: JupyterLab in headless Chromium, real workers.

Run with:  python -m pytest tests/browser -m browser -v -s
(see tests/browser/conftest.py for the fixtures; scripts/ci_browser_deps.sh installs chromium,
jupyterlab and playwright).

The panel's DOM contract (lepton_magic/ui/panel.py):
- root ``.lepton-panel``; status badge ``.lepton-status`` whose text is the run status;
- one ``.lepton-node-row`` per node; the live curve is ``.lepton-curve img`` (its src changes on
  each redraw); the Cancel button ``.lepton-cancel``;
- after the run, the live panel is replaced by one static record ``.lepton-panel.lepton-static``
  (same badge, node rows and ``.lepton-curve img``, plus what the ranks printed), the only output
  showing the curves: what a saved or exported notebook shows too.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.browser

TERMINAL = ("succeeded", "failed", "cancelled")
#: Time for the panel to appear after Shift+Enter (workers start, import torch on a busy machine).
PANEL_TIMEOUT_MS = 90_000

LOAD = "%load_ext lepton_magic"

SHORT_RUN = """%%lepton --nodes 2
import time
for i in range(40):
    lepton.log(step=i, loss=1 / (i + 1))
    time.sleep(0.1)
print(f"rank {lepton.rank} is done")
"""

LONG_RUN = """%%lepton --nodes 2
import time
for i in range(600):  # 60 s unless cancelled
    lepton.log(step=i, loss=1 / (i + 1))
    time.sleep(0.1)
"""

# JS: the srcs of every img in cell `i`'s output area, and whether each sits in the static record.
IMGS_JS = """([panelSel, i]) => {
    const cell = document.querySelectorAll(panelSel + ' .jp-Notebook .jp-Cell')[i];
    if (!cell) return [];
    return Array.from(cell.querySelectorAll('.jp-OutputArea img'))
        .map(img => [(img.getAttribute('src') || '').slice(0, 40), !!img.closest('.lepton-static')]);
}"""
NB_PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


def _status(panel) -> str:
    badge = panel.locator(".lepton-status")
    return badge.first.inner_text().strip().lower() if badge.count() else ""


def _curve_src(panel) -> str | None:
    img = panel.locator(".lepton-curve img")
    return img.first.get_attribute("src") if img.count() else None


@pytest.mark.timeout(240)
def test_lab_runs_a_cell(notebook, lab, shot, page):
    """The infrastructure: the lab answers, a notebook opens with an idle kernel, Shift+Enter runs
    a cell and its output shows in the page."""
    t0 = time.monotonic()
    nb = notebook(["1 + 1"], "smoke")
    opened = time.monotonic() - t0
    n = nb.run_and_wait(0, timeout=60)
    assert n == 1
    out = nb.output(0).locator(".jp-OutputArea-output").first
    assert out.inner_text().strip() == "2"
    path = shot("lab_runs_a_cell")
    print(f"\nlab start {lab.started_in:.1f} s; notebook open + kernel idle {opened:.1f} s; "
          f"run {time.monotonic() - t0 - opened:.1f} s; screenshot {path}")
    assert not page.blocked_requests, f"the lab page asked for non-local URLs: {page.blocked_requests}"


@pytest.mark.timeout(300)
def test_panel_shows_a_run_to_its_end(notebook, shot, page):
    """Test A: a 2-node run of ~4 s: the panel appears with 2 node rows, the live curve is redrawn
    during the run, the status ends 'succeeded' and the panel becomes one static record holding
    the curves and what the ranks printed."""
    nb = notebook([LOAD, SHORT_RUN], "panel_short_run")
    nb.run_and_wait(0, timeout=60)
    nb.run(1)
    try:
        panel = nb.cell(1).locator(".lepton-panel")
        panel.first.wait_for(state="visible", timeout=PANEL_TIMEOUT_MS)
        panel = panel.first
        rows = panel.locator(".lepton-node-row")

        srcs: list[str] = []
        statuses: list[str] = []
        saw_two_rows = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = _status(panel)
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            src = _curve_src(panel)
            if src and (not srcs or srcs[-1] != src):
                srcs.append(src)
            saw_two_rows = saw_two_rows or rows.count() == 2
            if status in TERMINAL:
                break
            page.wait_for_timeout(100)
        nb.wait_done(1, timeout=60)
        nb.wait_idle()
        page.wait_for_timeout(300)  # the final redraw and the record
    finally:
        path = shot("panel_short_run")
        print(f"\nscreenshot {path}")

    print(f"statuses seen: {statuses}; distinct curve srcs: {len(srcs)}")
    assert saw_two_rows or rows.count() == 2, f"{rows.count()} .lepton-node-row, expected 2"
    assert rows.count() == 2
    assert len(srcs) >= 2, f"the .lepton-curve img src changed {max(len(srcs) - 1, 0)} times during the run"
    assert _status(panel) == "succeeded", f"statuses seen: {statuses}"
    imgs = page.evaluate(IMGS_JS, [NB_PANEL, 1])
    assert len(imgs) == 1, f"the curves show {len(imgs)} times under the cell: {imgs}"
    src, in_record = imgs[0]
    assert in_record and src.startswith("data:image/png"), imgs
    record = nb.cell(1).locator(".lepton-static")
    assert record.count() == 1 and "[rank 1] rank 1 is done" in record.first.inner_text()
    record.first.scroll_into_view_if_needed()
    print(f"record: {shot('panel_short_run_static')}")


@pytest.mark.timeout(300)
def test_cancel_button_stops_a_running_cell(notebook, shot, page):
    """Test B: a cell that would run 60 s; clicking Cancel while it runs makes the status
    'cancelled' within 15 s and the cell finishes (the kernel is idle again)."""
    nb = notebook([LOAD, LONG_RUN], "panel_cancel")
    nb.run_and_wait(0, timeout=60)
    nb.run(1)
    t_run = time.monotonic()
    try:
        panel = nb.cell(1).locator(".lepton-panel")
        panel.first.wait_for(state="visible", timeout=PANEL_TIMEOUT_MS)
        panel = panel.first
        # Cancel once it is really running (the ranks are in the loop), as a person would.
        deadline = time.monotonic() + 60
        while _status(panel) != "running" and time.monotonic() < deadline:
            assert _status(panel) not in TERMINAL, f"run ended before Cancel: {_status(panel)}"
            page.wait_for_timeout(100)
        assert _status(panel) == "running", f"status {_status(panel)!r} 60 s after the panel appeared"
        page.wait_for_timeout(1000)
        shot("panel_cancel_before")

        t_click = time.monotonic()
        panel.locator(".lepton-cancel").first.click()
        deadline = t_click + 15
        while _status(panel) != "cancelled" and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        took = time.monotonic() - t_click
        status = _status(panel)
        assert status == "cancelled", f"status {status!r} {took:.1f} s after clicking Cancel"
        print(f"\ncancelled {took:.1f} s after the click ({t_click - t_run:.1f} s into the cell)")

        nb.wait_done(1, timeout=30)
        nb.wait_idle(timeout=30)
        assert time.monotonic() - t_run < 55, "the cell ran (nearly) its whole 60 s: Cancel did not stop it"
    finally:
        path = shot("panel_cancel")
        print(f"screenshot {path}")
