"""Metric throughput: `lepton.log` from one rank into the store, and its cost per call in the
training loop, against ipyparallel's datapub (`publish_data`) streaming from one engine and a
bare `list.append` of the same record, all measured in the same run.

    python benchmarks/metrics.py [--points 1000000]
"""

from __future__ import annotations

import argparse
import time

from _common import fresh_home, start_ipyparallel


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--datapub-points", type=int, default=20_000)
    args = parser.parse_args()
    fresh_home()
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
    ns: dict = {}
    run = session.submit(code, ns, nodes=1, bind=True)
    run.wait()
    stored = session.store.execute("SELECT COUNT(*), MIN(time) FROM metrics WHERE run=?", (run.seq,))[0]
    ended = session.store.run_row(run.seq)["ended"]
    count, first = stored
    throughput = count / (ended - first)
    session.down()
    print(f"  lepton.log per call                         {ns['log_cost'] * 1e6:8.2f} µs "
          f"(list.append of the same record {ns['append_cost'] * 1e6:.2f} µs)")
    print(f"  lepton points into the store                {throughput:12,.0f} points/s "
          f"({count:,} of {args.points:,} stored)")
    assert count == args.points, "points were lost"
    print(f"RATIO metric throughput: {throughput / baseline:.1f}x of ipyparallel datapub (target: >= 200,000 points/s)")
    print(f"RATIO lepton.log cost: {ns['log_cost'] / ns['append_cost']:.2f}x of a bare list.append "
          f"(target: <= 3 µs per call)")


if __name__ == "__main__":
    main()
