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

from .errors import LeptonError, RemoteError  # noqa: E402
from .run import Run  # noqa: E402
from .session import Session, default_session  # noqa: E402


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "lepton_magic.server"}]


def _jupyter_labextension_paths() -> list[dict]:
    return [{"src": "labextension", "dest": "lepton-magic"}]


def session() -> Session:
    """The session of this process (the one the magics use)."""
    return default_session()


def last_run() -> Run | None:
    """The run this process started last, or else the newest run in the store."""
    return default_session().last_run()


def get_run(key: str) -> Run:
    """A run by id or name (the newest run of that name)."""
    return default_session().get_run(key)


def runs():
    """Every run in the store, newest first, as a DataFrame."""
    return default_session().runs()


def load_ipython_extension(ipython) -> None:
    from .magics import LeptonMagics

    try:
        session_ = default_session()
    except LeptonError as e:
        print(f"lepton_magic: {e}; using the default settings")
        session_ = default_session(defaults=True)
    ipython.register_magics(LeptonMagics(ipython, session_))
    from .ui import live

    if live.widgets_available(ipython) and live.await_lepton_cells not in ipython.input_transformers_post:
        # In a notebook a blocking %%lepton cell awaits its run, so the Cancel button works.
        ipython.input_transformers_post.append(live.await_lepton_cells)
    # Outputs of --async runs are bound before the next cell, never in the middle of one.
    ipython.events.register("pre_run_cell", lambda *args: session_.bind_pending())


def unload_ipython_extension(ipython) -> None:
    from .ui import live

    if live.await_lepton_cells in ipython.input_transformers_post:
        ipython.input_transformers_post.remove(live.await_lepton_cells)
    default_session().down()


__all__ = ["LeptonError", "RemoteError", "Run", "Session", "get_run", "last_run", "runs", "session"]
