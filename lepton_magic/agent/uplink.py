"""The agent's way to the kernel: signed frames out, and — for agents of detached runs — a
journal of everything sent, so a connection that drops (an SSH link cut, a laptop asleep) can
come back and get exactly what it missed.

A plain uplink writes each frame to the kernel's pipe as the agent makes it (blocking: the
kernel reads as fast as it can, and losing it ends the agent anyway). A *resumable* one also
appends each frame to a journal file on the node, and never blocks: frames wait in a buffer
the agent's loop flushes when the connection can take them. When the connection goes, the
frames stay in the journal; the kernel's next connection says, per stream (channel, sender),
the last frame number it took, and gets every later frame from the journal, in order, once.
The kernel acknowledges what it took every few seconds, and the journal is cut back to what is
not acknowledged yet.
"""

from __future__ import annotations

import errno
import os
from collections import deque

from ..protocol import Buffer, FrameSigner, frame_stream, write_all

#: Frames waiting for a slow connection beyond this many bytes: the connection is given up (the
#: journal has every frame; the kernel connects again and gets them from there).
MAX_BUFFERED = 64 << 20


class Journal:
    """Every frame sent, in order, in an append-only file; an index says where each one is."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "r+b", buffering=0)
        self._end = 0
        self._index: deque[tuple[int, int, tuple[str, int], int]] = deque()  # offset, size, stream, seq

    def append(self, parts: list[Buffer]) -> None:
        channel, sender, seq = frame_stream(parts[0])
        size = sum(memoryview(p).nbytes for p in parts)
        self._file.seek(self._end)
        write_all(self._file.fileno(), *parts)
        self._index.append((self._end, size, (channel, sender), seq))
        self._end += size

    def since(self, have: dict[tuple[str, int], int]) -> list[bytes]:
        """The frames a receiver that took ``have`` (stream → last number) lacks, in order."""
        out = []
        for offset, size, stream, seq in self._index:
            if seq > have.get(stream, 0):
                out.append(os.pread(self._file.fileno(), size, offset))
        return out

    def acknowledge(self, have: dict[tuple[str, int], int]) -> None:
        """Forget the frames the receiver has; an empty journal starts its file again."""
        while self._index and self._index[0][3] <= have.get(self._index[0][2], 0):
            self._index.popleft()
        if not self._index and self._end:
            self._file.truncate(0)
            self._end = 0

    @property
    def frames(self) -> int:
        return len(self._index)

    def close(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Uplink:
    """Sends the agent's frames (its own, signed here, and its ranks', relayed as they are)."""

    def __init__(self, fd: int, key: bytes, journal: Journal | None = None):
        self.fd: int | None = fd
        self.journal = journal
        self._signer = FrameSigner(key)
        self._pending: deque[memoryview] = deque()  # bytes a resumable connection has not taken yet
        self._pending_bytes = 0
        if journal is not None:
            os.set_blocking(fd, False)

    @property
    def resumable(self) -> bool:
        return self.journal is not None

    @property
    def connected(self) -> bool:
        return self.fd is not None

    @property
    def wants_write(self) -> bool:
        return self.fd is not None and bool(self._pending)

    def send(self, message: dict, final: bool = False) -> None:
        for parts in self._signer.frames(message, final):
            self._emit(parts)

    def send_frame(self, *parts: Buffer) -> None:
        """A frame already signed by its own sender (a rank's)."""
        self._emit(list(parts))

    def _emit(self, parts: list[Buffer]) -> None:
        if self.journal is None:
            write_all(self.fd, *parts)  # OSError: the kernel is gone, which ends the agent
            return
        self.journal.append(parts)
        if self.fd is None:
            return  # in the journal until the kernel connects again
        for part in parts:
            view = memoryview(bytes(part)) if not isinstance(part, bytes) else memoryview(part)
            if view.nbytes:
                self._pending.append(view)
                self._pending_bytes += view.nbytes
        self.flush()

    def flush(self) -> None:
        """Write what the connection takes now, never waiting for it."""
        while self._pending and self.fd is not None:
            try:
                n = os.writev(self.fd, list(self._pending)[:64])
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    break
                self.disconnect()
                return
            self._pending_bytes -= n
            while n:
                head = self._pending[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    self._pending.popleft()
                else:
                    self._pending[0] = head[n:]
                    n = 0
        if self._pending_bytes > MAX_BUFFERED:
            self.disconnect()

    def disconnect(self) -> int | None:
        """Stop writing to the connection (it broke, or a new one replaces it); returns its fd
        for the caller to close. What it did not take is in the journal."""
        fd, self.fd = self.fd, None
        self._pending.clear()
        self._pending_bytes = 0
        return fd

    def resume(self, fd: int, have: dict[tuple[str, int], int]) -> int:
        """Go on over ``fd``, first with every journalled frame the kernel lacks; returns how
        many frames that was."""
        os.set_blocking(fd, False)
        self.fd = fd
        missed = self.journal.since(have)
        for frame in missed:
            self._pending.append(memoryview(frame))
            self._pending_bytes += len(frame)
        self.flush()
        return len(missed)

    def acknowledge(self, have: dict[tuple[str, int], int]) -> None:
        if self.journal is not None:
            self.journal.acknowledge(have)


class Resume:
    """Where a kernel comes back to an agent of detached runs: a Unix socket in a folder only
    this user can enter, and the journal beside it. ``linger``: how long an agent with no run
    left waits for a kernel to come back before it exits."""

    def __init__(self, socket_path: str, linger: float):
        import socket
        import stat

        folder = os.path.dirname(socket_path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise OSError(f"{folder} must be a folder of this user's, closed to others, for the resume socket")
        try:
            if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                os.unlink(socket_path)  # left by an agent that died
        except FileNotFoundError:
            pass
        self.path = socket_path
        self.journal = socket_path + ".journal"
        self.linger = linger
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        self.listener.listen(4)
        self.listener.setblocking(False)

    def close(self) -> None:
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
