"""Fail-over: a 2-node DDP run with `--retries 1` loses a node (its agent killed with SIGKILL, as a
crashed machine) and starts again on healthy nodes from its last checkpoint.

The cell takes a DDP step, logs it, checkpoints (model, optimizer, step) every 10 steps and
sleeps 0.1 s: one logged step every ~0.1 s, as a paced training loop. Each repeat:

1. `%lepton down`, then a fresh 2-node run of the same cell (no retries) is submitted with
   `--async`; the baseline for (a) is the time from submit to its first logged step (the
   `time` the rank stamped on it, read from the store): what starting over by hand costs when
   the notebook has no warm nodes. The run is cancelled once it has logged.
2. The same cell with `--retries 1` on that now warm pool; once the store has rank 0's step at a
   point drawn at random in [20, 50) (seeded, so the kill falls anywhere in a checkpoint interval;
   the ranks are up to a flush interval, 0.2 s, further), one node's agent is killed (the node of rank 1, then of rank 0, alternately: either may be the one lost).
   (a) kill -> the first metrics row with attempt=1 (its `time`); (b) the distinct steps that
   attempt 0 logged at or beyond the step the retry resumed from (the cell's `resumed_from`),
   i.e. the steps attempt 1 repeated, against the checkpoint interval.
3. Starting over by hand after the loss: one idle node's agent is killed, and once the pool has
   noticed, the cell is submitted again (no human reaction time counted); submit -> first
   logged step, with one node replaced. A second peer for (a), printed as its own RATIO line.

Times are wall clock (`time.time()`, the clock the ranks stamp metrics with); no sleeps besides
the cell's own pacing and the polls that wait for what is measured.

    python benchmarks/failover.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import time

from _common import fresh_home, quiet, ratio_line, shell

from lepton_magic.scheduler import BACKOFF_SECONDS

STEPS = 80
EVERY = 10  # checkpoint interval, in steps
KILL_RANGE = (20, 50)

CELL = f"""
import time
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

dist = lepton.init_distributed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
ddp = DDP(model)
opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
state = lepton.restore()
if state is not None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
resumed_from = state["step"] if state is not None else 0
x, y = torch.randn(32, 64), torch.randint(10, (32,))
for step in range(resumed_from, {STEPS}):
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    lepton.log(step=step, loss=loss.item())
    if (step + 1) % {EVERY} == 0:
        lepton.checkpoint({{"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict()}})
    time.sleep(0.1)
attempt = lepton.attempt
"""


def first_row(run, attempt: int = 0, timeout: float = 120) -> float:
    """The `time` of the run's first metrics row of ``attempt``, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        rows = run.store.execute("SELECT MIN(time) FROM metrics WHERE run=? AND attempt=?", (run.seq, attempt))
        if rows[0][0] is not None:
            return rows[0][0]
        if time.monotonic() > deadline or (run.done and run.status != "running"):
            raise RuntimeError(f"{run.name}: no step of attempt {attempt + 1} ({run.status})")
        time.sleep(0.01)


def wait_for_step(run, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while run.store.execute("SELECT MAX(step) FROM metrics WHERE run=? AND rank=0", (run.seq,))[0][0] is None \
            or run.store.execute("SELECT MAX(step) FROM metrics WHERE run=? AND rank=0",
                                 (run.seq,))[0][0] < step:
        if time.monotonic() > deadline or run.done:
            raise RuntimeError(f"{run.name} never reached step {step} ({run.status})")
        time.sleep(0.005)


def agent_pid(session, node: str) -> int:
    return next(link.facts["pid"] for link in session.pool().live_nodes if link.name == node)


def node_of_rank(run, rank: int) -> str:
    nodes = run.nodes
    for name, ranks in zip(nodes["node"], nodes["ranks"]):
        if str(rank) in str(ranks).replace("[", " ").replace("]", " ").replace(",", " ").split():
            return name
    raise RuntimeError(f"no node has rank {rank}: {nodes[['node', 'ranks']]}")


def submit(ip, lm, flags: str):
    before = lm.last_run()
    t0 = time.time()
    quiet(ip.run_cell_magic, "lepton", f"--nodes 2 --async {flags}", CELL)
    run = lm.last_run()
    assert before is None or run.seq != before.seq
    return run, t0


def fresh_start(ip, lm) -> float:
    quiet(ip.run_line_magic, "lepton", "down")
    run, t0 = submit(ip, lm, "--name fresh")
    took = first_row(run) - t0
    run.cancel()
    run.wait_done(30)
    return took


def failover(ip, lm, kill_at: int, victim_rank: int) -> dict:
    session = lm.current_session()
    run, _ = submit(ip, lm, "--retries 1 --name failover")
    wait_for_step(run, kill_at)
    victim = node_of_rank(run, victim_rank)
    pid = agent_pid(session, victim)
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    first = first_row(run, attempt=1)
    run.wait(120)
    assert run.status == "succeeded" and run.outputs["attempt"] == 1, (run.status, run.outputs)
    resumed = run.outputs["resumed_from"]
    rows = run.store.execute("SELECT DISTINCT step FROM metrics WHERE run=? AND attempt=0 AND step>=?",
                             (run.seq, resumed))
    last0 = run.store.execute("SELECT MAX(step) FROM metrics WHERE run=? AND attempt=0", (run.seq,))[0][0]
    events = dict(run.store.execute(
        "SELECT kind, MIN(time) FROM events WHERE (run=? OR pool=?) AND time>=? AND kind IN ('node_lost', 'retry')"
        " GROUP BY kind", (run.seq, session.pool().id, killed)))
    started = run.store.attempts(run.seq)[1]["started"]
    steps = sorted(run.history.index)
    assert steps == list(range(STEPS)), "the curve is not continuous"
    return {"recovery": first - killed, "lost": len(rows), "kill_at": kill_at, "last0": last0,
            "resumed": resumed, "victim": victim, "detected": events.get("node_lost", float("nan")) - killed,
            "retry_event": events.get("retry", float("nan")) - killed, "attempt_started": started - killed}


def rerun_by_hand(ip, lm) -> float:
    """One free node's agent killed; once the pool knows, the cell again: submit -> first step."""
    session = lm.current_session()
    pool = session.pool()
    victim = sorted(link.name for link in pool.live_nodes)[-1]
    os.kill(agent_pid(session, victim), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(link.name == victim for link in pool.live_nodes):
        assert time.monotonic() < deadline, "the pool never noticed the lost node"
        time.sleep(0.01)
    run, t0 = submit(ip, lm, "--name by-hand")
    took = first_row(run) - t0
    run.cancel()
    run.wait_done(30)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    fresh_home()
    logging.getLogger("lepton_magic").setLevel(logging.ERROR)  # the expected "node lost" warnings
    ip = shell()
    ip.run_line_magic("load_ext", "lepton_magic")
    import lepton_magic as lm

    lm.current_session().config.set("progress", "false")
    print(f"fail-over of a 2-node DDP run (a step logged every 0.1 s, checkpoint every {EVERY} steps, "
          f"{STEPS} steps), one node's agent killed with SIGKILL; {args.repeat} repeats")
    rng = random.Random(0)
    fresh, results, by_hand = [], [], []
    for i in range(args.repeat):
        fresh.append(fresh_start(ip, lm))
        r = failover(ip, lm, rng.randrange(*KILL_RANGE), victim_rank=1 if i % 2 == 0 else 0)
        results.append(r)
        by_hand.append(rerun_by_hand(ip, lm))
        print(f"  #{i + 1}: killed {r['victim']} (rank {1 if i % 2 == 0 else 0}) once the store had step {r['kill_at']}: "
              f"node_lost event {r['detected']:.2f} s, retry event {r['retry_event']:.2f} s, attempt 2 started "
              f"{r['attempt_started']:.2f} s, its first step {r['recovery']:.2f} s after the kill; "
              f"attempt 1 logged up to step {r['last0']}, attempt 2 resumed from {r['resumed']} "
              f"-> {r['lost']} steps repeated | fresh run to first step {fresh[-1]:.2f} s, "
              f"rerun by hand {by_hand[-1]:.2f} s")
    quiet(ip.run_line_magic, "lepton", "down")

    recovery = statistics.median(r["recovery"] for r in results)
    lost = statistics.median(r["lost"] for r in results)
    base_fresh, base_hand = statistics.median(fresh), statistics.median(by_hand)
    print(f"  kill -> first step of the retry            median {recovery:6.2f} s   "
          f"(min {min(r['recovery'] for r in results):.2f}, max {max(r['recovery'] for r in results):.2f})")
    started = statistics.median(r["attempt_started"] for r in results)
    print(f"    of which: kill -> node lost {statistics.median(r['detected'] for r in results):.2f} s; "
          f"-> attempt 2 started {started:.2f} s (the {BACKOFF_SECONDS[0]:.0f} s backoff, a replacement "
          f"node acquired); -> its first step {statistics.median(r['recovery'] - r['attempt_started'] for r in results):.2f} s "
          f"(ranks start, the new node's torch import, rendezvous, DDP wrap, restore)")
    print(f"  fresh 2-node run, submit -> first step     median {base_fresh:6.2f} s")
    print(f"  rerun by hand (1 node replaced)            median {base_hand:6.2f} s")
    print(f"  steps repeated after the retry             median {lost:6.1f}     (checkpoint every {EVERY})")
    ratio_line("fail-over, node lost -> first step of the retry vs a fresh run's submit -> first step",
               recovery, base_fresh, f"<= 5 s absolute: {recovery:.2f} s")
    ratio_line("fail-over, node lost -> first step of the retry vs a rerun by hand (1 node replaced)",
               recovery, base_hand, f"<= 5 s absolute: {recovery:.2f} s")
    ratio_line("fail-over, steps of work lost vs the checkpoint interval", lost, EVERY, "<= 1x")


if __name__ == "__main__":
    main()
