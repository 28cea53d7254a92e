"""What the agent reads of psutil, from /proc and the standard library, for hosts without psutil
(a bare ``python3``). Only the calls agent/facts.py and agent/network.py make; Linux only.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
from collections import namedtuple

MISSING_NOTE = "psutil (CPU and memory telemetry read from /proc)"

_Memory = namedtuple("_Memory", "total available")
_Disk = namedtuple("_Disk", "total used free")
_RSS = namedtuple("_RSS", "rss")
_Address = namedtuple("_Address", "family address netmask broadcast ptp")


class Error(Exception):
    pass


class NoSuchProcess(Error):
    pass


def virtual_memory() -> _Memory:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    return _Memory(info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0)))


def disk_usage(path: str) -> _Disk:
    return _Disk(*shutil.disk_usage(path))


_last_cpu: tuple[int, int] | None = None


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


def cpu_percent(interval=None) -> float:
    """Busy share of every CPU since the previous call (0.0 the first time), as psutil does."""
    global _last_cpu
    now = _cpu_times()
    before, _last_cpu = _last_cpu, now
    if before is None or now[0] == before[0]:
        return 0.0
    total, idle = now[0] - before[0], now[1] - before[1]
    return round(100.0 * (total - idle) / total, 1)


class Process:
    _ticks = os.sysconf("SC_CLK_TCK")
    _page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, pid: int):
        self.pid = pid
        self._last: tuple[float, float] | None = None
        self._read()

    def _read(self) -> list[str]:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError as e:
            raise NoSuchProcess(str(e)) from None

    def oneshot(self):
        import contextlib

        return contextlib.nullcontext()

    def cpu_percent(self, interval=None) -> float:
        fields = self._read()
        cpu = (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime
        now = os.times().elapsed
        before, self._last = self._last, (cpu, now)
        if before is None or now == before[1]:
            return 0.0
        return round(100.0 * (cpu - before[0]) / (now - before[1]), 1)

    def memory_info(self) -> _RSS:
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return _RSS(int(f.read().split()[1]) * self._page)
        except OSError as e:
            raise NoSuchProcess(str(e)) from None


_SIOCGIFADDR = 0x8915


def net_if_addrs() -> dict[str, list[_Address]]:
    """IPv4 address of each interface (what network.py looks for)."""
    out: dict[str, list[_Address]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            out[name] = [_Address(socket.AF_INET, socket.inet_ntoa(raw[20:24]), None, None, None)]
    return out
