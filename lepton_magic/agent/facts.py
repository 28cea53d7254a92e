"""What a node is (sent once) and how busy it is (sampled every heartbeat)."""

from __future__ import annotations

import os
import platform
import socket
import sys
import time

try:
    import psutil
except ImportError:  # a bare host: the little the agent needs, from /proc
    from . import procfs as psutil  # type: ignore[no-redef]

_nvml_ok: bool | None = None


def _nvml():
    """The NVML module, initialised once; None where there is no NVIDIA driver."""
    global _nvml_ok
    if _nvml_ok is False:
        return None
    try:
        import pynvml

        if _nvml_ok is None:
            pynvml.nvmlInit()
            _nvml_ok = True
        return pynvml
    except Exception:
        _nvml_ok = False
        return None


def gpus() -> list[dict]:
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        out.append(
            {
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            }
        )
    return out


def _torch_version() -> str | None:
    """torch's version without importing it (seconds): from its installed metadata."""
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return None


def node_facts(node: str) -> dict:
    vm = psutil.virtual_memory()
    return {
        "node": node,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cpus": os.cpu_count() or 1,
        "memory": int(vm.total),
        "gpus": gpus(),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "disk_free": int(psutil.disk_usage(os.path.expanduser("~")).free),
        "executable": sys.executable,
        "platform": platform.platform(),
        "missing": missing(),
        "time": time.time(),
    }


def missing() -> list[str]:
    """Optional pieces this node lacks, and what it does instead (the compatibility table says)."""
    out = []
    if getattr(psutil, "MISSING_NOTE", None):
        out.append(psutil.MISSING_NOTE)
    if os.path.exists("/proc/driver/nvidia") and _nvml() is None:
        out.append("nvidia-ml-py (GPUs are not seen: pip install nvidia-ml-py)")
    return out


def telemetry(rank_pids: dict[int, int]) -> dict:
    """Node load now: CPU %, memory, per-GPU utilisation, and each rank's CPU % and RSS."""
    vm = psutil.virtual_memory()
    ranks = {}
    for rank, pid in rank_pids.items():
        try:
            proc = _procs.setdefault(pid, psutil.Process(pid))
            with proc.oneshot():
                ranks[str(rank)] = {"cpu": proc.cpu_percent(None), "rss": proc.memory_info().rss}
        except psutil.Error:
            _procs.pop(pid, None)
    gpu_load = []
    nvml = _nvml()
    if nvml is not None:
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpu_load.append({"index": i, "util": util.gpu, "mem_used": int(mem.used)})
        except Exception:
            pass
    for pid in list(_procs):
        if pid not in rank_pids.values():
            del _procs[pid]
    return {
        "cpu": psutil.cpu_percent(None),
        "mem_used": int(vm.total - vm.available),
        "ranks": ranks,
        "gpus": gpu_load,
        "time": time.time(),
    }


_procs: dict[int, psutil.Process] = {}
