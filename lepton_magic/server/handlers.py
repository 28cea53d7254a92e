"""Thin REST handlers: authenticate, authorize, parse, call the manager off the Tornado loop,
answer JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.ioloop import IOLoop

from .manager import Conflict, LeptonManager, NotFound

#: The resource the server's Authorizer is asked about: "read" for GET, "write" for the actions
#: (POST), as jupyter_server derives them; so JupyterHub roles and read-only sharing apply here.
AUTH_RESOURCE = "lepton"
RUNS_LIMIT = (1, 1000)
#: Command ids are SQLite INTEGER primary keys.
COMMAND_IDS = (1, 2**63 - 1)

# The store is read here, not on the Tornado loop: a read waiting on another process's write
# lock (busy timeout 30 s) must stall only itself, not the whole Jupyter server. Two threads are
# plenty: the store has one connection, so more would only queue on its lock.
_STORE_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lepton-api")


class _Base(APIHandler):
    auth_resource = AUTH_RESOURCE

    def initialize(self, manager: LeptonManager) -> None:
        self.manager = manager

    async def answer(self, call, *args, status: int = 200, wrap: str | None = None) -> None:
        try:
            body = await IOLoop.current().run_in_executor(_STORE_THREADS, _as_json, call, args, wrap)
        except NotFound as e:
            raise web.HTTPError(404, str(e)) from None
        except Conflict as e:
            raise web.HTTPError(409, str(e)) from None
        self.set_status(status)
        self.finish(body)


def _as_json(call, args: tuple, wrap: str | None) -> str:
    result = call(*args)
    return json.dumps({wrap: result} if wrap else result)


def whole_number(raw: str, what: str, low: int, high: int) -> int:
    """``raw`` as an int in [low, high], or a 400 that says what is accepted."""
    # ASCII only: str.isdigit() also takes '²' (which int() refuses) and '٣' (which it reads as 3).
    # The length check comes first: int() refuses strings of more than 4300 digits.
    if raw.isascii() and raw.isdigit() and len(raw) <= len(str(high)) and low <= int(raw) <= high:
        return int(raw)
    shown = raw if len(raw) <= 24 else raw[:20] + "…"
    raise web.HTTPError(400, f"{what} must be a whole number from {low} to {high} in ASCII digits, "
                             f"not {shown!r}")


class PoolsHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self):
        show_all = self.get_query_argument("all", "0")
        if show_all not in ("0", "1"):
            raise web.HTTPError(400, f"all must be 0 or 1, not {show_all[:24]!r}")
        await self.answer(self.manager.pools, show_all == "1", wrap="pools")


class RunsHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self):
        limit = whole_number(self.get_query_argument("limit", "50"), "limit", *RUNS_LIMIT)
        await self.answer(self.manager.runs, limit, wrap="runs")


class RunHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self, key: str):
        await self.answer(self.manager.run, key)


class RunCancelHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self, key: str):
        await self.answer(lambda k: {"command": self.manager.cancel_run(k)}, key, status=202)


class PoolReleaseHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self, pool: str, node: str | None = None):
        await self.answer(lambda p, n: {"command": self.manager.release_pool(p, n)}, pool, node, status=202)


class CommandHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self, command: str):
        await self.answer(self.manager.command, whole_number(command, "a command id", *COMMAND_IDS))


ID = r"([A-Za-z0-9_.\-]+)"


def routes(base: str, manager: LeptonManager) -> list:
    api = base.rstrip("/") + "/lepton/api/"
    args = {"manager": manager}
    return [
        (api + "pools", PoolsHandler, args),
        (api + f"pools/{ID}/release", PoolReleaseHandler, args),
        (api + f"pools/{ID}/nodes/{ID}/release", PoolReleaseHandler, args),
        (api + "runs", RunsHandler, args),
        (api + f"runs/{ID}", RunHandler, args),
        (api + f"runs/{ID}/cancel", RunCancelHandler, args),
        # Any segment, so a malformed id gets a 400 that says what an id is, not a bare 404.
        (api + r"commands/([^/]+)", CommandHandler, args),
    ]
