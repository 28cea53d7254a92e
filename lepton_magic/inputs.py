"""The notebook variables a run ships, pickled once, and how they reach each node.

They are pickled with their large buffers (arrays, tensors, frames) kept out of band (pickle
protocol 5), so a 200 MB tensor is never copied into a pickle. Then, per node:

- nodes on this machine map one private shared-memory file holding the buffers (written once
  per run, whatever the number of nodes, ranks and attempts; removed when the run ends);
- other nodes get the buffers through the pipe, as out-of-band parts of the run message, sent
  to every node at once;
- nodes that read a bucket (ec2, large inputs) get one object: a length-prefixed header, the
  pickle, then the buffers.
"""

from __future__ import annotations

import threading
from typing import Any

from . import sharedmem, values

#: Below this many bytes of buffers, shared memory costs more than the pipe.
SHM_MIN_BYTES = sharedmem.SHM_MIN_BYTES


class Inputs:
    def __init__(self, blob: bytes, buffers: list[memoryview]):
        self.blob = blob
        self.buffers = buffers
        self._shm: dict | None = None
        self._shm_lock = threading.Lock()

    @classmethod
    def pickle(cls, chosen: dict[str, Any]) -> "Inputs":
        blob, buffers = values.dumps_oob(chosen)
        return cls(blob, buffers)

    @property
    def size(self) -> int:
        return len(self.blob) + sum(b.nbytes for b in self.buffers)

    def message(self, shm_dir: str | None, prefix: str) -> dict:
        """The run message's fields that carry the inputs to one node."""
        if shm_dir and sum(b.nbytes for b in self.buffers) >= SHM_MIN_BYTES:
            shared = self._shared(shm_dir, prefix)
            if shared is not None:
                return {"inputs": self.blob, "inputs_shm": shared}
        return {"inputs": self.blob, "_buffers": self.buffers}

    def _shared(self, shm_dir: str, prefix: str) -> dict | None:
        with self._shm_lock:
            if self._shm is None:
                try:
                    self._shm = sharedmem.write_buffers(shm_dir, f"{prefix}-inputs", self.buffers)
                except OSError:  # /dev/shm full or refused: the pipe, as for results
                    return None
            return self._shm

    def settle(self, shm_dir: str | None, prefix: str) -> None:
        """Later attempts or trials will send these again: take them out of the notebook's own
        memory now (its buffers are views of the user's arrays, which a later cell may change),
        into shared memory where nodes can map it, else into a copy."""
        if shm_dir and sum(b.nbytes for b in self.buffers) >= SHM_MIN_BYTES and self._shared(shm_dir, prefix):
            return
        self.buffers = [memoryview(bytearray(b)) for b in self.buffers]

    def joined(self) -> bytes:
        """One object (a bucket's, a keeper's): see ``values.join_oob``."""
        return values.join_oob(self.blob, self.buffers)

    @classmethod
    def from_joined(cls, body: bytes) -> "Inputs":
        return cls(*values.split_oob(body))

    def discard(self) -> None:
        """The run has ended: free the shared memory (ranks that mapped it keep their pages)."""
        with self._shm_lock:
            sharedmem.discard(self._shm)
            self._shm = None

