"""A columnar copy of each run's metrics, for reading a run back at once.

The SQLite ``metrics`` table stays the truth (the sweep driver, the tests and reconcile query it
with SQL). Beside it, every batch ``Store.add_metrics`` writes is also appended, right after its
rows are committed (so the copy never delays them), to one Arrow IPC stream per run: ``LEPTON_HOME/metrics/<run id>.arrows``
(private: 0600 in a 0700 folder), columns rank, step, name (dictionary-encoded), value, time,
attempt, one record batch per call. It is a plain Arrow stream: ``pyarrow.ipc.open_stream`` or
``polars.read_ipc_stream`` read it.

What makes it safe to read while a writer in another process appends, and after a crash, is a
row per run in the ``metric_files`` table, written in the transaction that appends to the file
(under SQLite's write lock, which orders writers of every process): how many bytes of the file
are committed, how many points they hold, and the rowids of the first and last ``metrics`` row
they copy. A writer finds rows committed without their copy (a crash between the two
transactions, a writer without pyarrow) as a gap before its own batch and copies them first. A reader takes that row and the run's smallest and largest
rowid in one statement (one snapshot; both lookups are on the ``metrics_run`` index, O(log n)),
reads the committed prefix of the file only, and reads from SQL the rows after the last copied
rowid (normally none, or the batch whose copy is on its way). Whatever a crash left past the committed bytes is cut off by the next
writer. A file that is missing, shorter than its committed bytes, unreadable, or that does not
hold what its row says, is not used: the reader falls back to SQL, and the writer stops
appending to it (``bytes`` -1) rather than leave a hole.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import private

log = logging.getLogger("lepton_magic.columnar")

FOLDER = "metrics"
SUFFIX = ".arrows"
TABLE = """
CREATE TABLE IF NOT EXISTS metric_files (
    run INTEGER PRIMARY KEY, id TEXT NOT NULL, bytes INTEGER NOT NULL, points INTEGER NOT NULL,
    first_rowid INTEGER, last_rowid INTEGER
);
"""
#: Rows a writer copies from SQL into the file when it finds the file behind the table (points
#: written by a process without pyarrow); beyond this the file is given up (readers use SQL).
CATCH_UP_LIMIT = 200_000
#: ``bytes`` of a run whose file was given up.
BROKEN = -1

_pa = None


def arrow():
    """pyarrow, imported on first use (None when it is not installed: SQL only)."""
    global _pa
    if _pa is None:
        try:
            import pyarrow
        except ImportError:  # pragma: no cover - a dependency; SQL keeps working without it
            _pa = False
        else:
            _pa = pyarrow
    return _pa or None


_schema = None


def schema():
    global _schema
    if _schema is None:
        pa = arrow()
        _schema = pa.schema([
            ("rank", pa.int32()), ("step", pa.int64()), ("name", pa.dictionary(pa.int32(), pa.string())),
            ("value", pa.float64()), ("time", pa.float64()), ("attempt", pa.int32()),
        ])
    return _schema


_head: bytes | None = None


def _stream_bytes(batch=None) -> bytes:
    pa = arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema()) as writer:
        if batch is not None:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def stream_head() -> bytes:
    """The schema message every file starts with (a stream minus its 8-byte end marker)."""
    global _head
    if _head is None:
        _head = _stream_bytes()[:-8]
    return _head


def batch_bytes(rank: int, steps: list, names: list, values: list, times: list, attempt: int) -> bytes:
    """One batch as the messages that follow the schema in a stream: its dictionary (the batch's
    metric names; a replacement, which the stream format allows) and the record batch."""
    pa = arrow()
    n = len(steps)
    try:
        step_a = pa.array(np.fromiter(steps, np.int64, n))
    except (TypeError, ValueError, OverflowError):  # None steps, or odd types: Arrow's own rules
        step_a = pa.array(steps, pa.int64())
    try:
        value_a = pa.array(np.fromiter(values, np.float64, n))
    except (TypeError, ValueError):
        value_a = pa.array(values, pa.float64())
    try:
        time_a = pa.array(np.fromiter(times, np.float64, n))
    except (TypeError, ValueError):
        time_a = pa.array(times, pa.float64())
    batch = pa.record_batch([
        pa.array(np.full(n, rank, np.int32)), step_a, _names(names), value_a, time_a,
        pa.array(np.full(n, attempt, np.int32)),
    ], schema=schema())
    whole = _stream_bytes(batch)
    head = stream_head()
    assert whole.startswith(head) and whole.endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00")
    return whole[len(head):-8]


def _names(names: list):
    """Names dictionary-encoded without hashing every string: a batch holds one metric, or the
    same few metrics repeated point after point (``lepton.log(loss=..., acc=...)``)."""
    pa = arrow()
    n = len(names)
    unique = list(dict.fromkeys(names))
    k = len(unique)
    if k == 1:
        codes = np.zeros(n, np.int32)
    elif n % k == 0 and names == unique * (n // k):
        codes = np.tile(np.arange(k, dtype=np.int32), n // k)
    else:
        index = {name: i for i, name in enumerate(unique)}
        codes = np.fromiter(map(index.__getitem__, names), np.int32, n)
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(unique, pa.string()))


def folder(home: Path) -> Path:
    return Path(home) / FOLDER


def file_path(home: Path, run_id: str) -> Path:
    return folder(home) / f"{run_id}{SUFFIX}"


# --- writing --------------------------------------------------------------------------------
def append(transaction, home: Path, seq: int, rank: int, steps: list, names: list, values: list,
           times: list, attempt: int, last: int) -> None:
    """Copy the batch just committed to ``metrics`` (its last rowid ``last``) to the run's file
    and record what the file now holds, in a ``transaction()`` of its own (the SQLite write lock
    orders writers of every process). The bytes are built first, outside any lock. Never raises:
    the SQL rows stand whatever happens to the copy."""
    if not steps or arrow() is None:
        return
    try:
        data = batch_bytes(rank, steps, names, values, times, attempt)
        with transaction() as db:
            _append(db, str(home), seq, len(steps), data, last)
    except Exception as e:  # noqa: BLE001 - a disk full or a bad value: the file is given up
        log.warning("lepton: the columnar copy of run %s's metrics stops (%s: %s); reads use SQL",
                    seq, type(e).__name__, e)
        try:
            with transaction() as db:
                _give_up(db, seq)
        except Exception:  # noqa: BLE001
            pass


def _give_up(db, seq: int) -> None:
    db.execute("UPDATE metric_files SET bytes=? WHERE run=?", (BROKEN, seq))


APPEND_STATE_SQL = (
    "SELECT (SELECT id FROM runs WHERE seq=?1), f.id, f.bytes, f.points, f.first_rowid,"
    " f.last_rowid, (SELECT MAX(rowid) FROM metrics WHERE run=?1 AND rowid<?2)"
    " FROM (SELECT 1) LEFT JOIN metric_files f ON f.run=?1"
)


def _append(db, home: str, seq: int, n: int, data: bytes, last: int) -> None:
    # One statement: the run, what its file holds, and the run's row before this batch (the
    # file must end there, or rows were committed without their copy: catch them up first).
    first = last - n + 1
    run_id, file_id, *row, before = db.execute(APPEND_STATE_SQL, (seq, first)).fetchone()
    if run_id is None:
        return  # points of a run the store does not know: nothing reads them back as a run
    if file_id == run_id and row[0] == BROKEN:
        return
    if file_id != run_id:  # a new file (a reused seq gets a new one too)
        start, points, first_copied, last_copied = 0, 0, None, None
        db.execute("INSERT OR REPLACE INTO metric_files (run, id, bytes, points) VALUES (?, ?, 0, 0)",
                   (seq, run_id))
    else:
        start, points, first_copied, last_copied = row
        if last_copied is not None and first <= last_copied:
            return  # a writer that came later copied these rows with its own (catching up)
    # Rows of this run the file lacks (written without a copy): copy them first, or give up.
    chunks: list[bytes] = []
    if before != last_copied:
        missing = db.execute("SELECT COUNT(*) FROM metrics WHERE run=? AND rowid>? AND rowid<?",
                             (seq, last_copied or 0, first)).fetchone()[0]
        if missing > CATCH_UP_LIMIT or (last_copied is not None and before is not None and before < last_copied):
            _give_up(db, seq)
            return
        rows = db.execute("SELECT rowid, rank, step, name, value, time, attempt FROM metrics "
                          "WHERE run=? AND rowid>? AND rowid<? ORDER BY rowid",
                          (seq, last_copied or 0, first)).fetchall()
        if first_copied is None and rows:
            first_copied = rows[0][0]
        for group in _runs_of(rows):
            r, a = group[0][1], group[0][6]
            chunks.append(batch_bytes(r, [x[2] for x in group], [x[3] for x in group],
                                      [x[4] for x in group], [x[5] for x in group], a))
            points += len(group)
    chunks.append(data)
    points += n
    if first_copied is None:
        first_copied = first
    path = os.path.join(home, FOLDER, run_id + SUFFIX)
    if start == 0:
        private.make_dir(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, private.FILE_MODE)
    except FileNotFoundError:  # the folder went away since this file was started
        private.make_dir(os.path.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, private.FILE_MODE)
    try:
        info = os.fstat(fd)
        if info.st_mode & private.SHARED_BITS:
            os.fchmod(fd, private.FILE_MODE)
        size = info.st_size
        if size < start:  # committed bytes are gone: the file cannot be trusted any more
            _give_up(db, seq)
            return
        if size > start:  # what a writer that crashed before its commit left
            os.ftruncate(fd, start)
        blob = b"".join(([stream_head()] if start == 0 else []) + chunks)
        written = os.pwrite(fd, blob, start)
        if written != len(blob):
            raise OSError(f"short write ({written} of {len(blob)} bytes)")
    finally:
        os.close(fd)
    db.execute("UPDATE metric_files SET bytes=?, points=?, first_rowid=?, last_rowid=? WHERE run=?",
               (start + len(blob), points, first_copied, last, seq))


def _runs_of(rows: list[tuple]) -> list[list[tuple]]:
    """Consecutive rows of one (rank, attempt): a batch each."""
    groups: list[list[tuple]] = []
    for row in rows:
        if groups and groups[-1][0][1] == row[1] and groups[-1][0][6] == row[6]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


# --- reading --------------------------------------------------------------------------------
STATE_SQL = (
    "SELECT r.id, f.id, f.bytes, f.points, f.first_rowid, f.last_rowid,"
    " (SELECT MIN(rowid) FROM metrics WHERE run=?1), (SELECT MAX(rowid) FROM metrics WHERE run=?1)"
    " FROM runs r LEFT JOIN metric_files f ON f.run = r.seq WHERE r.seq=?1"
)
TAIL_SQL = ("SELECT rowid, rank, step, name, value, time, attempt FROM metrics WHERE run=? AND rowid>?"
            " ORDER BY rowid")


def read(execute: Callable[[str, Any], list], home: Path, seq: int):
    """Every point of run ``seq`` as an Arrow table (rowid order, one chunk per batch) and the
    largest rowid it covers; the table is None when the file cannot be used (then read SQL).
    ``execute(sql, params)`` runs one statement on the store."""
    pa = arrow()
    if pa is None:
        return None, 0
    state = execute(STATE_SQL, (seq,))
    if not state:
        return None, 0
    run_id, file_id, size, points, first_copied, last_copied, min_rowid, max_rowid = state[0]
    if max_rowid is None:  # no points (yet)
        return schema().empty_table(), 0
    if file_id != run_id or size is None or size <= 0 or first_copied != min_rowid:
        return None, 0
    try:
        with pa.memory_map(str(file_path(home, run_id))) as source:
            if source.size() < size:
                return None, 0
            buffer = source.read_buffer(size)
        table = pa.ipc.open_stream(buffer).read_all()
    except (OSError, pa.ArrowException) as e:
        log.warning("lepton: run %s's columnar metrics are unreadable (%s); reading SQL", seq, e)
        return None, 0
    if table.num_rows != points:
        return None, 0
    last = last_copied
    if max_rowid > last_copied:  # rows written after the copy stopped (or without one)
        rows = execute(TAIL_SQL, (seq, last_copied))
        if rows:
            last = rows[-1][0]
            table = pa.concat_tables([table, _table_of(rows)])
    return table, last


def _table_of(rows: list[tuple]):
    """SQL rows (rowid, rank, step, name, value, time, attempt) as a table of the file's schema."""
    pa = arrow()
    names = [r[3] for r in rows]
    batch = pa.record_batch([
        pa.array([r[1] for r in rows], pa.int32()), pa.array([r[2] for r in rows], pa.int64()),
        _names(names), pa.array([r[4] for r in rows], pa.float64()),
        pa.array([r[5] for r in rows], pa.float64()), pa.array([r[6] for r in rows], pa.int32()),
    ], schema=schema())
    return pa.Table.from_batches([batch])


# --- from the table to what readers want -------------------------------------------------------
def name_codes(table) -> tuple[np.ndarray, list[str]]:
    """The name column as int32 codes into one list of names (each batch brings its own
    dictionary; they are small, so this maps dictionaries, never strings per point)."""
    names: dict[str, int] = {}
    parts = []
    for chunk in table.column("name").chunks:
        local = chunk.dictionary.to_pylist()
        mapping = np.array([names.setdefault(n, len(names)) for n in local], np.int32)
        indices = chunk.indices.to_numpy(zero_copy_only=False)
        if len(local) == 1:
            parts.append(np.full(len(indices), mapping[0], np.int32))
        else:
            parts.append(mapping[indices])
    codes = np.concatenate(parts) if parts else np.empty(0, np.int32)
    return codes, list(names)


def column(table, name: str) -> np.ndarray:
    """One numeric column as a numpy array (nulls as NaN, as pandas reads SQL NULLs)."""
    col = table.column(name)
    if col.null_count:
        return col.to_numpy().astype(np.float64) if name in ("step", "value", "time") else col.to_numpy()
    return col.to_numpy()


def frame(table):
    """``Run.metrics`` from the table: columns rank, step, name, value, time (UTC), attempt, with
    the same dtypes a SQL read gives."""
    import pandas as pd

    pa = arrow()
    codes, names = name_codes(table)
    dictionary = pa.array(names, pa.string())
    name = pa.DictionaryArray.from_arrays(pa.array(codes), dictionary).cast(pa.string()) if len(codes) \
        else pa.array([], pa.string())
    step = column(table, "step")
    out = pd.DataFrame({
        "rank": column(table, "rank").astype(np.int64),
        "step": step if step.dtype == np.float64 else step.astype(np.int64),
        "name": pd.Series(name.to_pandas(), dtype="str") if len(codes) else pd.Series([], dtype="str"),
        "value": column(table, "value").astype(np.float64),
        "time": column(table, "time").astype(np.float64),
        "attempt": column(table, "attempt").astype(np.int64),
    })
    return out, codes
