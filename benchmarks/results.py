"""Result transfer: a 1M-row x 4-column DataFrame bound in the kernel from a node, against
ipyparallel's pull of the same frame from an engine, in the same run.

Two views: the transfer alone (ipyparallel: `pull` of a frame that exists on the engine;
lepton: from rank 0 starting to pickle its outputs to the frame bound in the kernel, as the
run records it), and end to end (make the frame remotely, then have it in the kernel).

    python benchmarks/results.py [--rows 1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import fresh_home, ratio_line, start_ipyparallel, summary, timed

MAKE = (
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    "df = pd.DataFrame({{'a': rng.random({rows}), 'b': rng.random({rows}), "
    "'c': np.arange({rows}), 'd': rng.random({rows}).astype('float32')}})\n"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fresh_home()
    code = MAKE.format(rows=args.rows)
    print(f"result transfer: a {args.rows:,} x 4 DataFrame made remotely and bound in the kernel")

    cluster, client = start_ipyparallel(1)
    engine = client[0]

    def ipp_once():
        engine.execute(code, block=True)
        frame = engine.pull("df", block=True)
        assert len(frame) == args.rows

    def ipp_pull():
        assert len(engine.pull("df", block=True)) == args.rows

    baseline_e2e = summary("ipyparallel execute + pull", timed(ipp_once, args.repeat, warmup=1))
    baseline = summary("ipyparallel pull (transfer alone)", timed(ipp_pull, args.repeat, warmup=1))
    client.close()
    cluster.stop_cluster_sync()

    from lepton_magic.session import Session

    session = Session()
    session.up(nodes=1)
    time.sleep(4)
    ns: dict = {}

    transfers = []

    def lepton_once():
        run = session.submit(code, ns, nodes=1, outputs=["df"]).wait()
        assert len(ns["df"]) == args.rows
        # what the run recorded of its outputs' way back (rank 0 pickling them -> bound here)
        (data,) = session.store.execute("SELECT data FROM events WHERE run=? AND kind='outputs'", (run.seq,))[0]
        transfers.append(json.loads(data)["seconds"])

    ours_e2e = summary("lepton run making df, --out df (1 node)", timed(lepton_once, args.repeat, warmup=1))
    ours = summary("lepton result transfer alone", transfers[-args.repeat:])
    session.down()
    size = ns["df"].memory_usage(index=True).sum()
    print(f"  frame size in memory: {size / 1e6:.1f} MB")
    ratio_line("result transfer", ours, baseline, "<= 0.33, i.e. >= 3x faster")
    ratio_line("make + transfer, end to end", ours_e2e, baseline_e2e, "informational")


if __name__ == "__main__":
    main()
