"""Sweep makespan: a grid whose trials take known, unequal times (each sleeps `work` seconds) on
2 local nodes, against the lower bound of any schedule, max(total work / nodes, longest trial),
computed from the trials' own measured durations (so per-trial overhead counts on both sides).

The sweep continues a study (`--study`) in which two of the grid's points ran first (`--trials
2`): their durations let the scheduler estimate every other point's duration before it starts,
so it starts the longest first (LPT) on the remaining eight. Then the same eight points run once more in a fresh study, written shortest first, with nothing
to estimate from at the start: the first two go in written order, and the estimates from those
two decide the rest (the long trial is not left for last).

    python benchmarks/sweep.py
"""

from __future__ import annotations

import time

from _common import fresh_home, ratio_line

from lepton_magic.session import Session
from lepton_magic.store import Store
from lepton_magic.sweeps.space import make_spec

NODES = 2
#: Seconds of work per trial. The first two run alone first (to calibrate: far apart, so a line
#: through them is a fair estimate for the rest); the other eight are what is measured: seven
#: short trials and one long one, the case where the order matters.
GRID_CALIBRATED = [0.25, 1.0, 0.3, 0.32, 0.34, 0.36, 0.38, 0.4, 0.42, 2.0]
GRID = sorted(GRID_CALIBRATED)
CELL = "import time\ntime.sleep(work)\nlepton.log(step=0, loss=work)\n"


def makespan(session: Session, run) -> tuple[float, float, list[float]]:
    rows = session.store.query("SELECT started, ended FROM runs WHERE parent=?", (run.seq,))
    durations = [r["ended"] - r["started"] for r in rows]
    span = max(r["ended"] for r in rows) - min(r["started"] for r in rows)
    bound = max(sum(durations) / NODES, max(durations))
    return span, bound, durations


def sweep(session: Session, grid: list[float], study: str | None, trials: int | None = None):
    spec = make_spec("work=" + repr(grid), study=study, objective="min loss", trials=trials, sampler="grid")
    run = session.submit(CELL, {}, nodes=NODES, sweep=spec)
    run.wait(300)
    assert run.status == "succeeded", run.error
    return run


def main() -> None:
    fresh_home()
    session = Session(store=Store())
    session.up("local", NODES)
    sweep(session, [0.1], None)  # warm the nodes (rank processes ready)
    sweep(session, GRID_CALIBRATED, "calibrate", trials=2)  # what the scheduler learns durations from
    t0 = time.perf_counter()
    lpt = sweep(session, GRID_CALIBRATED, "calibrate")  # the other 8 points of the same grid
    wall = time.perf_counter() - t0
    span, bound, durations = makespan(session, lpt)
    order = [row["work"] for _, row in lpt.trials.sort_values("started").iterrows()]
    written = sweep(session, sorted(GRID_CALIBRATED[2:]), None)  # the same 8 points, shortest first
    span_written, bound_written, _ = makespan(session, written)
    session.down()
    print(f"sweeps of a {len(GRID)}-point grid on {NODES} local nodes")
    print(f"  longest first ({len(durations)} trials; estimated from the 2 the study ran first): makespan {span:.2f} s, lower bound "
          f"{bound:.2f} s (trial durations {min(durations):.2f}-{max(durations):.2f} s), wall {wall:.2f} s")
    print(f"    start order: {order}")
    print(f"  fresh study, written shortest first (learns as it goes): makespan {span_written:.2f} s, lower bound "
          f"{bound_written:.2f} s")
    ratio_line("sweep makespan (longest first) vs max(total work / nodes, longest trial)", span, bound, "<= 1.1x")
    ratio_line("sweep makespan (fresh study, estimates from its own first trials) vs its lower bound", span_written,
               bound_written, "<= 1.1x")


if __name__ == "__main__":
    main()
