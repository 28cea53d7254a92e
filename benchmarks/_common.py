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
