"""Pickling of user values: variables shipped to the nodes and results shipped back.

cloudpickle handles functions and classes defined in the notebook. Results are pickled on the
node with tensors moved to the CPU first, so a kernel without CUDA can always load them.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from typing import Any

import cloudpickle


def _rebuild_tensor(cpu_tensor: Any, requires_grad: bool) -> Any:
    return cpu_tensor.requires_grad_(requires_grad) if cpu_tensor.is_floating_point() else cpu_tensor


def _rebuild_parameter(cpu_tensor: Any, requires_grad: bool) -> Any:
    import torch

    return torch.nn.Parameter(cpu_tensor, requires_grad=requires_grad)


def _identity(value: Any) -> Any:
    return value


def _tensor_from_array(array: Any, parameter: bool, requires_grad: bool) -> Any:
    import torch

    if not array.flags.writeable:  # a read-only buffer: torch tensors are always writable
        array = array.copy()
    tensor = torch.from_numpy(array)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


#: A CPU tensor from this many bytes travels as a NumPy array: pickled out of band (protocol 5),
#: it is sent from its own memory and loaded without a copy (from shared memory, or the frame
#: it arrived in); torch's own pickling copies its bytes into the pickle.
TENSOR_OOB_BYTES = 64 << 10


def _whole_cpu_tensor(torch: Any, obj: Any) -> bool:
    """A plain, dense, contiguous CPU tensor of a NumPy dtype. (torch's own pickling does not keep
    two tensors that share a storage sharing it either, and it copies a view's whole storage:
    as an array, only the view's elements travel.)"""
    return (type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu"
            and obj.layout == torch.strided and not obj.is_quantized and obj.dtype in _NUMPY_DTYPES(torch)
            and obj.is_contiguous() and not obj.is_conj() and not obj.is_neg()
            and obj.numel() * obj.element_size() >= TENSOR_OOB_BYTES and (obj.is_leaf or not obj.requires_grad))


def _NUMPY_DTYPES(torch: Any) -> frozenset:
    return frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                      torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128})


class _CPUPickler(cloudpickle.Pickler):
    """cloudpickle, with every tensor that lives on an accelerator copied to the CPU, and every
    DistributedDataParallel wrapper (it holds a process group) replaced by the model inside."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None:
            return super().reducer_override(obj)
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            return _identity, (obj.module,)
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and _whole_cpu_tensor(torch, obj):
            return _tensor_from_array, (obj.detach().numpy(), isinstance(obj, torch.nn.Parameter),
                                        obj.requires_grad)
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            cpu = obj.detach().to("cpu")
            if isinstance(obj, torch.nn.Parameter):
                return _rebuild_parameter, (cpu, obj.requires_grad)
            return _rebuild_tensor, (cpu, obj.requires_grad)
        return super().reducer_override(obj)


def dumps(value: Any) -> bytes:
    """One self-contained pickle (inputs, checkpoints)."""
    buffer = io.BytesIO()
    _CPUPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def dumps_oob(value: Any) -> tuple[bytes, list[memoryview]]:
    """A pickle plus its large buffers kept out of band (pickle protocol 5): arrays and frames
    are sent from their own memory, never copied into the pickle."""
    buffers: list[memoryview] = []
    stream = io.BytesIO()
    pickler = _CPUPickler(stream, protocol=5, buffer_callback=lambda b: buffers.append(b.raw()))
    pickler.dump(value)
    return stream.getvalue(), buffers


def join_oob(blob: bytes, buffers: list) -> bytes:
    """A pickle and its out-of-band buffers as one object: a length-prefixed msgpack header (the
    pickle's and each buffer's length), the pickle, the buffers."""
    import msgpack

    header = msgpack.packb({"pickle": len(blob), "lens": [memoryview(b).nbytes for b in buffers]})
    return b"".join([len(header).to_bytes(4, "big"), header, blob, *buffers])


def split_oob(body) -> tuple[bytes, list[memoryview]]:
    """The pickle and its buffers from ``join_oob`` (the buffers are views of ``body``)."""
    import msgpack

    # Writable buffers, as a pickle's own would be: arrays loaded from them can be written to.
    view = memoryview(bytearray(body) if isinstance(body, bytes) else body)
    n = int.from_bytes(view[:4], "big")
    header = msgpack.unpackb(view[4:4 + n])
    pos = 4 + n
    blob = bytes(view[pos:pos + header["pickle"]])
    pos += header["pickle"]
    buffers = []
    for size in header["lens"]:
        buffers.append(view[pos:pos + size])
        pos += size
    return blob, buffers


def loads(blob: bytes, buffers: list | None = None) -> Any:
    return pickle.loads(blob, buffers=buffers or ())


def is_shippable(value: Any) -> bool:
    """Modules are imported on the node, not shipped; everything else is pickled."""
    return not isinstance(value, types.ModuleType)


def describe(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
