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
    assert p.update() is True
    assert p.update() is False  # too soon after the last frame
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
    assert "final" in p.logs.value and "0.01" in p.logs.value  # rank 1's last loss: 1/100 + 0.01
    assert p.update(force=True) is False  # frozen: no more frames
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

    lm.session().up(nodes=2)
    p = PoolPanel(lm.session())
    p.update()
    assert p.table.value.count('class="lepton-node-row"') >= 2 and "ready" in p.table.value
