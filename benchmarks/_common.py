"""Helpers shared by the benchmarks: a real IPython shell, quiet cells, robust timing."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import time


def fresh_home() -> str:
    home = tempfile.mkdtemp(prefix="lepton-bench-")
    os.environ["LEPTON_HOME"] = home
    return home


def shell():
    from IPython.testing.globalipapp import start_ipython

    return start_ipython()


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def timed(fn, repeat: int, warmup: int = 3, pause: float = 0.0) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(name: str, seconds: list[float]) -> float:
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=10) if len(seconds) >= 10 else [min(seconds), max(seconds)]
    print(f"  {name:<44} median {med * 1e3:8.2f} ms   p10 {q[0] * 1e3:7.2f}   p90 {q[-1] * 1e3:7.2f}")
    return med


def ratio_line(label: str, ours: float, baseline: float, target: str) -> None:
    print(f"RATIO {label}: {ours / baseline:.3f}x of baseline  (target {target})")


def start_ipyparallel(n: int = 2):
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=n, log_level=40)
    client = cluster.start_and_connect_sync()
    client.wait_for_engines(n, timeout=120)
    return cluster, client


class CpuPerCell:
    """Where the CPU of a loop of cells went, per cell: the whole machine (from the kernel's
    counters, so short-lived processes count too), this process (the notebook kernel), and the
    long-lived helper processes below it (ipyparallel's controller and engines; lepton's agents
    and zygotes). The rest is processes that came and went (lepton's ranks and standbys) and
    the OS. With every core busy, wall time per cell cannot go below machine CPU / cores.
    Linux counts CPU in clock ticks (10 ms): over a loop of a few seconds the parts are good to a
    few tenths of a millisecond per cell, and a rest near zero may print slightly negative."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self) -> "CpuPerCell":
        import psutil

        self._helpers = {p.pid: p for p in psutil.Process().children(recursive=True)}
        self._machine, self._own, self._helper = _busy(), time.process_time(), self._helper_cpu()
        return self

    def _helper_cpu(self) -> dict[int, float]:
        cpu = {}
        for pid, p in self._helpers.items():
            try:
                t = p.cpu_times()
                cpu[pid] = t.user + t.system
            except Exception:  # gone: counted in the rest
                pass
        return cpu

    def __exit__(self, *exc) -> None:
        import psutil

        self.machine, self.own = _busy() - self._machine, time.process_time() - self._own
        after = self._helper_cpu()
        self.helper = sum(after[pid] - before for pid, before in self._helper.items() if pid in after)
        self.cores = psutil.cpu_count()

    def report(self, cells: int) -> None:
        per = lambda seconds: seconds / cells * 1e3  # noqa: E731
        rest = self.machine - self.own - self.helper
        print(f"    CPU per cell {per(self.machine):6.2f} ms: this process {per(self.own):.2f}, "
              f"{self.label} {per(self.helper):.2f}, processes that came and went and the OS "
              f"{per(rest):.2f}; floor on {self.cores} busy cores {per(self.machine) / self.cores:.2f} ms")


def _busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0) - getattr(t, "guest", 0.0) \
        - getattr(t, "guest_nice", 0.0)
