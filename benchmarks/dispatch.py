"""Warm dispatch: a trivial cell (`x = 1`) on a warm 2-node pool, end to end through the magic,
against ipyparallel's `%%px --block x = 1` on 2 engines, measured in the same run.

Two loops each: back to back (the next cell starts the moment the last one returned), and paced
(50 ms between cells, as when a person runs them: each system has finished its housekeeping;
for lepton that is retiring the last rank processes and forking fresh standbys). Then lepton
again with every frame through the agents (LEPTON_DIRECT_RANKS=0, as for nodes on other
machines): what the direct rank sockets save.

Each loop also prints where its CPU went per cell (see _common.CpuPerCell): with cells back to
back every core is busy, so a system's CPU per cell over the cores is a floor for its wall time.

    python benchmarks/dispatch.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import os
import time

from _common import CpuPerCell, fresh_home, quiet, ratio_line, shell, start_ipyparallel, summary, timed


def measured(name: str, helpers: str, fn, repeat: int, warmup: int,
             pause: float = 0.0) -> tuple[float, float, CpuPerCell]:
    """The loop's median and mean time per cell, and where its CPU went."""
    timed(fn, 0, warmup=warmup)
    with CpuPerCell(helpers) as cpu:
        seconds = timed(fn, repeat, warmup=0, pause=pause)
    med = summary(name, seconds)
    cpu.report(repeat)
    return med, sum(seconds) / repeat, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    fresh_home()
    ip = shell()
    print(f"warm dispatch of `x = 1` on 2 nodes, {args.repeat} cells each")

    cluster, client = start_ipyparallel(2)
    client.activate()  # registers %%px on this shell
    def px():
        quiet(ip.run_cell_magic, "px", "--block", "x = 1")

    engines = "controller and engines"
    baseline, ipp_mean, _ = measured("ipyparallel %%px --block (2 engines)", engines, px, args.repeat, 10)
    baseline_paced, _, _ = measured("  paced, 50 ms apart", engines, px, args.repeat // 2, 2, pause=0.05)
    client.close()
    cluster.stop_cluster_sync()

    ip.run_line_magic("load_ext", "lepton_magic")
    import lepton_magic as lm

    lm.current_session().config.set("progress", "false")
    quiet(ip.run_line_magic, "lepton", "up --nodes 2")
    time.sleep(5)  # let the zygotes finish importing torch: a warm pool
    def cell():
        quiet(ip.run_cell_magic, "lepton", "--nodes 2", "x = 1")

    agents = "agents and zygotes"
    med, mean, cpu = measured("lepton %%lepton --nodes 2", agents, cell, args.repeat, 10)
    paced, _, _ = measured("  paced, 50 ms apart", agents, cell, args.repeat // 2, 2, pause=0.05)
    assert ip.user_ns["x"] == 1
    quiet(ip.run_line_magic, "lepton", "down")

    # The same through the agents (as on other machines), without the direct rank sockets.
    os.environ["LEPTON_DIRECT_RANKS"] = "0"
    quiet(ip.run_line_magic, "lepton", "up --nodes 2")
    time.sleep(5)
    relayed, _, _ = measured("lepton through the agents", agents, cell, args.repeat, 10)
    relayed_paced, _, _ = measured("  paced, 50 ms apart", agents, cell, args.repeat // 2, 2, pause=0.05)
    quiet(ip.run_line_magic, "lepton", "down")
    del os.environ["LEPTON_DIRECT_RANKS"]

    ratio_line("warm dispatch, back to back", med, baseline, "<= 0.5")
    ratio_line("warm dispatch, paced", paced, baseline_paced, "<= 0.5")
    ratio_line("direct ranks against through the agents, back to back", med, relayed, "< 1")
    ratio_line("direct ranks against through the agents, paced", paced, relayed_paced, "< 1")
    # With every core busy, a loop's mean time per cell cannot be below its CPU per cell over the
    # cores: what stands between lepton's back-to-back figure and the target.
    floor = cpu.machine / args.repeat / cpu.cores
    print(f"FLOOR back to back: lepton's CPU per cell over {cpu.cores} cores is {floor * 1e3:.2f} ms, "
          f"{floor / ipp_mean:.3f}x of ipyparallel's mean time per cell ({ipp_mean * 1e3:.2f} ms; "
          f"lepton's {mean * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
