"""Spot interruption notices: the agent's watch on the instance metadata service (IMDSv2).

AWS gives a spot instance about two minutes' notice before it reclaims it, as a document at
``/latest/meta-data/spot/instance-action`` (404 until then). A thread polls it, because an HTTP
call may hang and the agent's selector loop must never wait on one; the thread hands each new
notice to the loop through a pipe the loop selects on. The agent forks only before this thread
exists (its zygotes), so no child ever inherits it.

The backends decide whether a node watches (:func:`metadata_url`) and pass the endpoint on the
agent's command line; the node side uses only the standard library.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

DEFAULT_METADATA_URL = "http://169.254.169.254"
#: AWS posts the notice two minutes ahead: every 5 s leaves the cell most of them.
POLL_SECONDS = 5.0
#: Each HTTP call; the metadata service answers in milliseconds when it is there at all.
REQUEST_TIMEOUT_SECONDS = 2.0
TOKEN_TTL_SECONDS = 21600
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"


def metadata_url(settings: dict, on_spot: bool = False) -> str | None:
    """The endpoint a node's agent polls, or None where there is nothing to watch: on when the
    node is a spot instance or the ``spot_watch`` setting says so."""
    if not (on_spot or settings.get("spot_watch")):
        return None
    return settings.get("spot_metadata_url") or DEFAULT_METADATA_URL


def agent_arguments(url: str | None) -> list[str]:
    """What a backend adds to ``python -m lepton_magic.agent`` for this endpoint."""
    return ["--spot-metadata", url] if url else []


class MetadataClient:
    """IMDSv2: a session token (PUT), then the notice (GET) with it. No proxy: the service is
    link-local, and a proxy from the environment must not see (or stall) these calls."""

    def __init__(self, base_url: str, timeout: float = REQUEST_TIMEOUT_SECONDS):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the spot metadata endpoint must be an http:// URL, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def notice(self) -> dict | None:
        """The interruption notice, or None when there is none. Raises OSError (or ValueError for
        a body that is not a notice) when the service cannot say."""
        status, body = self._get_notice()
        if status == 401:  # the token expired early (the service restarted): one more try
            self._token = None
            status, body = self._get_notice()
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"the metadata service answered {status}")
        notice = json.loads(body)
        if not isinstance(notice, dict) or "action" not in notice:
            raise ValueError(f"not an interruption notice: {body[:200]!r}")
        return {"action": str(notice["action"]), "time": str(notice.get("time", ""))}

    def _get_notice(self) -> tuple[int, bytes]:
        return self._request("GET", NOTICE_PATH, {"X-aws-ec2-metadata-token": self._session_token()})

    def _session_token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, body = self._request("PUT", TOKEN_PATH,
                                         {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)})
            if status != 200:
                raise OSError(f"the metadata service refused a token ({status})")
            self._token = body.decode("ascii", errors="replace").strip()
            self._token_expires = time.monotonic() + TOKEN_TTL_SECONDS / 2
        return self._token

    def _request(self, method: str, path: str, headers: dict) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(1 << 16)
        finally:
            conn.close()


class SpotWatcher:
    """Polls in a daemon thread; each notice that differs from the last one (AWS repeats it on
    every poll until the end) becomes one line in a pipe: select on :meth:`fileno`, then
    :meth:`take`. Any failure counts as no notice, logged once until a poll succeeds again."""

    def __init__(self, base_url: str, interval: float = POLL_SECONDS, log_prefix: str = "lepton agent"):
        self.client = MetadataClient(base_url)
        self.interval = interval
        self.log_prefix = log_prefix
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._last: dict | None = None
        self._failing = False
        self._unread = b""

    def fileno(self) -> int:
        return self._read_fd

    def start(self) -> None:
        threading.Thread(target=self._poll_forever, name="lepton-spot-watch", daemon=True).start()

    def take(self) -> list[dict]:
        """The notices that arrived since the last call (never blocks)."""
        try:
            self._unread += os.read(self._read_fd, 1 << 16)
        except BlockingIOError:
            pass
        *lines, self._unread = self._unread.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def _poll_forever(self) -> None:
        while True:
            notice = self._poll_once()
            if notice is not None and notice != self._last:
                self._last = notice
                os.write(self._write_fd, json.dumps(notice).encode() + b"\n")  # a few bytes: atomic
            time.sleep(self.interval)

    def _poll_once(self) -> dict | None:
        try:
            notice = self.client.notice()
        except Exception as e:  # absent, hung, refusing, garbled: as if no notice were posted
            if not self._failing:
                self._failing = True
                print(f"{self.log_prefix}: cannot read spot notices from the instance metadata "
                      f"({type(e).__name__}: {e}); treating that as no notice", file=sys.stderr, flush=True)
            return None
        if self._failing:
            self._failing = False
            print(f"{self.log_prefix}: the instance metadata answers again", file=sys.stderr, flush=True)
        return notice
