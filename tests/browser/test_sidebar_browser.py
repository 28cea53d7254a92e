"""The Lepton sidebar as a person uses it: an --async run appears, its step advances, and
Cancel in the sidebar stops it (the command reaches the kernel that owns the run).

Run with:  python -m pytest tests/browser -m browser -v -s -k sidebar
"""

from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.browser

ASYNC_RUN = """%%lepton --nodes 2 --async --name sidebar-run
import time
for i in range(600):  # 60 s unless cancelled
    lepton.log(step=i, loss=1 / (i + 1))
    time.sleep(0.1)
"""


def _open_sidebar(page):
    tab = page.locator('.jp-SideBar [data-id="lepton-sidebar"], .jp-SideBar li[title="Lepton"]').first
    tab.wait_for(state="visible", timeout=30_000)
    tab.click()
    sidebar = page.locator(".lepton-sidebar").first
    sidebar.wait_for(state="visible", timeout=15_000)
    return sidebar


def _step(row) -> int | None:
    match = re.search(r"step\s*(\d+)", row.inner_text())
    return int(match.group(1)) if match else None


@pytest.mark.timeout(300)
def test_sidebar_follows_and_cancels_an_async_run(notebook, shot, page):
    nb = notebook(["%load_ext lepton_magic", ASYNC_RUN], "sidebar")
    nb.run_and_wait(0, timeout=60)
    nb.run_and_wait(1, timeout=120)  # --async: the cell returns at once
    sidebar = _open_sidebar(page)
    row = sidebar.locator('.lepton-run-row[data-run-name="sidebar-run"]').first
    row.wait_for(state="visible", timeout=30_000)

    steps = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(s for s in steps if s is not None)) < 2:
        steps.append(_step(row))
        page.wait_for_timeout(500)
    seen = [s for s in steps if s is not None]
    assert len(set(seen)) >= 2 and seen[-1] > seen[0], f"the step did not advance: {steps}"
    shot("sidebar_running")

    t0 = time.monotonic()
    row.locator(".lepton-run-cancel").first.click()
    status = row.locator(".lepton-run-status").first
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and status.inner_text().strip().lower() != "cancelled":
        page.wait_for_timeout(200)
    took = time.monotonic() - t0
    print(f"\nsteps seen {seen}; cancelled {took:.1f} s after the click; {shot('sidebar_cancelled')}")
    assert status.inner_text().strip().lower() == "cancelled"
