"""Framed, authenticated messages between the kernel, the node agents and the ranks.

A message travels as one or more frames, each a fixed header and a body of at most
MAX_FRAME_BODY bytes::

    b"LM" | version (1) | flags (1) | channel (16) | sender (4) | sequence (8) | body length (4)
    | body MAC (32) | header MAC (32) | body

Both MACs are HMAC-SHA256 under the sender's key, each over its own domain byte first: the
header MAC covers every header field before it (the body MAC included, so it vouches for the
body too), the body MAC the body (plain, or, from PARALLEL_HASH_MIN bytes, over the SHA-256 of
fixed chunks hashed on threads). The header is checked before any body is allocated; the body
before anything in it is decoded, so nothing from a peer without the key is ever unpickled.

Keys: the kernel gives each agent a key of its own (derived from the pool secret); a run's ranks
on a node sign with that run's key (derived from the node's); the agent and a rank share a key
of their control socket. The *channel* says whose key signed a frame: "" for the two ends of a
link, else the run id of a rank's frame, whose *sender* is the rank. Each sender numbers its
frames from 1; a receiver drops a frame whose number is not above the last one it took from that
channel and sender (a replay, or out of order).

The message body is its msgpack meta's length (8), the meta, then the raw buffers: a message's
``"_buffers"`` list is written as is, never copied into msgpack, and comes back as memoryviews
over one received bytearray. A body larger than a frame goes on in the sender's next frames
(flags MORE, then CONT), which the receiver joins.

What a receiver does with bad input: a frame that fails verification, repeats a sequence number
or does not decode is dropped with one log line; bytes that are not an authentic header are
skipped, with one log line, up to the next authentic header (the stream resynchronises). A
stream whose first bytes are not a frame of this protocol version cannot be read at all: that
raises ProtocolError, which ends the link. So does a frame its sender broke off half-way
(an interrupted write): it swallows what follows up to its length, which is why the kernel stops
an agent it interrupted mid-frame (``NodeLink.broken``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
from collections import deque
from typing import Callable, Iterator, Sequence

import msgpack

VERSION = 2
MAGIC = b"LM"
_HEADER = struct.Struct(">2sBB16sIQI32s32s")
HEADER_SIZE = _HEADER.size
_SIGNED_HEADER = HEADER_SIZE - 32  # everything but the header MAC
_FRAME_START = MAGIC + bytes([VERSION])
CHANNEL_SIZE = 16
KEY_SIZE = 32
#: A frame's body is at most this long (larger messages take several frames), so no receiver
#: ever holds more than one frame of a message it has not verified.
MAX_FRAME_BODY = 16 << 20
#: Bodies from this size are hashed in parallel chunks of HASH_CHUNK bytes.
PARALLEL_HASH_MIN = 8 << 20
HASH_CHUNK = 4 << 20
#: Bodies above this are received straight into their own buffer instead of the rolling one.
LARGE_BODY = 1 << 20

#: Header flags. FINAL: the sender's last frame for this job (a result or an error).
FINAL = 0x01
#: The message goes on in the sender's next frame.
MORE = 0x02
#: This frame goes on with the message of the sender's previous frame.
CONT = 0x04

# Each MAC input starts with its own byte, so no input of one kind can pass for another.
_DOMAIN_HEADER, _DOMAIN_PLAIN, _DOMAIN_CHUNKED = b"H", b"P", b"C"

log = logging.getLogger("lepton_magic.protocol")

Buffer = bytes | bytearray | memoryview
#: The key a channel's frames are signed with, or None for a channel this side does not accept.
Keyring = Callable[[str], "bytes | None"]


class ProtocolError(Exception):
    """The byte stream is not a stream of lepton frames of this version: the link cannot be used."""


def new_secret() -> bytes:
    return os.urandom(KEY_SIZE)


# --- keys --------------------------------------------------------------------------------------
def derive_key(secret: bytes, info: bytes, salt: bytes = b"") -> bytes:
    """HKDF-SHA256 (RFC 5869), one block: a key for the purpose ``info`` names that reveals
    nothing of ``secret`` or of the keys derived from it for other purposes."""
    pseudo_random = hmac.new(salt or bytes(32), secret, hashlib.sha256).digest()
    return hmac.new(pseudo_random, info + b"\x01", hashlib.sha256).digest()


def node_key(pool_secret: bytes, node: str, salt: bytes) -> bytes:
    return derive_key(pool_secret, f"lepton node {node}".encode(), salt)


def run_key(node_key: bytes, run: str) -> bytes:
    """What the ranks of ``run`` on one node sign with: the agent hands it to them, the kernel
    derives it again to verify them."""
    return derive_key(node_key, f"lepton run {run}".encode())


# --- MACs --------------------------------------------------------------------------------------
def _header_mac(key: bytes, signed_header: Buffer) -> bytes:
    return hmac.new(key, _DOMAIN_HEADER + bytes(signed_header), hashlib.sha256).digest()


def _body_mac(key: bytes, parts: Sequence[Buffer]) -> bytes:
    """HMAC-SHA256 of the body. A large body is hashed as SHA-256 digests of fixed chunks on
    threads (hashlib releases the GIL), and the HMAC taken over those digests in order: the
    same strength, at the speed of every core instead of one."""
    total = sum(memoryview(p).nbytes for p in parts)
    if total < PARALLEL_HASH_MIN:
        h = hmac.new(key, _DOMAIN_PLAIN, hashlib.sha256)
        for part in parts:
            h.update(part)
        return h.digest()
    h = hmac.new(key, _DOMAIN_CHUNKED + total.to_bytes(8, "big"), hashlib.sha256)
    for digest in _hash_pool().map(_sha256, _slices(parts, HASH_CHUNK)):
        h.update(digest)
    return h.digest()


def _slices(parts: Sequence[Buffer], size: int) -> list[list[memoryview]]:
    """``parts`` cut at fixed offsets of their concatenation, wherever the parts are split."""
    chunks: list[list[memoryview]] = [[]]
    room = size
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            take = view[:room]
            chunks[-1].append(take)
            view = view[take.nbytes:]
            room -= take.nbytes
            if room == 0:
                chunks.append([])
                room = size
    return [c for c in chunks if c]


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


# --- sending -----------------------------------------------------------------------------------
def _channel_field(channel: str) -> bytes:
    raw = channel.encode("ascii")
    if len(raw) > CHANNEL_SIZE:
        raise ValueError(f"channel {channel!r} is longer than {CHANNEL_SIZE} bytes")
    return raw.ljust(CHANNEL_SIZE, b"\0")


def _message_body(message: dict) -> list[Buffer]:
    """The parts of a message's body: meta length, msgpack meta, raw buffers (no joining copy)."""
    buffers = message.get("_buffers") or []
    if buffers:
        message = {k: v for k, v in message.items() if k != "_buffers"}
        buffers = [memoryview(b).cast("B") for b in buffers]
        message["_lens"] = [b.nbytes for b in buffers]
    meta = msgpack.packb(message, use_bin_type=True)
    return [len(meta).to_bytes(8, "big"), meta, *buffers]


class FrameSigner:
    """Cuts one sender's messages into frames and signs them: its key, its channel, its sender
    number and its next sequence number."""

    def __init__(self, key: bytes, channel: str = "", sender: int = 0, first_seq: int = 1):
        self.key = key
        self.channel = _channel_field(channel)
        self.sender = sender
        self.next_seq = first_seq

    def frames(self, message: dict, final: bool = False) -> Iterator[list[Buffer]]:
        """Each frame's header and body parts, ready for ``os.writev``; numbered as they are made,
        so frames must go out in the order they come from here."""
        bodies = _slices(_message_body(message), MAX_FRAME_BODY)
        for i, body in enumerate(bodies):
            last = i == len(bodies) - 1
            flags = (CONT if i else 0) | (0 if last else MORE) | (FINAL if final and last else 0)
            yield [self._header(flags, body), *body]

    def _header(self, flags: int, body: list[memoryview]) -> bytes:
        length = sum(p.nbytes for p in body)
        signed = _HEADER.pack(MAGIC, VERSION, flags, self.channel, self.sender, self.next_seq, length,
                              _body_mac(self.key, body), bytes(32))[:_SIGNED_HEADER]
        self.next_seq += 1
        return signed + _header_mac(self.key, signed)


def encode(key: bytes, message: dict, seq: int = 1, channel: str = "", sender: int = 0) -> bytes:
    """One message as bytes, numbered from ``seq`` (tests, and peers that send one message)."""
    signer = FrameSigner(key, channel, sender, seq)
    return b"".join(bytes(p) for parts in signer.frames(message) for p in parts)


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
    """Thread-safe sender of one sender's signed frames to one file descriptor."""

    def __init__(self, fd: int, key: bytes, channel: str = "", sender: int = 0):
        self.fd = fd
        self._signer = FrameSigner(key, channel, sender)
        self._lock = threading.Lock()

    def send(self, message: dict, final: bool = False) -> None:
        # Numbered and written under one lock: the receiver takes only rising numbers, and the
        # frames of one message must follow each other.
        with self._lock:
            for parts in self._signer.frames(message, final):
                write_all(self.fd, *parts)

    def send_frame(self, *parts: Buffer) -> None:
        """Forward a frame that is already signed by its own sender (agents relay rank frames)."""
        with self._lock:
            write_all(self.fd, *parts)

    def redirect(self, fd: int) -> None:
        """Go on over a new connection (numbering goes on: the receiver refuses nothing new)."""
        with self._lock:
            self.fd = fd


def frame_stream(header: Buffer) -> tuple[str, int, int]:
    """(channel, sender, sequence number) of a frame from its header (the sender's own frames:
    a journal of what was sent uses it to tell what a receiver already has)."""
    _magic, _version, _flags, channel, sender, seq, *_rest = _HEADER.unpack_from(header)
    return _channel_name(channel) or "", sender, seq


# --- receiving ---------------------------------------------------------------------------------
class Frame:
    """One received frame: its header authenticated; its body once ``FrameSplitter`` yields it."""

    __slots__ = ("header", "body", "flags", "channel", "sender", "seq", "body_mac", "key")

    def __init__(self, header: bytes, flags: int, channel: str, sender: int, seq: int, body_mac: bytes,
                 key: bytes):
        self.header = header
        self.body = bytearray()
        self.flags = flags
        self.channel = channel
        self.sender = sender
        self.seq = seq
        self.body_mac = body_mac
        self.key = key

    @property
    def final(self) -> bool:
        return bool(self.flags & FINAL)

    @property
    def stream(self) -> tuple[str, int]:
        return self.channel, self.sender


class _Partial:
    """The frames of one sender's message received so far."""

    __slots__ = ("body", "last_seq")

    def __init__(self, frame: Frame):
        self.body = frame.body
        self.last_seq = frame.seq


def decode_body(body: Buffer) -> dict:
    """The message in a verified body; raises ValueError (or msgpack's errors) on any mismatch."""
    view = memoryview(body)
    if view.nbytes < 8:
        raise ValueError(f"a body of {view.nbytes} bytes has no meta length")
    end = 8 + int.from_bytes(view[:8], "big")
    if end > view.nbytes:
        raise ValueError(f"meta of {end - 8} bytes in a body of {view.nbytes}")
    message = msgpack.unpackb(view[8:end], raw=False)
    if not isinstance(message, dict):
        raise ValueError(f"the meta is a {type(message).__name__}, not a map")
    lens = message.pop("_lens", None)
    if lens is None:
        lens = []
    if not isinstance(lens, list) or not all(type(n) is int and n >= 0 for n in lens):
        raise ValueError("the buffer lengths are not a list of sizes")
    if end + sum(lens) != view.nbytes:
        raise ValueError(f"buffers of {sum(lens)} bytes after the meta, {view.nbytes - end} sent")
    if lens:
        buffers, pos = [], end
        for n in lens:
            buffers.append(view[pos:pos + n])
            pos += n
        message["_buffers"] = buffers
    return message


def _keyring(keys: bytes | Keyring) -> Keyring:
    if callable(keys):
        return keys
    return {"": keys}.get


class FrameSplitter:
    """Incremental parser: give it bytes as they arrive, get verified frames and messages back.

    A large body is received straight into a bytearray of its own: ``want()`` returns the part
    still empty, to be filled with ``readinto``/``recv_into`` and confirmed with ``filled(n)``.
    ``keys`` is the key of channel "" or a function from a channel to its key (None: refused).
    """

    def __init__(self, keys: bytes | Keyring, source: str = "peer"):
        self.key_for = _keyring(keys)
        self.source = source
        #: Drops so far: frames, and runs of bytes that were not frames.
        self.rejected = 0
        self._buf = bytearray()
        self._large: Frame | None = None
        self._large_size = 0
        self._large_filled = 0
        self._ready: deque[Frame] = deque()
        self._at_start = True  # the stream's first header tells whether the peer speaks this protocol
        self._skipping = False
        self._last_seq: dict[tuple[str, int], int] = {}
        self._partial: dict[tuple[str, int], _Partial] = {}

    # --- a stream that goes on over a new connection ---------------------------------------
    def last_seqs(self) -> list[list]:
        """[channel, sender, last number taken] of every stream: what a resumed sender need not
        send again."""
        return [[channel, sender, seq] for (channel, sender), seq in list(self._last_seq.items())]

    def fork(self, source: str | None = None) -> "FrameSplitter":
        """A splitter for the same peer over a new connection: same keys and numbering (a
        replayed frame is still refused), nothing of this stream's unread bytes."""
        other = FrameSplitter(self.key_for, source or self.source)
        other._last_seq = dict(self._last_seq)
        other._partial = dict(self._partial)
        return other

    def reset_stream(self) -> None:
        """The connection broke: drop the bytes of a frame it cut in half; the peer sends the
        frame again on the next connection (numbering and half-joined messages are kept)."""
        self._buf = bytearray()
        self._large = None
        self._large_size = self._large_filled = 0
        self._skipping = False
        self._at_start = True

    # --- bytes in ------------------------------------------------------------------------------
    def want(self) -> memoryview | None:
        if self._large is None:
            return None
        return memoryview(self._large.body)[self._large_filled:]

    def filled(self, n: int) -> None:
        assert self._large is not None
        self._large_filled += n
        if self._large_filled == self._large_size:
            frame, self._large = self._large, None
            self._check(frame)
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
            frame, length = self._header_at(buf, pos)
            if frame is None:
                pos = self._skip_garbage(buf, pos)
                continue
            self._skipping = False
            start = pos + HEADER_SIZE
            available = len(buf) - start
            if length > LARGE_BODY and available < length:
                frame.body = bytearray(length)
                frame.body[:available] = buf[start:]
                self._large, self._large_size, self._large_filled = frame, length, available
                pos = len(buf)
                break
            if available < length:
                break
            frame.body = bytearray(buf[start:start + length])
            pos = start + length
            self._check(frame)
        del buf[:pos]

    def _header_at(self, buf: bytearray, pos: int) -> tuple[Frame | None, int]:
        """The frame whose header starts at ``pos`` if that header is authentic, and its length."""
        magic, version, flags, channel, sender, seq, length, body_mac, mac = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC or version != VERSION:
            if self._at_start:
                raise ProtocolError(_not_lepton(self.source, magic, version))
            return None, 0
        self._at_start = False
        name = _channel_name(channel)
        key = self.key_for(name) if name is not None else None
        signed = buf[pos:pos + _SIGNED_HEADER]
        if key is None or length > MAX_FRAME_BODY or not hmac.compare_digest(_header_mac(key, signed), mac):
            return None, 0
        header = bytes(buf[pos:pos + HEADER_SIZE])
        return Frame(header, flags, name, sender, seq, body_mac, key), length

    def _skip_garbage(self, buf: bytearray, pos: int) -> int:
        """Where the next frame may start after ``pos``: bytes that are not an authentic header
        (corruption, a peer without the key) are dropped up to there, with one log line a run."""
        if not self._skipping:
            self._skipping = True
            self._drop("bytes that are not an authentic frame (bad magic, or a header that failed HMAC "
                       "verification); skipping to the next frame")
        found = buf.find(_FRAME_START, pos + 1)
        return found if found >= 0 else max(pos + 1, len(buf) - len(_FRAME_START) + 1)

    def _check(self, frame: Frame) -> None:
        """Keep ``frame`` if its body is authentic and its number is new on its stream."""
        last = self._last_seq.get(frame.stream, 0)
        if frame.seq <= last:
            self._drop(f"a replayed or out-of-order frame (number {frame.seq} on {_stream(frame)}, "
                       f"after {last})")
        elif not hmac.compare_digest(_body_mac(frame.key, [frame.body]), frame.body_mac):
            self._drop(f"a frame on {_stream(frame)} whose body failed HMAC verification")
        else:
            self._last_seq[frame.stream] = frame.seq
            self._ready.append(frame)

    def _drop(self, what: str) -> None:
        self.rejected += 1
        log.warning("dropped %s from %s", what, self.source)

    # --- frames and messages out ---------------------------------------------------------------
    def frames(self) -> Iterator[Frame]:
        """Authentic frames in order, each new on its stream (channel, sender)."""
        while self._ready:
            yield self._ready.popleft()

    def envelopes(self) -> Iterator[tuple[Frame, dict]]:
        """Each whole message with the last frame it came in (its channel, sender and flags)."""
        for frame in self.frames():
            body = self._join(frame)
            if body is None:
                continue
            try:
                message = decode_body(body)
            except Exception as e:  # whatever the bytes, a bad message costs only itself
                self._drop(f"a message on {_stream(frame)} that does not decode ({type(e).__name__}: {e})")
                continue
            yield frame, message

    def messages(self) -> Iterator[dict]:
        for _frame, message in self.envelopes():
            yield message

    def forget(self, channel: str, sender: int) -> None:
        """The sender is gone: free what arrived of a message it never finished."""
        self._partial.pop((channel, sender), None)

    def _join(self, frame: Frame) -> bytearray | None:
        """The whole body once the message's last frame is in; None until then."""
        partial = self._partial.pop(frame.stream, None)
        if frame.flags & CONT:
            if partial is None or frame.seq != partial.last_seq + 1:
                self._drop(f"a frame of a message on {_stream(frame)} whose previous frame was lost")
                return None
            partial.body += frame.body
            partial.last_seq = frame.seq
        else:
            if partial is not None:
                self._drop(f"an unfinished message on {_stream(frame)} (its next frame was lost)")
            partial = _Partial(frame)
        if frame.flags & MORE:
            self._partial[frame.stream] = partial
            return None
        return partial.body


def _channel_name(field: bytes) -> str | None:
    try:
        return field.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        return None


def _stream(frame: Frame) -> str:
    return f"run {frame.channel} rank {frame.sender}" if frame.channel else "the link"


def _not_lepton(source: str, magic: bytes, version: int) -> str:
    if magic != MAGIC:
        return f"not a lepton frame from {source} (bad magic {bytes(magic)!r})"
    return f"{source} speaks lepton protocol version {version}, this side speaks {VERSION}"


class FrameReader:
    """Blocking reader of verified messages from one file descriptor."""

    def __init__(self, fd: int, keys: bytes | Keyring, source: str = "peer", chunk: int = 1 << 20):
        self.fd = fd
        self.splitter = FrameSplitter(keys, source)
        self.chunk = chunk
        self._pending: deque[tuple[Frame, dict]] = deque()

    @property
    def rejected(self) -> int:
        return self.splitter.rejected

    def redirect(self, fd: int) -> None:
        """Go on reading a new connection from the same sender: what the old one cut in half is
        dropped (the sender sends it again), the numbering of each stream is kept."""
        self.fd = fd
        self.splitter.reset_stream()

    def __iter__(self) -> Iterator[dict]:
        for _frame, message in self.envelopes():
            yield message

    def envelopes(self) -> Iterator[tuple[Frame, dict]]:
        while True:
            envelope = self.read_envelope()
            if envelope is None:
                return
            yield envelope

    def read(self) -> dict | None:
        """The next verified message, or None at end of stream."""
        envelope = self.read_envelope()
        return None if envelope is None else envelope[1]

    def read_envelope(self) -> tuple[Frame, dict] | None:
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
            self._pending.extend(self.splitter.envelopes())
        return self._pending.popleft()


def read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = os.read(fd, n - len(out))
        if not data:
            raise EOFError("stream closed")
        out += data
    return bytes(out)
