"""Showing a run while it goes: the widget panel where a Jupyter frontend is attached, the text
progress line elsewhere.

In a notebook a blocking ``%%lepton`` cell is run as an *awaiting* cell (see
:func:`await_lepton_cells`): while it awaits, ipykernel (7+) handles widget messages, so the
panel's Cancel button works during the run. Ctrl-C / interrupt cancels too, in every frontend.
``--async`` runs and attached runs are followed by a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

from ..errors import run_interrupted, run_left
from ..run import Run
from .progress import TextProgress

# The panel's modules (ipywidgets, matplotlib, pandas) load on first use, not with the
# extension: %load_ext stays fast and terminals never pay for them.

#: How often a follower looks at the store.
POLL_SECONDS = 0.25
#: The magic a blocking cell is rewritten to call in a notebook (it returns a coroutine).
AWAIT_MAGIC = "lepton_await"


def await_lepton_cells(lines: list[str]) -> list[str]:
    """An IPython input transformer (run after magics are expanded): turn a ``%%lepton`` cell
    into ``await get_ipython().run_cell_magic('lepton_await', ...)``, so the kernel runs it as
    an async cell and keeps serving widget events (the Cancel button) while it waits."""
    prefix = "get_ipython().run_cell_magic('lepton',"
    if lines and lines[0].startswith(prefix):
        lines = list(lines)
        lines[0] = f"await get_ipython().run_cell_magic('{AWAIT_MAGIC}'," + lines[0][len(prefix):]
    return lines


def prefetch_panel() -> threading.Thread:
    """Import the panel's modules (ipywidgets, matplotlib: 1-2 s) on a background thread, so
    the first run's panel shows when the run starts, not seconds later. Not on %load_ext's own
    path: that stays fast."""

    def load():
        try:
            from . import panel  # noqa: F401
        except Exception:  # it is only a head start; the first panel imports it again and says
            pass

    thread = threading.Thread(target=load, daemon=True, name="lepton-prefetch")
    thread.start()
    return thread


def widgets_available(shell) -> bool:
    """A kernel a Jupyter frontend talks to (widgets can render); terminals get text."""
    return type(shell).__name__ == "ZMQInteractiveShell"


def follow_blocking(run: Run, status_line: bool = True, owned: bool = True) -> None:
    """Show the run until it ends (text progress). Ctrl-C cancels a run this cell owns first;
    a detached or attached run only stops being followed."""
    progress = TextProgress(run, status_line=status_line)
    try:
        while not run.wait_done(0.05):
            progress.tick()
    except KeyboardInterrupt:
        error = _interrupted(run, owned)
        progress.finish()
        raise error from None
    except BaseException:
        if _cancels(run, owned):
            run.cancel()
            run.wait_done(10)
        progress.finish()
        raise
    progress.finish()


async def follow_awaiting(run: Run) -> None:
    """The notebook's blocking follow: the panel, redrawn while the cell awaits the run. An
    interrupt (the task is cancelled) cancels the run and ends the cell with one KeyboardInterrupt
    line; a detached run goes on, and the cell says how to follow or cancel it."""
    from IPython.display import display

    panel = _panel(run)
    handle = display(panel.widget, display_id=True)
    try:
        while not run.done:
            await asyncio.sleep(0.05)
            panel.update()
    except (asyncio.CancelledError, KeyboardInterrupt):  # the cell was interrupted
        error = _interrupted(run, owned=True)
        _leave_record(panel, handle)
        print(TextProgress(run).summary_text())
        raise error from None
    except BaseException:
        _stop(run, panel, handle)
        raise
    _leave_record(panel, handle)
    print(TextProgress(run).summary_text())


def _cancels(run: Run, owned: bool) -> bool:
    """Whether stopping to follow ``run`` cancels it: only for a run this cell runs itself."""
    return owned and not run.detached


def _interrupted(run: Run, owned: bool) -> KeyboardInterrupt:
    """Ctrl-C while following: cancel a run the cell owns (and say so); leave any other going."""
    if not _cancels(run, owned):
        print(f"\nstopped following {run.name}; it goes on · %lepton attach {run.name} to follow it, "
              f"%lepton cancel {run.name} to stop it", flush=True)
        return run_left(run.name)
    run.cancel()
    print(f"\ncancelling {run.name} …", flush=True)
    run.wait_done(10)
    return run_interrupted(run.name)


def _stop(run: Run, panel, handle) -> None:
    if _cancels(run, owned=True):
        run.cancel()
        run.wait_done(10)
    _leave_record(panel, handle)
    print(TextProgress(run).summary_text())


def _panel(run: Run):
    """A panel on ``run``, drawn once. The kernel running the run takes new points straight
    from the store's writer."""
    if run.is_sweep:
        from .sweep_panel import SweepPanel, SweepView

        panel = SweepPanel(SweepView(run.store, run.seq), on_cancel=run.cancel)
        panel.update(force=True)
        return panel
    from .model import RunView
    from .panel import RunPanel

    panel = RunPanel(RunView(run.store, run.seq, follow=run.is_live), on_cancel=run.cancel)
    panel.update(force=True)
    return panel


def _leave_record(panel, handle) -> None:
    """The run ended: its live panel becomes one static output (header, nodes, curves, final
    values, what the ranks printed) that a saved or exported notebook shows as it is, and the
    widgets are closed."""
    panel.update(force=True)
    if handle is not None:
        handle.update(panel.static_bundle(), raw=True)
    panel.close()


def follow_in_background(run: Run, shell) -> threading.Thread | None:
    """Show a live panel for a run that the cell does not wait for; returns the follower.
    The record it leaves at the end lands in this cell's output even if another cell runs by
    then (a display update goes to its display id, wherever that is)."""
    if not widgets_available(shell):
        return None
    from IPython.display import display

    panel = _panel(run)
    handle = display(panel.widget, display_id=True)

    def loop():
        while not panel.view.finished:
            time.sleep(POLL_SECONDS)
            try:
                panel.update()
            except Exception:
                return
        _leave_record(panel, handle)

    thread = threading.Thread(target=loop, daemon=True, name=f"lepton-panel-{run.name}")
    thread.start()
    return thread


def show(run: Run, shell) -> None:
    """The panel of any run (finished ones frozen), or its text without a frontend: followed
    to its end while it runs (Ctrl-C stops following, never the run)."""
    if not widgets_available(shell):
        if not run.done:
            follow_blocking(run, owned=False)
        print(TextProgress(run).summary_text())
        return
    if run.status in ("succeeded", "failed", "cancelled"):
        from IPython.display import display

        display(_panel(run).widget)  # frozen, with its controls, and the static record for saving
        return
    follow_in_background(run, shell)


def show_pool(session, shell):
    """``%lepton status``: the pool's nodes, live, as a panel; a DataFrame without a frontend."""
    if not widgets_available(shell):
        return session.nodes()
    from IPython.display import display

    from .panel import PoolPanel

    panel = PoolPanel(session)
    panel.update()
    display(panel.widget)

    def loop():
        while session.pools and any(not p.closed for p in session.pools.values()):
            time.sleep(2.0)
            try:
                panel.update()
            except Exception:
                return
        panel.update()

    threading.Thread(target=loop, daemon=True, name="lepton-pool-panel").start()
    return None
