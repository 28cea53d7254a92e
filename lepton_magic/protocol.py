"""Framed, authenticated messages between the kernel, the node agents and the ranks.

A frame is a fixed header, a msgpack body, then optional raw buffers::

    b"LM" | version (1) | flags (1) | meta length (4) | body length (8) | HMAC-SHA256 (32)
    | msgpack meta | buffer 0 | buffer 1 | ...

The body is the meta plus the buffers; the HMAC, keyed with the pool's secret the way Jupyter
signs its messages, covers all of it. A frame that fails verification is dropped (and logged)
before anything in it is decoded, so nothing from an unauthenticated peer is ever unpickled.

Large payloads (pickled user values, with pickle protocol 5's out-of-band buffers) travel as
raw buffers: a message's ``"_buffers"`` list is written as is, never copied into msgpack, and
comes back as memoryviews over one received bytearray.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
from typing import Iterator, Sequence

import msgpack

VERSION = 1
MAGIC = b"LM"
_HEADER = struct.Struct(">2sBBIQ32s")
HEADER_SIZE = _HEADER.size
SECRET_SIZE = 32
#: Refuse absurd lengths before allocating: a corrupted header must not eat the memory.
MAX_BODY = 1 << 36
#: Bodies from this size are hashed in parallel chunks of HASH_CHUNK bytes.
PARALLEL_HASH_MIN = 8 << 20
HASH_CHUNK = 4 << 20
#: Bodies above this are received straight into their own buffer instead of the rolling one.
LARGE_BODY = 1 << 20

log = logging.getLogger("lepton_magic.protocol")

Buffer = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """The byte stream is not a stream of lepton frames (wrong magic or version)."""


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def _mac(secret: bytes, parts: Sequence[Buffer]) -> bytes:
    """HMAC-SHA256 of the body. A large body is hashed as SHA-256 digests of 4 MiB chunks on
    threads (hashlib releases the GIL), and the HMAC taken over those digests in order: the
    same strength, at the speed of every core instead of one."""
    total = sum(memoryview(p).nbytes for p in parts)
    h = hmac.new(secret, digestmod=hashlib.sha256)
    if total < PARALLEL_HASH_MIN:
        for part in parts:
            h.update(part)
        return h.digest()
    # Chunks sit at fixed offsets of the body, wherever the parts happen to be split.
    chunks: list[list[memoryview]] = [[]]
    room = HASH_CHUNK
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            take = view[:room]
            chunks[-1].append(take)
            view = view[take.nbytes:]
            room -= take.nbytes
            if room == 0:
                chunks.append([])
                room = HASH_CHUNK
    h.update(total.to_bytes(8, "big"))
    for digest in _hash_pool().map(_sha256, chunks):
        h.update(digest)
    return h.digest()


def _sha256(slices: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for piece in slices:
        h.update(piece)
    return h.digest()


_pool = None
# A forked child inherits the executor but none of its threads: it must make its own.
os.register_at_fork(after_in_child=lambda: globals().update(_pool=None))


def _hash_pool():
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                   thread_name_prefix="lepton-hash")
    return _pool


#: Header flag: the sender's last frame for this job (a result or an error).
FINAL = 0x01


def encode_parts(secret: bytes, message: dict, flags: int = 0) -> list[Buffer]:
    """Header, meta and buffers of one frame, ready for ``os.writev`` (no joining copy)."""
    buffers = message.get("_buffers") or []
    if buffers:
        message = {k: v for k, v in message.items() if k != "_buffers"}
        buffers = [memoryview(b).cast("B") for b in buffers]
        message["_lens"] = [b.nbytes for b in buffers]
    meta = msgpack.packb(message, use_bin_type=True)
    parts: list[Buffer] = [meta, *buffers]
    body_len = len(meta) + sum(b.nbytes for b in buffers)
    header = _HEADER.pack(MAGIC, VERSION, flags, len(meta), body_len, _mac(secret, parts))
    return [header, *parts]


def encode(secret: bytes, message: dict) -> bytes:
    return b"".join(bytes(p) for p in encode_parts(secret, message))


def decode_body(meta_len: int, body: Buffer) -> dict:
    view = memoryview(body)
    message = msgpack.unpackb(view[:meta_len], raw=False)
    lens = message.pop("_lens", None)
    if lens:
        buffers, pos = [], meta_len
        for n in lens:
            buffers.append(view[pos:pos + n])
            pos += n
        message["_buffers"] = buffers
    return message


def write_all(fd: int, *parts: Buffer) -> None:
    """Write every byte of ``parts`` to ``fd`` (a pipe or socket), retrying short writes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:512])
        while n and views:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
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

    def send(self, message: dict, final: bool = False) -> None:
        parts = encode_parts(self.secret, message, FINAL if final else 0)
        with self._lock:
            write_all(self.fd, *parts)

    def send_frame(self, *parts: Buffer) -> None:
        """Forward a frame that is already encoded and signed (agents relay rank frames)."""
        with self._lock:
            write_all(self.fd, *parts)


class Frame:
    """One received frame, not yet verified."""

    __slots__ = ("header", "body", "meta_len", "mac")

    def __init__(self, header: bytes, body: bytearray, meta_len: int, mac: bytes):
        self.header = header
        self.body = body
        self.meta_len = meta_len
        self.mac = mac

    def verify(self, secret: bytes) -> bool:
        return hmac.compare_digest(_mac(secret, [self.body]), self.mac)

    def decode(self) -> dict:
        return decode_body(self.meta_len, self.body)

    @property
    def final(self) -> bool:
        return bool(self.header[3] & FINAL)


class FrameSplitter:
    """Incremental parser: give it bytes as they arrive, get whole frames back.

    A large body is received straight into a bytearray of its own: ``want()`` returns the part
    still empty, to be filled with ``readinto``/``recv_into`` and confirmed with ``filled(n)``.
    """

    def __init__(self, secret: bytes | None = None, source: str = "peer"):
        self.secret = secret
        self.source = source
        self.rejected = 0
        self._buf = bytearray()
        self._large: Frame | None = None
        self._large_filled = 0
        self._ready: list[Frame] = []

    def want(self) -> memoryview | None:
        if self._large is None:
            return None
        return memoryview(self._large.body)[self._large_filled:]

    def filled(self, n: int) -> None:
        assert self._large is not None
        self._large_filled += n
        if self._large_filled == len(self._large.body):
            self._ready.append(self._large)
            self._large = None
            self._parse()

    def feed(self, data: Buffer) -> None:
        view = memoryview(data)
        while len(view):
            target = self.want()
            if target is None:
                self._buf += view
                self._parse()
                return
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self.filled(n)

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while self._large is None and len(buf) - pos >= HEADER_SIZE:
            magic, version, _flags, meta_len, length, mac = _HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ProtocolError(f"not a lepton frame from {self.source} (bad magic {bytes(magic)!r})")
            if version != VERSION:
                raise ProtocolError(
                    f"{self.source} speaks lepton protocol version {version}, this side speaks {VERSION}"
                )
            if length > MAX_BODY or meta_len > length:
                raise ProtocolError(f"frame of {length} bytes from {self.source} is malformed or too large")
            header = bytes(buf[pos:pos + HEADER_SIZE])
            start = pos + HEADER_SIZE
            available = len(buf) - start
            if length > LARGE_BODY and available < length:
                body = bytearray(length)
                body[:available] = buf[start:]
                self._large = Frame(header, body, meta_len, mac)
                self._large_filled = available
                pos = len(buf)
                break
            if available < length:
                break
            self._ready.append(Frame(header, bytearray(buf[start:start + length]), meta_len, mac))
            pos = start + length
        del buf[:pos]

    def frames(self) -> Iterator[Frame]:
        while self._ready:
            yield self._ready.pop(0)

    def messages(self) -> Iterator[dict]:
        assert self.secret is not None
        for frame in self.frames():
            if not frame.verify(self.secret):
                self.rejected += 1
                log.warning("dropped a frame from %s that failed HMAC verification", self.source)
                continue
            yield frame.decode()


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
            target = self.splitter.want()
            if target is not None:
                n = os.readv(self.fd, [target])
                if not n:
                    return None
                self.splitter.filled(n)
            else:
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
