"""lepton_magic: run one Jupyter cell as a torch.distributed job on N nodes.

    %load_ext lepton_magic

    %%lepton --nodes 2
    lepton.init_distributed()
    ...

The Python API (DESIGN.md §3)::

    import lepton_magic as lm
    run = lm.last_run(); run.metrics; run.history; run.outputs; lm.runs()
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .errors import LeptonError, RemoteError  # noqa: E402

if TYPE_CHECKING:
    from .run import Run
    from .session import Session


def __getattr__(name: str):
    # The kernel side loads on first use: a node's agent imports this package too (for
    # lepton_magic.agent) and must not load the store, the session or their dependencies.
    if name == "Run":
        from .run import Run

        return Run
    if name == "Session":
        from . import session as module

        return getattr(module, name)
    raise AttributeError(f"module 'lepton_magic' has no attribute {name!r}")


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "lepton_magic.server"}]


def _jupyter_labextension_paths() -> list[dict]:
    return [{"src": "labextension", "dest": "lepton-magic"}]


def current_session() -> "Session":
    """The session of this process (the one the magics use). (Not ``session()``: that name is
    the module ``lepton_magic.session``.)"""
    from .session import default_session

    return default_session()


def last_run() -> "Run | None":
    """The run this process started last, or else the newest run in the store."""
    return current_session().last_run()


def get_run(key: str) -> "Run":
    """A run by id or name (the newest run of that name)."""
    return current_session().get_run(key)


def runs():
    """Every run in the store, newest first, as a DataFrame."""
    return current_session().runs()


def load_ipython_extension(ipython) -> None:
    from .magics import LeptonMagics
    from .session import default_session

    try:
        session_ = default_session()
    except LeptonError as e:
        print(f"lepton_magic: {e}; using the default settings")
        session_ = default_session(defaults=True)
    ipython.register_magics(LeptonMagics(ipython, session_))
    from .kernel_shutdown import on_kernel_shutdown

    on_kernel_shutdown(ipython, session_.close)
    from .ui import live

    if live.widgets_available(ipython):
        live.prefetch_panel()
        if live.await_lepton_cells not in ipython.input_transformers_post:
            # In a notebook a blocking %%lepton cell awaits its run, so the Cancel button works.
            ipython.input_transformers_post.append(live.await_lepton_cells)
    # Outputs of --async runs are bound before the next cell, never in the middle of one.
    ipython.events.register("pre_run_cell", lambda *args: session_.bind_pending())


def unload_ipython_extension(ipython) -> None:
    from .ui import live

    if live.await_lepton_cells in ipython.input_transformers_post:
        ipython.input_transformers_post.remove(live.await_lepton_cells)
    current_session().down()


__all__ = ["LeptonError", "RemoteError", "Run", "Session", "current_session", "get_run", "last_run", "runs"]
