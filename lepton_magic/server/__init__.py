"""Jupyter Server extension: REST over the store for the JupyterLab sidebar
(``{base_url}lepton/api/...``). Reads come from the store and never write to it; actions become
commands for the kernel that owns the pool or run. The server's Authorizer decides who may do
what, as for its own APIs: resource ``lepton``, ``read`` for GET, ``write`` for the actions."""

from __future__ import annotations

from ..store import Store
from .handlers import routes
from .manager import LeptonManager


def _load_jupyter_server_extension(serverapp) -> None:
    manager = LeptonManager(Store())
    web_app = serverapp.web_app
    web_app.add_handlers(".*$", routes(web_app.settings["base_url"], manager))
    serverapp.log.info("lepton_magic: REST API at %slepton/api/ over %s", web_app.settings["base_url"],
                       manager.store.path)


load_jupyter_server_extension = _load_jupyter_server_extension  # older jupyter_server names
