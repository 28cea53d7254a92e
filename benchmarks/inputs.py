"""Input broadcast: a 200 MB tensor from the notebook to the ranks of 2 local nodes, against
ipyparallel's `push` of the same tensor to 2 engines, in the same run.

lepton: from submitting the cell to the moment the last rank has the tensor (each rank stamps
the time its cell starts, after its inputs are loaded, into a metric), on a warm 2-node pool;
also how far apart the two ranks' arrivals are, against the time the later one took.
ipyparallel: `view.push({"x": x}, block=True)` to both engines (returns once both have it).

    python benchmarks/inputs.py [--mb 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import fresh_home, quiet, ratio_line, start_ipyparallel

CELL = "import time\nlepton.log(step=0, arrived=time.time())\nn = x.numel()\n"


def lepton_broadcast(session, x, repeat: int) -> tuple[list[float], list[float]]:
    totals, spreads = [], []
    for _ in range(repeat + 1):  # the first one warms the ranks' torch import
        t0 = time.time()
        run = session.submit(CELL, {"x": x}, nodes=2)
        run.wait(120)
        assert run.status == "succeeded" and run.outputs["n"] == x.numel(), run.error
        arrived = sorted(run.metrics.query("name == 'arrived'")["value"])
        totals.append(arrived[-1] - t0)
        spreads.append((arrived[-1] - arrived[0]) / (arrived[-1] - t0))
    return totals[1:], spreads[1:]


def ipyparallel_push(x, repeat: int) -> list[float]:
    cluster, client = start_ipyparallel(2)
    view = client[:]
    out = []
    try:
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            view.push({"x": x}, block=True)
            out.append(time.perf_counter() - t0)
    finally:
        client.close()
        cluster.stop_cluster_sync()
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fresh_home()
    import torch

    from lepton_magic.session import Session

    x = torch.randn(args.mb * (1 << 20) // 4)
    print(f"input broadcast: a {x.numel() * 4 / 1e6:.0f} MB float32 tensor to 2 local nodes / engines")
    baseline = statistics.median(quiet(ipyparallel_push, x, args.repeat))
    print(f"  ipyparallel push to 2 engines                median {baseline:7.3f} s")
    session = Session()
    session.up("local", 2)
    totals, spreads = lepton_broadcast(session, x, args.repeat)
    session.down()
    ours = statistics.median(totals)
    spread = statistics.median(spreads)
    print(f"  lepton, submit -> the last rank has it       median {ours:7.3f} s   (min {min(totals):.3f}, "
          f"max {max(totals):.3f})")
    print(f"  the two ranks' arrivals apart                median {spread * 100:6.1f} % of the later one's time")
    ratio_line("input broadcast, 200 MB to 2 local nodes vs ipyparallel push to 2 engines", ours, baseline,
               "<= 0.3x")
    ratio_line("input broadcast, the ranks' arrivals apart vs the later one's time", spread, 1.0, "<= 0.1x")


if __name__ == "__main__":
    main()
