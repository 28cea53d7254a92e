"""What runs on a node: the agent (one per node), its torch-preloaded zygote, and the ranks.

Nothing here imports IPython. The kernel starts ``python -m lepton_magic.agent`` through a
backend and talks to it over the agent's stdin/stdout with :mod:`lepton_magic.protocol` frames.
"""

import os as _os
import sys as _sys

# Run from the ssh backend's zip, the agent's dependencies (msgpack, cloudpickle, pynvml) come
# with it, pure Python, in the zip's lepton_deps/ (see backends/ssh.py package_zip): last on the
# path, so a host's own installed copies (msgpack's C extension) win.
_deps = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                      "lepton_deps")
if ".zip" in _deps and _deps not in _sys.path:
    _sys.path.append(_deps)
