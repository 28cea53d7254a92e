"""Framed, authenticated messages between the kernel, the node agents and the ranks.

A frame is a fixed header followed by a msgpack body::

    b"LM" | version (1 byte) | flags (1 byte) | body length (8 bytes, big endian)
          | HMAC-SHA256(secret, body) (32 bytes) | body

Every frame is signed with the pool's secret, the way Jupyter signs its own messages, and a
frame that fails verification is dropped (and logged) before its body is decoded, so nothing
from an unauthenticated peer is ever unpickled. User values travel as cloudpickle bytes inside
the msgpack body; everything else is plain msgpack.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
from typing import Iterator

import msgpack

VERSION = 1
MAGIC = b"LM"
_HEADER = struct.Struct(">2sBBQ32s")
HEADER_SIZE = _HEADER.size
SECRET_SIZE = 32
#: Refuse absurd lengths before allocating: a corrupted header must not eat the memory.
MAX_BODY = 1 << 36

log = logging.getLogger("lepton_magic.protocol")


class ProtocolError(Exception):
    """The byte stream is not a stream of lepton frames (wrong magic or version)."""


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def encode(secret: bytes, message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(MAGIC, VERSION, 0, len(body), sign(secret, body)) + body


def encode_parts(secret: bytes, message: dict) -> tuple[bytes, bytes]:
    """Header and body separately, so a large body is written without another copy."""
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(MAGIC, VERSION, 0, len(body), sign(secret, body)), body


def decode_body(body: bytes | memoryview) -> dict:
    return msgpack.unpackb(body, raw=False)


def write_all(fd: int, *parts: bytes) -> None:
    """Write every byte of ``parts`` to ``fd`` (a pipe or socket), retrying short writes."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


class FrameWriter:
    """Thread-safe sender of signed frames to one file descriptor."""

    def __init__(self, fd: int, secret: bytes):
        self.fd = fd
        self.secret = secret
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        header, body = encode_parts(self.secret, message)
        with self._lock:
            write_all(self.fd, header, body)

    def send_frame(self, frame: bytes) -> None:
        """Forward a frame that is already encoded and signed (agents relay rank frames)."""
        with self._lock:
            write_all(self.fd, frame)


class FrameSplitter:
    """Incremental parser: feed bytes as they arrive, get whole frames back.

    ``frames()`` yields ``(header_and_body_bytes, body_view, mac)`` without verifying, for relays;
    ``messages()`` verifies each frame with the secret and yields decoded bodies.
    """

    def __init__(self, secret: bytes | None = None, source: str = "peer"):
        self.secret = secret
        self.source = source
        self.rejected = 0
        self._buf = bytearray()
        self._chunks: list[bytes] = []
        self._need = 0  # bytes still missing for the pending large frame, 0 when none

    def feed(self, data: bytes) -> None:
        if self._need:
            self._chunks.append(data)
            self._need -= len(data)
            if self._need <= 0:
                self._buf += b"".join(self._chunks)
                self._chunks.clear()
                self._need = 0
        else:
            self._buf += data

    def frames(self) -> Iterator[tuple[bytes, memoryview, bytes]]:
        if self._need:
            return
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                magic, version, _flags, length, mac = _HEADER.unpack_from(buf, pos)
                if magic != MAGIC:
                    raise ProtocolError(f"not a lepton frame from {self.source} (bad magic {bytes(magic)!r})")
                if version != VERSION:
                    raise ProtocolError(
                        f"{self.source} speaks lepton protocol version {version}, this side speaks {VERSION}"
                    )
                if length > MAX_BODY:
                    raise ProtocolError(f"frame of {length} bytes from {self.source} is too large")
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    # Collect the rest of a large frame as chunks: appending to a bytearray
                    # byte by byte would copy it again and again.
                    self._need = end - len(buf)
                    break
                frame = bytes(buf[pos:end])
                pos = end
                yield frame, memoryview(frame)[HEADER_SIZE:], mac
        finally:
            del buf[:pos]

    def messages(self) -> Iterator[dict]:
        assert self.secret is not None
        for _frame, body, mac in self.frames():
            if not hmac.compare_digest(sign(self.secret, body), mac):
                self.rejected += 1
                log.warning("dropped a frame from %s that failed HMAC verification", self.source)
                continue
            yield decode_body(body)


class FrameReader:
    """Blocking reader of verified messages from one file descriptor."""

    def __init__(self, fd: int, secret: bytes, source: str = "peer", chunk: int = 1 << 20):
        self.fd = fd
        self.splitter = FrameSplitter(secret, source)
        self.chunk = chunk
        self._pending: list[dict] = []

    @property
    def rejected(self) -> int:
        return self.splitter.rejected

    def __iter__(self) -> Iterator[dict]:
        while True:
            message = self.read()
            if message is None:
                return
            yield message

    def read(self) -> dict | None:
        """The next verified message, or None at end of stream."""
        while not self._pending:
            data = os.read(self.fd, self.chunk)
            if not data:
                return None
            self.splitter.feed(data)
            self._pending.extend(self.splitter.messages())
        return self._pending.pop(0)


def read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = os.read(fd, n - len(out))
        if not data:
            raise EOFError("stream closed")
        out += data
    return bytes(out)


__all__ = [
    "VERSION",
    "FrameReader",
    "FrameSplitter",
    "FrameWriter",
    "ProtocolError",
    "decode_body",
    "encode",
    "new_secret",
    "read_exact",
    "sign",
]

