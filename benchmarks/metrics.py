"""Metric throughput: `lepton.log` from one rank into the store, and its cost per call in the
training loop, against ipyparallel's datapub (`publish_data`) streaming from one engine and a
bare `list.append` of the same record, all measured in the same run.

Reading a run back (issue 14): 2 ranks x 1M points written with `Store.add_metrics` in the
batches ranks send (4096 points), then
- `run.metrics` (columnar copy) against today's SQL path (the same property with the columnar
  copy switched off) and against `pandas.read_parquet` of the same DataFrame (the floor);
- `Run.history` both ways;
- the first panel frame of a finished 1M-point run (2 ranks x 500k):
  `RunPanel(RunView(...)).update(force=True)`, both ways;
- the store's own write throughput with the columnar copy and without it.

    python benchmarks/metrics.py [--points 1000000] [--read-points 1000000] [--skip-log]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import uuid

from _common import fresh_home, start_ipyparallel

BATCH = 4096  # what a rank sends at once (agent/runtime.py BATCH_POINTS)


def ipyparallel_datapub(points: int) -> float:
    """Messages per second that reach the client from one engine through publish_data."""
    cluster, client = start_ipyparallel(1)
    engine = client[0]
    code = (
        "from ipyparallel.datapub import publish_data\n"
        f"for i in range({points}):\n"
        "    publish_data({'step': i, 'loss': 0.5})\n"
    )
    t0 = time.perf_counter()
    result = engine.execute(code, block=False)
    while True:
        client.spin()
        data = result.data
        if data and data.get("step") == points - 1:
            break
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    client.close()
    cluster.stop_cluster_sync()
    return points / elapsed


@contextlib.contextmanager
def sql_only():
    """Today's path: the columnar copy neither written nor read."""
    from lepton_magic import columnar

    read, append = columnar.read, columnar.append
    columnar.read = lambda *a, **k: (None, 0)
    columnar.append = lambda *a, **k: None
    try:
        yield
    finally:
        columnar.read, columnar.append = read, append


def write_run(store, per_rank: int, metrics: int = 1) -> tuple[int, float]:
    """A run of 2 ranks x ``per_rank`` points written as ranks send them; (seq, seconds)."""
    import numpy as np

    seq, _ = store.add_run(uuid.uuid4().hex[:12], None)
    names = ["loss", "acc", "lr", "grad_norm"][:metrics]
    rng = np.random.default_rng(0)
    elapsed = 0.0
    for start in range(0, per_rank, BATCH):
        n = min(BATCH, per_rank - start)
        steps = [start + i // metrics for i in range(n)]
        batch_names = [names[i % metrics] for i in range(n)]
        for rank in (0, 1):
            values = (2.0 * np.exp(-np.asarray(steps) / 200_000) + 0.05 * rng.standard_normal(n)).tolist()
            times = [time.time()] * n
            t0 = time.perf_counter()
            store.add_metrics(seq, rank, steps, batch_names, values, times)
            elapsed += time.perf_counter() - t0
    store.update_run(seq, status="succeeded", started=time.time() - 1, ended=time.time())
    return seq, elapsed


def best(fn, repeat: int) -> tuple[float, object]:
    """(median seconds, last result) of ``repeat`` calls after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def readback(per_rank: int, panel_per_rank: int, repeat: int) -> None:
    import pandas as pd

    from lepton_magic.run import Run
    from lepton_magic.store import Store
    from lepton_magic.ui.model import RunView
    from lepton_magic.ui.panel import RunPanel

    home = tempfile.mkdtemp(prefix="lepton-bench-readback-")
    store = Store(home)
    print(f"reading a run back: 2 ranks x {per_rank:,} points, 1 metric, written in batches of {BATCH:,}")
    seq, wrote = write_run(store, per_rank)
    with sql_only():
        seq_sql, wrote_sql = write_run(store, per_rank)
    points = 2 * per_rank
    print(f"  Store.add_metrics with the columnar copy     {points / wrote:12,.0f} points/s")
    print(f"  Store.add_metrics, SQL only (before)          {points / wrote_sql:12,.0f} points/s")
    count = store.execute("SELECT COUNT(*) FROM metrics WHERE run=?", (seq,))[0][0]
    assert count == points, f"points were lost: {count} of {points}"
    run = Run(store, seq)
    fast, df = best(lambda: run.metrics, repeat)
    with sql_only():
        sql, df_sql = best(lambda: run.metrics, max(1, repeat // 3))
    pd.testing.assert_frame_equal(df, df_sql)
    parquet = os.path.join(home, "points.parquet")
    df.to_parquet(parquet)
    floor, df_pq = best(lambda: pd.read_parquet(parquet), repeat)
    assert len(df_pq) == len(df)
    print(f"  run.metrics, columnar copy                    {fast * 1e3:9.1f} ms   ({len(df):,} rows)")
    print(f"  run.metrics, SQL (before)                     {sql * 1e3:9.1f} ms")
    print(f"  pandas.read_parquet of the same DataFrame     {floor * 1e3:9.1f} ms   (the floor)")
    hist, wide = best(lambda: run.history, repeat)
    with sql_only():
        hist_sql, wide_sql = best(lambda: run.history, max(1, repeat // 3))
    pd.testing.assert_frame_equal(wide, wide_sql)
    print(f"  run.history, columnar copy                    {hist * 1e3:9.1f} ms")
    print(f"  run.history, SQL (before)                     {hist_sql * 1e3:9.1f} ms")

    print(f"first panel frame of a finished run: 2 ranks x {panel_per_rank:,} points")
    pseq, _ = write_run(store, panel_per_rank)

    def first_frame():
        panel = RunPanel(RunView(store, pseq))
        panel.update(force=True)
        return panel

    frame, panel = best(first_frame, repeat)
    with sql_only():
        frame_sql, panel_sql = best(first_frame, max(1, repeat // 3))
    for rank in (0, 1):
        assert panel.view.series["loss"][rank].n == panel_sql.view.series["loss"][rank].n == panel_per_rank
    print(f"  RunPanel(RunView(...)).update(force=True)     {frame * 1e3:9.1f} ms")
    print(f"  the same, SQL (before)                        {frame_sql * 1e3:9.1f} ms")
    store.close()
    import shutil

    shutil.rmtree(home, ignore_errors=True)
    print(f"RATIO run.metrics {points:,} points vs pandas.read_parquet: {fast / floor:.2f}x of the floor "
          f"({fast:.3f} s; target <= 0.3 s)")
    print(f"RATIO run.metrics {points:,} points vs today's SQL path: {fast / sql:.3f}x "
          f"({sql / fast:.1f}x faster; target <= 0.1x)")
    print(f"RATIO run.history vs today's SQL path: {hist / hist_sql:.3f}x")
    print(f"RATIO first panel frame of {2 * panel_per_rank:,} points vs today's SQL path: {frame / frame_sql:.3f}x "
          f"({frame:.3f} s; target <= 0.2 s)")
    print(f"RATIO store write throughput with the columnar copy vs SQL only: {wrote_sql / wrote:.2f}x "
          f"({points / wrote:,.0f} points/s; target >= 300,000 points/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--datapub-points", type=int, default=20_000)
    parser.add_argument("--read-points", type=int, default=1_000_000, help="points per rank read back")
    parser.add_argument("--panel-points", type=int, default=500_000, help="points per rank in the panel run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-log", action="store_true", help="only the read-back part")
    args = parser.parse_args()
    fresh_home()
    readback(args.read_points, args.panel_points, args.repeat)
    if args.skip_log:
        return
    print()
    from lepton_magic.session import Session

    print(f"metrics: {args.points:,} points from 1 rank (1 metric per call)")
    baseline = ipyparallel_datapub(args.datapub_points)
    print(f"  ipyparallel datapub, 1 engine              {baseline:12,.0f} messages/s")

    session = Session()
    session.up(nodes=1)
    time.sleep(4)
    code = (
        "import time\n"
        f"N = {args.points}\n"
        "records = []\n"
        "t0 = time.perf_counter()\n"
        "for i in range(N):\n"
        "    records.append((i, time.time(), {'loss': float(0.5)}))\n"
        "append_cost = (time.perf_counter() - t0) / N\n"
        "del records\n"
        "t0 = time.perf_counter()\n"
        "for i in range(N):\n"
        "    lepton.log(step=i, loss=0.5)\n"
        "log_cost = (time.perf_counter() - t0) / N\n"
    )

    def logged() -> tuple[dict, int, float]:
        ns: dict = {}
        run = session.submit(code, ns, nodes=1, bind=True)
        run.wait()
        stored = session.store.execute("SELECT COUNT(*), MIN(time) FROM metrics WHERE run=?", (run.seq,))[0]
        ended = session.store.run_row(run.seq)["ended"]
        count, first = stored
        if count:  # the columnar copy holds every point too (when it is on)
            table, _ = session.store.metric_table(run.seq)
            assert table is None or table.num_rows == count
        return ns, count, count / (ended - first)

    with sql_only():  # the same cell before the columnar copy, in the same session
        _, count_sql, throughput_sql = logged()
    ns, count, throughput = logged()
    session.down()
    print(f"  lepton points into the store, SQL only (before) {throughput_sql:8,.0f} points/s "
          f"({count_sql:,} of {args.points:,} stored)")
    print(f"  lepton.log per call                         {ns['log_cost'] * 1e6:8.2f} µs "
          f"(list.append of the same record {ns['append_cost'] * 1e6:.2f} µs)")
    print(f"  lepton points into the store                {throughput:12,.0f} points/s "
          f"({count:,} of {args.points:,} stored)")
    assert count == count_sql == args.points, "points were lost"
    print(f"RATIO metric throughput with the columnar copy vs SQL only: {throughput / throughput_sql:.2f}x "
          f"({throughput:,.0f} points/s; target >= 300,000 points/s)")
    print(f"RATIO metric throughput: {throughput / baseline:.1f}x of ipyparallel datapub (target: >= 200,000 points/s)")
    print(f"RATIO lepton.log cost: {ns['log_cost'] / ns['append_cost']:.2f}x of a bare list.append "
          f"(target: <= 3 µs per call)")


if __name__ == "__main__":
    main()
