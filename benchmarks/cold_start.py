"""Cold start: `%lepton up --nodes 2` plus the first trivial cell, against ipyparallel's
`Cluster(n=2).start_and_connect_sync()` plus its first `apply_sync`, measured in the same run.
Each side runs in a fresh interpreter, so nothing is warm; the figure is wall time inside it.

    python benchmarks/cold_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile

IPP = """
import time
t0 = time.perf_counter()
import ipyparallel as ipp
cluster = ipp.Cluster(n=2, log_level=40)
client = cluster.start_and_connect_sync()
client.wait_for_engines(2, timeout=120)
assert client[:].apply_sync(lambda: 1) == [1, 1]
print(time.perf_counter() - t0)
client.close()
cluster.stop_cluster_sync()
"""

LEPTON = """
import time, contextlib, io
t0 = time.perf_counter()
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "lepton_magic")
with contextlib.redirect_stdout(io.StringIO()):
    ip.run_line_magic("lepton", "up --nodes 2")
    ip.run_cell_magic("lepton", "--nodes 2", "x = 1")
assert ip.user_ns["x"] == 1
print(time.perf_counter() - t0)
with contextlib.redirect_stdout(io.StringIO()):
    ip.run_line_magic("lepton", "down")
"""


def once(code: str) -> float:
    env = dict(__import__("os").environ, LEPTON_HOME=tempfile.mkdtemp(prefix="lepton-bench-"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        raise SystemExit(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"cold start, 2 nodes + first trivial cell, {args.repeat} fresh interpreters each")
    ipp_times = [once(IPP) for _ in range(args.repeat)]
    ours = [once(LEPTON) for _ in range(args.repeat)]
    baseline, mine = statistics.median(ipp_times), statistics.median(ours)
    print(f"  ipyparallel Cluster(n=2) start + connect + apply_sync   median {baseline:6.2f} s  {ipp_times}")
    print(f"  lepton %lepton up --nodes 2 + first %%lepton cell      median {mine:6.2f} s  {ours}")
    print(f"RATIO cold start: {mine / baseline:.3f}x of baseline  (target <= 0.4)")


if __name__ == "__main__":
    main()
