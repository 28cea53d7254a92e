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


class _CPUPickler(cloudpickle.Pickler):
    """cloudpickle, with every tensor that lives on an accelerator copied to the CPU, and every
    DistributedDataParallel wrapper (it holds a process group) replaced by the model inside."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None:
            return super().reducer_override(obj)
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            return _identity, (obj.module,)
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


def loads(blob: bytes, buffers: list | None = None) -> Any:
    return pickle.loads(blob, buffers=buffers or ())


def is_shippable(value: Any) -> bool:
    """Modules are imported on the node, not shipped; everything else is pickled."""
    return not isinstance(value, types.ModuleType)


def describe(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
