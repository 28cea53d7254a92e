"""Showing a run while it goes: the widget panel where a Jupyter frontend is attached, the text
progress line elsewhere. Blocking runs are followed on the cell's own thread (processing widget
events meanwhile, so Cancel works); --async runs and attached runs by a background thread."""

from __future__ import annotations

import contextlib
import threading
import time

from ..run import Run
from .model import RunView
from .panel import PoolPanel, RunPanel, widgets_available
from .progress import TextProgress

#: How often a background follower looks at the store.
POLL_SECONDS = 0.25


def follow_blocking(run: Run, shell, status_line: bool = True) -> None:
    """Show the run until it ends. Ctrl-C (or any other interruption) cancels it first."""
    if not widgets_available(shell):
        progress = TextProgress(run, status_line=status_line)
        _wait(run, progress.tick, progress.finish)
        return
    from IPython.display import Image, display

    panel = RunPanel(RunView(run._store, run.seq, follow=run._live is not None), on_cancel=run.cancel)
    panel.update(force=True)
    handle = display(panel.widget, display_id=True)
    with _widget_events() as poll:
        def tick():
            poll(20)  # a click on Cancel arrives as a comm message on the busy shell channel
            panel.update()

        def finish():
            panel.update(force=True)
            if handle is not None:  # the same widget, with the final text for frontends without widgets
                handle.update(panel.widget)
            print(TextProgress(run).summary_text())
            png = panel.static_png()
            if png:
                display(Image(png))

        _wait(run, tick, finish)


def follow_in_background(run: Run, shell) -> threading.Thread | None:
    """Show a live panel for a run that the cell does not wait for; returns the follower."""
    if not widgets_available(shell):
        return None
    from IPython.display import Image, display

    panel = RunPanel(RunView(run._store, run.seq, follow=run._live is not None), on_cancel=run.cancel)
    panel.update(force=True)
    panel_handle = display(panel.widget, display_id=True)
    # The final PNG lands in this cell's output even if another cell runs by then.
    handle = display({"text/plain": ""}, raw=True, display_id=True)

    def loop():
        while not panel.view.finished:
            time.sleep(POLL_SECONDS)
            try:
                panel.update()
            except Exception:
                return
        png = panel.static_png()
        if panel_handle is not None:
            panel_handle.update(panel.widget)
        if png and handle is not None:
            handle.update(Image(png))

    thread = threading.Thread(target=loop, daemon=True, name=f"lepton-panel-{run.name}")
    thread.start()
    return thread


def show(run: Run, shell) -> None:
    """The panel of any run (finished ones frozen), or its text summary without a frontend."""
    if not widgets_available(shell):
        print(TextProgress(run).summary_text())
        return
    if run.status in ("succeeded", "failed", "cancelled"):
        from IPython.display import display

        panel = RunPanel(RunView(run._store, run.seq))
        panel.update(force=True)
        display(panel.widget)
        return
    follow_in_background(run, shell)


def _wait(run: Run, tick, finish) -> None:
    live = run._live
    try:
        while not (live.wait(0.05) if live is not None else run.status in ("succeeded", "failed", "cancelled")):
            tick()
            if live is None:
                time.sleep(POLL_SECONDS)
    except BaseException:
        run.cancel()
        print(f"\ncancelling {run.name} …", flush=True)
        if live is not None:
            live.wait(10)
        finish()
        raise
    finish()


@contextlib.contextmanager
def _widget_events():
    """``poll(n)`` handles up to n pending frontend events from inside a running cell."""
    try:
        from jupyter_ui_poll import ui_events
    except ImportError:
        yield lambda n: None
        return
    try:
        manager = ui_events()
        poll = manager.__enter__()
    except Exception:  # not a kernel jupyter-ui-poll knows: the button then works after the cell
        yield lambda n: None
        return
    try:
        yield poll
    finally:
        manager.__exit__(None, None, None)


def show_pool(session, shell):
    """``%lepton status``: the pool's nodes, live, as a panel; a DataFrame without a frontend."""
    if not widgets_available(shell):
        return session.nodes()
    from IPython.display import display

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
