"""The ray backend beside the local backend, in the same run: warm dispatch of `x = 1` on 2 nodes
through the magic, and metric throughput of one rank into the store, through a driver
connection and through Ray Client (ray://). The Ray cluster is a real local one (a head and a
second raylet on 127.0.0.2, tests/raycluster.py), started here and stopped at the end.

    python benchmarks/ray.py [--repeat 100] [--points 300000]

Targets (issue 12): metrics >= 100,000 points/s per rank through a driver connection; warm
dispatch <= 3x the local backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _common import fresh_home, quiet, shell, summary, timed

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named ray.py: `import ray` must find Ray, not this script.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from raycluster import RayCluster  # noqa: E402


def dispatch(ip, backend: str, repeat: int) -> float:
    quiet(ip.run_line_magic, "lepton", f"up --backend {backend} --nodes 2")
    time.sleep(5)  # let the zygotes finish importing torch: a warm pool

    def cell():
        quiet(ip.run_cell_magic, "lepton", f"--backend {backend} --nodes 2", "x = 1")

    return summary(f"%%lepton --backend {backend} --nodes 2 (x = 1)", timed(cell, repeat, warmup=5))


def metric_throughput(session, backend: str, points: int) -> float:
    code = f"for i in range({points}):\n    lepton.log(step=i, loss=0.5)\n"
    run = session.submit(code, {}, nodes=1, backend=backend)
    run.wait(600)
    count, first = session.store.execute("SELECT COUNT(*), MIN(time) FROM metrics WHERE run=?", (run.seq,))[0]
    ended = session.store.run_row(run.seq)["ended"]
    assert count == points, f"{backend}: {count:,} of {points:,} points stored"
    rate = count / (ended - first)
    print(f"  {backend:<8} one rank's points into the store {rate:12,.0f} points/s ({count:,} stored)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--points", type=int, default=300_000)
    args = parser.parse_args()
    fresh_home()
    # The notebook's folder, which remote nodes mirror before each run: a small one of its own
    # (the repository would be hashed on every cell; LEPTON_HOME changes while it is sent).
    os.chdir(tempfile.mkdtemp(prefix="lepton-bench-notebook-"))
    os.environ["RAY_AUTH_MODE"] = "disabled"  # like the test cluster
    t0 = time.perf_counter()
    cluster = RayCluster.start()
    print(f"local Ray cluster (head + second raylet on 127.0.0.2) up in {time.perf_counter() - t0:.1f} s")
    try:
        ip = shell()
        ip.run_line_magic("load_ext", "lepton_magic")
        import lepton_magic as lm

        session = lm.current_session()
        session.config.set("progress", "false")
        print(f"warm dispatch of `x = 1` on 2 nodes, {args.repeat} cells each")
        local = dispatch(ip, "local", args.repeat)
        print(f"metrics: {args.points:,} points from 1 rank (1 metric per call)")
        local_rate = metric_throughput(session, "local", args.points)
        quiet(ip.run_line_magic, "lepton", "down --backend local")

        results = {}
        for label, address in (("driver", cluster.address), ("ray://", cluster.client_address)):
            session.config.set("ray_address", address)
            print(f"ray through {label} ({address})")
            results[label] = (dispatch(ip, "ray", args.repeat), metric_throughput(session, "ray", args.points))
            quiet(ip.run_line_magic, "lepton", "down --backend ray")
    finally:
        cluster.stop()
    for label, (warm, rate) in results.items():
        print(f"RATIO ray warm dispatch ({label}): {warm / local:.2f}x of the local backend "
              f"({warm * 1e3:.1f} ms vs {local * 1e3:.1f} ms; target <= 3x through a driver)")
        print(f"RATIO ray metric throughput ({label}): {rate / local_rate:.2f}x of the local backend "
              f"({rate:,.0f} vs {local_rate:,.0f} points/s per rank; target >= 100,000 through a driver)")


if __name__ == "__main__":
    main()
