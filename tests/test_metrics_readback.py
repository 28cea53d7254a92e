"""Reading a run's metrics back from its columnar copy (columnar.py): the same answers as SQL,
whatever happened to the copy."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from lepton_magic import columnar
from lepton_magic.run import Run
from lepton_magic.store import Store
from lepton_magic.ui.model import RunView

pytest.importorskip("pyarrow")


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "home")
    yield s
    s.close()


def new_run(store: Store) -> int:
    seq, _ = store.add_run(uuid.uuid4().hex[:12], None)
    return seq


@pytest.fixture
def sql_only(monkeypatch):
    """Switch the columnar copy off for reads: what the SQL path answers."""
    def switch():
        monkeypatch.setattr(columnar, "read", lambda *a, **k: (None, 0))
    return switch


def log(store, seq, rank, steps, names, values, attempt=0, t=1_700_000_000.0):
    store.add_metrics(seq, rank, list(steps), list(names), list(values), [t + s for s in steps], attempt)


def answers(store: Store, seq: int):
    run = Run(store, seq)
    view = RunView(store, seq).refresh()
    curves = {(n, r): (s.x.copy(), s.y.copy()) for n, per in view.series.items() for r, s in per.items()}
    return run.metrics, run.history, curves, view._metric_cursor


def assert_same(a, b, curves=True):
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert a[3] == b[3]
    if curves:
        assert_same_curves(a[2], b[2])


def assert_same_curves(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        np.testing.assert_array_equal(a[key][1], b[key][1])


def fill(store, seq, retried=False):
    nan = float("nan")
    log(store, seq, 0, [0, 0, 1, 1, 2, 2], ["loss", "acc"] * 3, [1.0, 0.1, nan, 0.2, 0.5, None])
    log(store, seq, 1, [0, 1, 2], ["loss"] * 3, [1.5, 1.2, math.inf])
    log(store, seq, 2, [0, 1, 2, 3], ["lr", "loss", "loss", "grad_norm"], [1e-3, 2.0, 1.9, 7.0])
    log(store, seq, 0, [3, 3, 3], ["loss", "loss", "acc"], [0.4, 0.3, 0.25])  # a step logged twice
    if retried:  # attempt 2 resumes from step 2: its points win
        log(store, seq, 0, [2, 2, 3, 4], ["loss", "acc", "loss", "loss"], [0.45, 0.21, nan, 0.2], attempt=1)
        log(store, seq, 1, [2, 3], ["loss", "loss"], [1.1, 1.0], attempt=1)


@pytest.mark.parametrize("retried", [False, True])
def test_the_columnar_copy_answers_what_sql_answers(store, sql_only, retried):
    seq = new_run(store)
    live = RunView(store, seq, follow=True).refresh()  # takes each batch as it is written
    fill(store, seq, retried)
    live.refresh()
    live_curves = {(n, r): (s.x.copy(), s.y.copy()) for n, per in live.series.items() for r, s in per.items()}
    live.close()
    table, _ = store.metric_table(seq)
    assert table is not None and table.num_rows == store.execute(
        "SELECT COUNT(*) FROM metrics WHERE run=?", (seq,))[0][0]
    fast = answers(store, seq)
    assert fast[0]["value"].isna().sum() == 2  # NaN and None stay missing
    assert fast[0]["time"].dt.tz is not None
    if retried:
        assert len(fast[0].drop_duplicates(["rank", "step", "name"])) == len(fast[0])
        assert list(fast[2][("loss", 0)][0]) == [0, 1, 2, 3, 4]  # one curve: attempt 2 from step 2 on
    # the first read draws the curves a live view drew batch by batch
    assert_same_curves(fast[2], live_curves)
    sql_only()
    # (SQL's first read of a whole retried run joins all points of a curve at once: attempt 1's
    # later points, then attempt 2's; the columnar read does what a live view does)
    assert_same(fast, answers(store, seq), curves=not retried)


def test_many_batches_of_several_metrics(store, sql_only):
    seq = new_run(store)
    rng = np.random.default_rng(1)
    for start in range(0, 20_000, 4096):
        for rank in range(3):
            steps = [start // 2 + i // 2 for i in range(4096)]
            log(store, seq, rank, steps, ["loss", "acc"] * 2048, rng.standard_normal(4096).tolist())
    fast = answers(store, seq)
    assert len(fast[0]) == 3 * 5 * 4096
    sql_only()
    assert_same(fast, answers(store, seq))


def test_a_run_without_points_and_an_unknown_run(store):
    seq = new_run(store)
    table, last = store.metric_table(seq)
    assert table.num_rows == 0 and last == 0
    assert Run(store, seq).metrics.empty
    assert store.metric_table(9999) == (None, 0)


def test_rows_written_without_a_copy_are_read_from_sql_then_copied(store, sql_only):
    seq = new_run(store)
    fill(store, seq)
    # a lost batch: rows in the table, not in the file (a writer without pyarrow, say)
    store.write([("INSERT INTO metrics (run, rank, step, name, value, time, attempt) VALUES (?, ?, ?, ?, ?, ?, 0)",
                  (seq, 1, 10 + i, "loss", 0.1 * i, 1.0)) for i in range(5)])
    table, _ = store.metric_table(seq)
    assert table is not None  # the file, then the 5 rows from SQL
    fast = answers(store, seq)
    log(store, seq, 1, [20], ["loss"], [9.0])  # the next writer copies the missing rows first
    points = store.execute("SELECT points, last_rowid FROM metric_files WHERE run=?", (seq,))[0]
    assert points == tuple(store.execute("SELECT COUNT(*), MAX(rowid) FROM metrics WHERE run=?", (seq,))[0])
    after = answers(store, seq)
    sql_only()
    assert_same(after, answers(store, seq))
    assert len(after[0]) == len(fast[0]) + 1


def test_a_missing_or_cut_file_falls_back_to_sql(store, sql_only):
    seq = new_run(store)
    fill(store, seq, retried=True)
    path = columnar.file_path(store.home, Run(store, seq).id)
    expected_sql = None
    os.rename(path, str(path) + ".away")
    assert store.metric_table(seq) == (None, 0)
    fallback = answers(store, seq)
    os.rename(str(path) + ".away", path)
    with open(path, "r+b") as f:  # committed bytes lost (a power cut)
        f.truncate(os.path.getsize(path) - 10)
    assert store.metric_table(seq) == (None, 0)
    log(store, seq, 0, [5], ["loss"], [0.1], attempt=1)  # the writer gives the file up: no holes
    assert store.execute("SELECT bytes FROM metric_files WHERE run=?", (seq,))[0][0] == columnar.BROKEN
    assert store.metric_table(seq) == (None, 0)
    after = answers(store, seq)
    sql_only()
    expected_sql = answers(store, seq)
    assert_same(after, expected_sql)
    assert len(after[0]) == len(fallback[0]) + 1


def test_bytes_a_crashed_writer_left_past_its_commit_are_ignored_then_cut(store, sql_only):
    seq = new_run(store)
    fill(store, seq)
    path = columnar.file_path(store.home, Run(store, seq).id)
    committed = os.path.getsize(path)
    junk = columnar.batch_bytes(0, [99], ["loss"], [1.0], [1.0], 0)
    with open(path, "ab") as f:  # a batch written, its transaction never committed
        f.write(junk + junk[:7])
    fast = answers(store, seq)
    log(store, seq, 0, [4], ["loss"], [0.2])
    assert os.path.getsize(path) == store.execute("SELECT bytes FROM metric_files WHERE run=?", (seq,))[0][0]
    assert os.path.getsize(path) > committed
    after = answers(store, seq)
    assert 99 not in after[0]["step"].tolist()
    sql_only()
    assert_same(after, answers(store, seq))
    assert len(after[0]) == len(fast[0]) + 1


def test_a_failing_copy_never_loses_points(store, monkeypatch, sql_only):
    seq = new_run(store)
    log(store, seq, 0, [0, 1], ["loss"] * 2, [1.0, 0.9])

    def boom(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(columnar, "batch_bytes", boom)
    log(store, seq, 0, [2, 3], ["loss"] * 2, [0.8, 0.7])
    monkeypatch.undo()
    log(store, seq, 0, [4], ["loss"], [0.6])
    assert store.metric_table(seq) == (None, 0)
    assert Run(store, seq).metrics["step"].tolist() == [0, 1, 2, 3, 4]


def test_a_reused_run_number_starts_a_new_file(store):
    seq = new_run(store)
    log(store, seq, 0, [0, 1], ["loss"] * 2, [1.0, 0.9])
    store.write([("DELETE FROM metrics WHERE run=?", (seq,)), ("DELETE FROM runs WHERE seq=?", (seq,))])
    again = new_run(store)
    assert again == seq  # SQLite hands the freed number out again
    log(store, again, 0, [7], ["acc"], [0.5])
    table, _ = store.metric_table(again)
    assert table is not None and table.num_rows == 1
    assert Run(store, again).metrics["name"].tolist() == ["acc"]


def test_the_file_is_a_plain_private_arrow_stream(tmp_path):
    old = os.umask(0)  # a careless umask must not open it up
    try:
        store = Store(tmp_path / "home")
        seq = new_run(store)
        log(store, seq, 0, [0, 1], ["loss"] * 2, [1.0, 0.9])
        log(store, seq, 1, [0, 1], ["loss", "acc"], [1.0, 0.9])
    finally:
        os.umask(old)
    path = columnar.file_path(store.home, Run(store, seq).id)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    import pyarrow as pa

    with pa.OSFile(str(path)) as f:
        table = pa.ipc.open_stream(f).read_all()
    assert table.num_rows == 4 and table.column_names == ["rank", "step", "name", "value", "time", "attempt"]
    store.close()


WRITER = """
import sys, time
from lepton_magic.store import Store
store = Store(sys.argv[1])
seq = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    n = 1000 + 37 * (i % 5)
    steps = list(range(i * 2000, i * 2000 + n))
    store.add_metrics(seq, i % 2, steps, ["loss", "acc"] * (n // 2) + ["loss"] * (n % 2),
                      [float(s) for s in steps], [time.time()] * n)
store.close()
"""


def test_a_reader_while_another_process_writes(store, tmp_path):
    seq = new_run(store)
    batches = 150
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    writer = subprocess.Popen([sys.executable, str(script), str(store.home), str(seq), str(batches)], env=env)
    reads, seen, used = 0, 0, False
    try:
        while writer.poll() is None or reads == 0:
            table, last = store.metric_table(seq)
            if table is None:  # only before the first copy lands (SQL then), never after
                assert seen == 0 and not used
                continue
            used = used or table.num_rows > 0
            # every point up to `last` and nothing after it: what SQL holds up to that rowid
            count = store.execute("SELECT COUNT(*) FROM metrics WHERE run=? AND rowid<=?", (seq, last))[0][0]
            assert table.num_rows == count >= seen
            if table.num_rows:
                steps = table.column("step").to_numpy()
                values = table.column("value").to_numpy()
                np.testing.assert_array_equal(steps.astype(float), values)
            seen = table.num_rows
            reads += 1
            time.sleep(0.005)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    total = store.execute("SELECT COUNT(*) FROM metrics WHERE run=?", (seq,))[0][0]
    table, _ = store.metric_table(seq)
    assert table.num_rows == total and reads > 1
    df = Run(store, seq).metrics
    assert len(df) == total and set(df["name"]) == {"loss", "acc"}


def test_two_threads_writing_one_run_leave_the_copy_whole(store, sql_only):
    """Two nodes' reader threads write one run at once: the copy holds every row once, in order."""
    import threading

    seq = new_run(store)

    def write(rank):
        for i in range(40):
            log(store, seq, rank, range(i * 50, i * 50 + 50), ["loss"] * 50, [float(rank)] * 50)

    threads = [threading.Thread(target=write, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table, _ = store.metric_table(seq)
    assert table is not None and table.num_rows == 4000
    fast = answers(store, seq)
    sql_only()
    assert_same(fast, answers(store, seq))
