"""Thin, authenticated REST handlers: parse, call the manager, answer JSON."""

from __future__ import annotations

import json

from jupyter_server.base.handlers import APIHandler
from tornado import web

from .manager import Conflict, LeptonManager, NotFound


class _Base(APIHandler):
    def initialize(self, manager: LeptonManager) -> None:
        self.manager = manager

    def answer(self, call, *args, status: int = 200, wrap: str | None = None):
        try:
            result = call(*args)
        except NotFound as e:
            raise web.HTTPError(404, str(e)) from None
        except Conflict as e:
            raise web.HTTPError(409, str(e)) from None
        self.set_status(status)
        self.finish(json.dumps({wrap: result} if wrap else result))


class PoolsHandler(_Base):
    @web.authenticated
    def get(self):
        show_all = self.get_query_argument("all", "0")
        if show_all not in ("0", "1"):
            raise web.HTTPError(400, "all takes 0 or 1")
        self.answer(self.manager.pools, show_all == "1", wrap="pools")


class RunsHandler(_Base):
    @web.authenticated
    def get(self):
        raw = self.get_query_argument("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise web.HTTPError(400, f"limit takes a whole number from 1 to 1000, got {raw!r}")
        self.answer(self.manager.runs, int(raw), wrap="runs")


class RunHandler(_Base):
    @web.authenticated
    def get(self, key: str):
        self.answer(self.manager.run, key)


class RunCancelHandler(_Base):
    @web.authenticated
    def post(self, key: str):
        self.answer(lambda k: {"command": self.manager.cancel_run(k)}, key, status=202)


class PoolReleaseHandler(_Base):
    @web.authenticated
    def post(self, pool: str, node: str | None = None):
        self.answer(lambda p, n: {"command": self.manager.release_pool(p, n)}, pool, node, status=202)


class CommandHandler(_Base):
    @web.authenticated
    def get(self, command: str):
        self.answer(self.manager.command, int(command))


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
        (api + r"commands/(\d+)", CommandHandler, args),
    ]
