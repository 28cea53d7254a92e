"""Telling a kernel restart from a shutdown, so a run it ends says which one ended it.

When a Jupyter kernel is restarted or shut down, its process exits and the runs it owned are
cancelled on the way out. The kernel alone knows whether the person asked for a restart: the
``restart`` flag of the ``shutdown_request`` it receives. We wrap its ``do_shutdown`` (the hook
ipykernel calls for that request) to hear it, and end our runs before the process goes.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("lepton_magic")

RESTARTED = "the kernel restarted while the run was going"
SHUT_DOWN = "the kernel was shut down while the run was going"
#: A plain Python process (a script, terminal IPython) that exits with runs going.
EXITED = "the Python process running it exited while the run was going"


def on_kernel_shutdown(shell, callback: Callable[[str], None]) -> bool:
    """Call ``callback(reason)`` when the kernel of ``shell`` is asked to restart or shut down;
    False when ``shell`` has no such kernel (terminal IPython)."""
    kernel = getattr(shell, "kernel", None)
    original = getattr(kernel, "do_shutdown", None)
    if original is None:
        return False
    if getattr(original, "_lepton_hook", False):
        return True

    def do_shutdown(restart, *args, **kwargs):
        try:
            callback(RESTARTED if restart else SHUT_DOWN)
        except Exception:  # whatever happens here, the kernel must still shut down
            log.exception("ending the runs of a kernel that shuts down failed")
        return original(restart, *args, **kwargs)

    do_shutdown._lepton_hook = True  # type: ignore[attr-defined]
    kernel.do_shutdown = do_shutdown
    return True
