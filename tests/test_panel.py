"""The run panel's model and widgets, fed a recorded event stream through a real store."""

import json
import time

import numpy as np
import pytest

from lepton_magic.store import Store
from lepton_magic.ui import panel as panel_module
from lepton_magic.ui.curves import BUCKETS, CurvePlot
from lepton_magic.ui.downsample import Series, minmax
from lepton_magic.ui.model import RunView
from lepton_magic.ui.panel import RunPanel


@pytest.fixture
def recorded(tmp_path):
    """A store holding what a 2-node run sends: nodes, telemetry, metrics, logs."""
    store = Store(tmp_path)
    store.add_pool("p-1", "local", {})
    for i in range(2):
        store.upsert_node("p-1", f"local-{i}", status="ready", host="box", cpus=8, gpus=0,
                          last_seen=time.time(), cpu_percent=50.0,
                          telemetry={"ranks": {str(i): {"cpu": 97.0, "rss": 300 << 20}}, "gpus": []})
    seq, name = store.add_run("r-1", "demo", pool="p-1", backend="local")
    store.write([store.run_node_insert(seq, f"local-{i}", "box", [i], 0, None) for i in range(2)])
    store.update_run(seq, status="running", started=time.time() - 5, world_size=2)
    return store, seq


def log_points(store, seq, start, count, ranks=(0, 1)):
    steps = list(range(start, start + count))
    for rank in ranks:
        values = [1.0 / (s + 1) + 0.01 * rank for s in steps]
        store.add_metrics(seq, rank, steps, ["loss"] * count, values, [time.time()] * count)
        store.add_metrics(seq, rank, steps, ["acc"] * count, [s / 1e3 for s in steps], [time.time()] * count)


def test_view_reads_header_nodes_curves_and_logs(recorded):
    store, seq = recorded
    log_points(store, seq, 0, 100)
    store.add_logs(seq, 0, "stdout", time.time(), ["hello from 0", ""])
    store.add_logs(seq, 1, "stderr", time.time(), ["warning from 1"])
    view = RunView(store, seq).refresh()
    assert view.header.name == "demo" and view.header.status == "running" and view.header.world_size == 2
    assert view.header.step == 99
    assert [n.node for n in view.nodes] == ["local-0", "local-1"]
    assert view.nodes[0].rss == 300 << 20 and view.nodes[0].cpu_percent == 97.0
    assert view.metric_names == ["loss", "acc"]  # loss first: the default curve
    assert view.series["loss"][1].n == 100
    assert list(view.tails[0]) == ["hello from 0", ""]
    log_points(store, seq, 100, 10)  # a refresh reads only what is new
    view.refresh()
    assert view.new_points == 40 and view.series["loss"][0].n == 110


def test_downsampling_keeps_extremes_and_bounds_points():
    x = np.arange(1_000_000, dtype=float)
    y = np.exp(-x / 2e5)
    y[123_456] = 50.0  # a spike must survive
    y[654_321] = np.nan
    dx, dy = minmax(x, y, BUCKETS)
    assert len(dx) <= 2 * BUCKETS + 2
    assert 50.0 in dy and np.all(np.diff(dx) > 0)
    assert dy[0] == 1.0


def test_smoothing_is_incremental_and_matches_a_full_pass():
    s = Series()
    rng = np.random.default_rng(0)
    values = rng.random(5000)
    s.extend(np.arange(3000), values[:3000])
    s.smoothed(0.9)
    s.extend(np.arange(3000, 5000), values[3000:])
    whole = Series()
    whole.extend(np.arange(5000), values)
    np.testing.assert_allclose(s.smoothed(0.9), whole.smoothed(0.9))


def test_curve_image_renders_every_rank():
    plot = CurvePlot()
    series = {}
    for rank in range(3):
        s = Series()
        s.extend(np.arange(200), np.linspace(1, 0, 200) + rank)
        series[rank] = s
    png = plot.render(series, "loss", smoothing=0.5, log_scale=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(plot._lines) == 3
    del series[2]
    plot.render(series, "loss")
    assert len(plot._lines) == 2


def test_panel_throttles_redraws(recorded, monkeypatch):
    store, seq = recorded
    log_points(store, seq, 0, 10)
    p = RunPanel(RunView(store, seq))
    draw = p._draw_curve

    def slow_frame(force):  # a frame longer than the throttle's interval (a busy machine)
        time.sleep(1.2 / panel_module.MAX_FPS)
        draw(force)

    monkeypatch.setattr(p, "_draw_curve", slow_frame)
    assert p.update() is True
    assert p.update() is False  # too soon after the last frame: counted from its end
    monkeypatch.setattr(p, "_draw_curve", draw)
    monkeypatch.setattr(panel_module, "MAX_FPS", 1000.0)
    time.sleep(0.01)
    assert p.update() is True


def test_panel_shows_table_curve_and_freezes_into_a_summary(recorded):
    store, seq = recorded
    log_points(store, seq, 0, 50)
    cancelled = []
    p = RunPanel(RunView(store, seq), on_cancel=lambda: cancelled.append(True))
    p.update(force=True)
    assert p.nodes.value.count('class="lepton-node-row"') == 2
    assert 'class="lepton-status"' in p.header.value and "running" in p.header.value
    first = p.image.value
    assert first[:4] == b"\x89PNG"
    log_points(store, seq, 50, 50)
    p.update(force=True)
    assert p.image.value != first  # new points, new frame
    p.cancel.click()
    assert cancelled == [True] and p.cancel.disabled
    store.update_run(seq, status="succeeded", ended=time.time())
    p.update(force=True)
    assert p._frozen and p.cancel.layout.display == "none"
    assert "final" in p.summary.value and "0.01" in p.summary.value  # rank 1's last loss: 1/100 + 0.01
    assert p.update() is False  # frozen: no more frames from the store
    shown = p.image.value
    p.metric.value = "acc"  # but its controls still redraw it
    assert p.image.value != shown
    assert p.static_png()[:4] == b"\x89PNG"
    bundle = p.widget._repr_mimebundle_()
    assert bundle["text/plain"].startswith("demo succeeded")  # never HBox(children=...)


def test_failed_run_shows_its_error(recorded):
    store, seq = recorded
    store.update_run(seq, status="failed", ended=time.time(),
                     error={"type": "ValueError", "message": "boom", "rank": 0, "node": "local-0",
                            "line": 3, "traceback": "..."})
    p = RunPanel(RunView(store, seq))
    p.update(force=True)
    assert "boom" in p.header.value and "failed" in p.header.value
    json.dumps(p.view.final_metrics())


def test_a_live_view_takes_new_points_from_the_writer_not_the_database(recorded, monkeypatch):
    store, seq = recorded
    log_points(store, seq, 0, 20)
    view = RunView(store, seq, follow=True).refresh()
    assert view.series["loss"][0].n == 20  # what was there before, read once
    reads = []
    original = store.execute
    monkeypatch.setattr(store, "execute", lambda sql, *a: reads.append(sql) or original(sql, *a))
    log_points(store, seq, 20, 30)
    view.refresh()
    assert view.series["loss"][0].n == 50 and view.series["acc"][1].n == 50
    assert not [sql for sql in reads if "FROM metrics" in sql]
    store.update_run(seq, status="succeeded", ended=time.time())
    view.refresh()
    assert not store._listeners  # a finished run is no longer followed


def test_pool_panel_lists_the_nodes(ip):
    import lepton_magic as lm
    from lepton_magic.ui.panel import PoolPanel

    lm.current_session().up(nodes=2)
    p = PoolPanel(lm.current_session())
    p.update()
    assert p.table.value.count('class="lepton-node-row"') >= 2 and "ready" in p.table.value


def _within(seconds, action):
    """Run ``action`` in a thread; fail (instead of hanging the suite) if it does not return."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["value"] = action()
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a deadlock?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# Each row: the metric names logged, batch by batch (a batch may be empty: a refresh with nothing
# new). Regression: a first metric other than "loss" froze the kernel for good (the metric
# dropdown's observer re-entered update() under its own lock).
METRIC_ORDERS = [
    [["acc"]],
    [["zeta", "alpha"]],
    [[], ["acc"], ["acc", "loss"]],
    [["loss"], ["val_loss"], ["lr", "loss"]],
    [["acc"], [], ["b"], ["a"]],
]


@pytest.mark.parametrize("batches", METRIC_ORDERS, ids=lambda b: "-".join("+".join(n) or "none" for n in b))
def test_any_metric_names_in_any_order_never_freeze_the_panel(recorded, batches):
    store, seq = recorded
    p = RunPanel(RunView(store, seq))
    seen: set[str] = set()
    for step, names in enumerate(batches):
        for name in names:
            store.add_metrics(seq, 0, [step], [name], [0.5], [time.time()])
        seen.update(names)
        assert _within(10, lambda: p.update(force=True))
        if seen:
            assert set(p.metric.options) == seen and p.metric.value in seen
            assert p.image.value[:4] == b"\x89PNG"
    if seen:
        other = next(n for n in p.metric.options if n != p.metric.value) if len(seen) > 1 else p.metric.value
        _within(10, lambda: setattr(p.metric, "value", other))  # a person picks another metric
        assert p.metric.value == other
    store.update_run(seq, status="succeeded", ended=time.time())
    _within(10, lambda: p.update(force=True))
    assert p.frozen
    bundle = _within(10, p.static_bundle)
    assert bundle["text/plain"].startswith("demo succeeded")
    assert ("image/png" in bundle) == bool(seen)


def test_a_run_without_metrics_shows_and_freezes(recorded):
    store, seq = recorded
    store.add_logs(seq, 0, "stdout", time.time(), ["only text"])
    p = RunPanel(RunView(store, seq))
    assert _within(10, lambda: p.update(force=True))
    assert p.metric.options == () and p.image.value == b""
    assert "only text" in p.logs.value
    store.update_run(seq, status="succeeded", ended=time.time())
    _within(10, lambda: p.update(force=True))
    bundle = p.static_bundle()
    assert "image/png" not in bundle and "only text" in bundle["text/html"]


def test_the_unfinished_line_of_a_progress_bar_shows_in_the_tail(recorded):
    store, seq = recorded
    store.add_logs(seq, 0, "stdout", time.time(), ["epoch 1"], partial=" 40%|####      | 4/10")
    p = RunPanel(RunView(store, seq))
    p.update(force=True)
    assert "epoch 1" in p.logs.value and "40%" in p.logs.value
    store.add_logs(seq, 0, "stdout", time.time(), [], partial=" 70%|#######   | 7/10")
    p.update(force=True)
    assert "70%" in p.logs.value and "40%" not in p.logs.value
    store.add_logs(seq, 0, "stdout", time.time(), ["100%|##########| 10/10"])  # the line ends
    p.update(force=True)
    assert "100%" in p.logs.value and "70%" not in p.logs.value
    assert store.log_partials(seq) == {}


def test_the_saved_record_holds_the_last_lines_and_says_how_many_more(recorded):
    store, seq = recorded
    store.add_logs(seq, 0, "stdout", time.time(), [f"line {i}" for i in range(250)])
    store.add_logs(seq, 1, "traceback", time.time(), ["Traceback (most recent call last):", "boom"])
    log_points(store, seq, 0, 10)
    store.update_run(seq, status="failed", ended=time.time())
    p = RunPanel(RunView(store, seq))
    p.update(force=True)
    bundle = p.static_bundle()
    text, page = bundle["text/plain"], bundle["text/html"]
    assert "… 50 more lines: %lepton logs demo" in text
    assert "[rank 0] line 249" in text and "[rank 0] line 50" in text and "line 49\n" not in text
    assert "Traceback" not in text  # the cell's error shows it once
    assert page.count("<img") == 2 and 'class="lepton-panel lepton-static"' in page  # loss and acc
    assert page.count('class="lepton-node-row"') == 2


@pytest.mark.parametrize("follow", [False, True])
def test_a_retried_run_is_one_curve_and_says_which_attempt(recorded, follow):
    store, seq = recorded
    store.write([("UPDATE runs SET retries=2 WHERE seq=?", (seq,))])
    store.write([store.attempt_start(seq, 0, ["local-0", "local-1"], time.time() - 4)])
    view = RunView(store, seq, follow=follow).refresh()
    store.add_metrics(seq, 0, list(range(20)), ["loss"] * 20, [1.0] * 20, [time.time()] * 20, attempt=0)
    store.write([store.attempt_end(seq, 0, time.time(), "local-1 lost: no heartbeat for 10 s")])
    store.write([store.attempt_start(seq, 1, ["local-0", "local-2"], time.time())])
    view.refresh()
    store.add_metrics(seq, 0, list(range(10, 30)), ["loss"] * 20, [0.5] * 20, [time.time()] * 20, attempt=1)
    view.refresh()
    s = view.series["loss"][0]
    assert list(s.x) == list(range(30)) and list(s.y) == [1.0] * 10 + [0.5] * 20
    assert view.header.attempt == "attempt 2 of 3 on local-0, local-2 — local-1 lost: no heartbeat for 10 s"
    p = RunPanel(RunView(store, seq))
    p.update(force=True)
    assert "attempt 2 of 3" in p.header.value
