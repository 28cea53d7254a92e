"""The live run panel: what one frame costs as the logged history grows, and what the panel
sends over iopub while a cell logs as fast as it can.

1. Redraw cost at 1k, 10k, 100k and 1M logged points. N is the total over the run: 2 ranks with
   N/2 points each of one noisy, decaying `loss` metric. Each frame first receives a small batch
   of new points (100 steps, so 200 points), untimed, so every timed frame draws new data.
   - lepton `CurvePlot.render` alone (min/max downsampling + Agg PNG), and a full
     `RunPanel.update(force=True)` over a store that already holds the N points (temporary
     LEPTON_HOME, points written with `Store.add_metrics`; one warm-up frame reads them all, and
     its cost is printed as the first frame, as `%lepton attach` of a long run would pay it).
     Widgets have no kernel here, so the PNG is not serialised onto a comm: part 2 covers that.
   - baseline: livelossplot's matplotlib output, `PlotLosses.send()` over the same history (one
     `update` per step, both ranks as two lines of one group), `matplotlib.use('Agg')`,
     `clear_output` stubbed out and `plt.show` replaced by what the inline backend does with the
     figure (a PNG via `print_figure(bbox_inches='tight')`, then close it), so only its redraw
     is timed. Same image size as lepton's (640x260 px).
   - second baseline: plain matplotlib, a new figure with every point, saved as a PNG.
   A baseline call that takes over a second is measured once at that size (said in the output).
2. iopub traffic: a real python3 kernel (jupyter_client), `%load_ext lepton_magic`, then a
   blocking `%%lepton --nodes 2` cell whose ranks call `lepton.log` as fast as they can for ~5 s.
   Every iopub message of the cell is read and sized (JSON of the content plus buffers); the
   logging rate comes from the kernel's store. Peaks over any 1-s window are compared with
   Jupyter's default iopub limits (1000 msgs/s, 1 MB/s); what jupyter_server itself counts (all
   but status/comm_open/execute_input messages, stream bytes only, over 3 s) is printed too.
   A wrapper installed in the kernel by this script times each panel frame drawn during the
   cell, and the same cell then runs again in the same kernel with the text progress line
   instead of the panel, as the reference for the logging rate.

    python benchmarks/panel.py [--sizes 1000,10000,100000,1000000] [--repeat 15] [--seconds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

BATCH_STEPS = 100  # new steps per rank before each timed frame
WIDTH, HEIGHT, DPI = 640, 260, 80  # lepton's CurvePlot defaults
SLOW_BASELINE = 1.0  # seconds: slower baseline calls are measured once


def loss_curve(start: int, count: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(start, start + count)
    rng = np.random.default_rng(1000 * rank + start)
    y = 2.0 * np.exp(-steps / 20_000) + 0.3 + 0.05 * rng.standard_normal(count)
    return steps, np.abs(y) + 0.02 * rank


def stats(seconds: list[float]) -> tuple[float, float, float]:
    return statistics.median(seconds), min(seconds), max(seconds)


def row(name: str, seconds: list[float], note: str = "") -> float:
    med, lo, hi = stats(seconds)
    print(f"  {name:<40} median {med * 1e3:9.2f} ms   min {lo * 1e3:9.2f}   max {hi * 1e3:9.2f}   "
          f"n={len(seconds)}{note}")
    return med


# --- 1. redraw cost ------------------------------------------------------------------------
def lepton_render(per_rank: int, repeat: int) -> list[float]:
    from lepton_magic.ui.curves import CurvePlot
    from lepton_magic.ui.downsample import Series

    series = {}
    for rank in (0, 1):
        s = Series()
        s.extend(*loss_curve(0, per_rank, rank))
        series[rank] = s
    plot = CurvePlot()
    plot.render(series, "loss")  # the figure is built once per panel
    out = []
    step = per_rank
    for _ in range(repeat):
        for rank in (0, 1):
            series[rank].extend(*loss_curve(step, BATCH_STEPS, rank))
        step += BATCH_STEPS
        t0 = time.perf_counter()
        plot.render(series, "loss")
        out.append(time.perf_counter() - t0)
    return out


def lepton_panel(per_rank: int, repeat: int) -> tuple[float, list[float], int, float]:
    """(first frame, timed frames, PNG size, the record left at the end) of
    RunPanel.update(force=True) over a fresh store."""
    from lepton_magic.store import Store
    from lepton_magic.ui.model import RunView
    from lepton_magic.ui.panel import RunPanel

    home = tempfile.mkdtemp(prefix="lepton-bench-panel-")
    try:
        store = Store(home)
        seq, _ = store.add_run(uuid.uuid4().hex[:12], None)

        def write(start: int, count: int) -> None:
            now = time.time()
            for rank in (0, 1):
                steps, values = loss_curve(start, count, rank)
                for i in range(0, count, 50_000):
                    n = min(50_000, count - i)
                    store.add_metrics(seq, rank, steps[i:i + n].tolist(), ["loss"] * n,
                                      values[i:i + n].tolist(), [now] * n)

        write(0, per_rank)
        panel = RunPanel(RunView(store, seq))
        t0 = time.perf_counter()
        panel.update(force=True)
        first = time.perf_counter() - t0
        out = []
        step = per_rank
        for _ in range(repeat):
            write(step, BATCH_STEPS)
            step += BATCH_STEPS
            t0 = time.perf_counter()
            panel.update(force=True)
            out.append(time.perf_counter() - t0)
        drawn = sum(s.n for s in panel.view.series["loss"].values())
        assert drawn == 2 * step, f"panel holds {drawn} points, store {2 * step}"
        size = len(panel.image.value)
        store.update_run(seq, status="succeeded", ended=time.time())
        panel.update(force=True)
        t0 = time.perf_counter()
        panel.static_bundle()  # what the end of a notebook cell adds: the run's static record
        record = time.perf_counter() - t0
        store.close()
        return first, out, size, record
    finally:
        shutil.rmtree(home, ignore_errors=True)


def baseline_repeat(first: float, repeat: int) -> int:
    return 0 if first > SLOW_BASELINE else repeat - 1


def livelossplot_send(per_rank: int, repeat: int) -> list[float]:
    import matplotlib.pyplot as plt
    from livelossplot import PlotLosses
    from livelossplot.outputs import MatplotlibPlot
    import livelossplot.outputs.matplotlib_plot as llp_mpl

    llp_mpl.clear_output = lambda wait=False: None

    def inline_show(*_args, **_kwargs):  # what matplotlib-inline's show does, minus display()
        for num in plt.get_fignums():
            fig = plt.figure(num)
            fig.canvas.print_figure(io.BytesIO(), format="png", dpi=DPI, bbox_inches="tight")
        plt.close("all")

    real_show = plt.show
    plt.show = inline_show
    try:
        names = ["loss rank 0", "loss rank 1"]
        plot = PlotLosses(outputs=[MatplotlibPlot(max_cols=1, figsize=(WIDTH / DPI, HEIGHT / DPI))],
                          groups={"loss": names}, mode="notebook", step_names="step")

        def feed(start: int, count: int) -> None:
            (steps, y0), (_, y1) = loss_curve(start, count, 0), loss_curve(start, count, 1)
            for s, a, b in zip(steps.tolist(), y0.tolist(), y1.tolist()):
                plot.update({names[0]: a, names[1]: b}, current_step=s)

        feed(0, per_rank)
        step = per_rank

        def once() -> float:
            nonlocal step
            feed(step, BATCH_STEPS)
            step += BATCH_STEPS
            t0 = time.perf_counter()
            plot.send()
            return time.perf_counter() - t0

        first = once()
        return [first] + [once() for _ in range(baseline_repeat(first, repeat))]
    finally:
        plt.show = real_show


def matplotlib_full(per_rank: int, repeat: int) -> list[float]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [loss_curve(0, per_rank, rank) for rank in (0, 1)]

    def once() -> float:
        t0 = time.perf_counter()
        fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for rank, (x, y) in enumerate(curves):
            ax.plot(x, y, lw=1.3, label=f"rank {rank}")
        ax.set_title("loss")
        ax.set_xlabel("step")
        ax.legend(loc="upper right")
        fig.savefig(io.BytesIO(), format="png")
        return time.perf_counter() - t0

    first = once()
    return [first] + [once() for _ in range(baseline_repeat(first, repeat))]


def redraw(sizes: list[int], repeat: int) -> None:
    print(f"panel frame: 2 ranks, 1 metric, N = total points (N/2 per rank); "
          f"{2 * BATCH_STEPS} new points before each frame")
    results, records = {}, {}
    for n in sizes:
        per_rank = n // 2
        print(f"N = {n:,} points")
        render = row("lepton CurvePlot.render", lepton_render(per_rank, repeat))
        first, frames, png, record = lepton_panel(per_rank, repeat)
        panel = row("lepton RunPanel.update(force=True)", frames, f"   PNG {png / 1024:.1f} kB")
        print(f"  {'  first frame (reads all N points)':<40} {first * 1e3:9.2f} ms")
        print(f"  {'  record at the end (static_bundle)':<40} {record * 1e3:9.2f} ms")
        llp_times = livelossplot_send(per_rank, repeat)
        note = "   (one call: over 1 s)" if len(llp_times) == 1 else ""
        llp = row("livelossplot send() (matplotlib)", llp_times, note)
        mpl_times = matplotlib_full(per_rank, repeat)
        note = "   (one call: over 1 s)" if len(mpl_times) == 1 else ""
        mpl = row("matplotlib full redraw + savefig", mpl_times, note)
        results[n] = (render, panel, llp, mpl)
        records[n] = record
    print()
    print(f"  {'N':>10} {'render ms':>10} {'panel ms':>10} {'livelossplot ms':>16} {'matplotlib ms':>14}")
    for n, (render, panel, llp, mpl) in results.items():
        print(f"  {n:>10,} {render * 1e3:10.2f} {panel * 1e3:10.2f} {llp * 1e3:16.2f} {mpl * 1e3:14.2f}")
    for n, (render, panel, llp, mpl) in results.items():
        print(f"RATIO panel frame vs livelossplot at {n:,}: {panel / llp:.3f}x  "
              f"(vs plain matplotlib {panel / mpl:.3f}x; target <= 0.2)")
    for n, record in records.items():
        print(f"RATIO run record at the end vs one livelossplot frame at {n:,}: {record / results[n][2]:.3f}x  "
              f"(target <= 1: leaving the record costs less than one frame of the peer)")
    lo, hi = min(results), max(results)
    print(f"RATIO panel frame flatness, {hi:,} vs {lo:,} points: {results[hi][1] / results[lo][1]:.2f}x  "
          f"(render alone {results[hi][0] / results[lo][0]:.2f}x; target: flat, ~1x)")


# --- 2. iopub traffic ----------------------------------------------------------------------
CELL = """%%lepton --nodes 2
import time
end = time.time() + {seconds}
i = 0
while True:
    for _ in range(1000):
        lepton.log(step=i, loss=1.0 / (i + 1))
        i += 1
    if time.time() > end:
        break
"""


def msg_size(msg: dict) -> int:
    return len(json.dumps(msg["content"], default=str)) + sum(len(b) for b in msg.get("buffers", []) or [])


def run_cell(kc, code: str, timeout: float = 180.0) -> list[tuple[float, str, int]]:
    """Execute ``code`` and return (kernel send time, msg_type, size) of every iopub message it
    caused, up to its idle status."""
    msg_id = kc.execute(code)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:  # queue.Empty
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        sent = msg["header"]["date"]
        sent = sent.timestamp() if hasattr(sent, "timestamp") else time.time()
        seen.append((sent, msg["msg_type"], msg_size(msg)))
        if msg["msg_type"] == "error":
            print("  kernel error:", msg["content"].get("ename"), msg["content"].get("evalue"))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return seen
    raise TimeoutError(f"cell did not finish in {timeout} s")


def peak_window(events: list[tuple[float, int]], window: float) -> tuple[float, float]:
    """Highest message count and byte total in any ``window`` seconds, per second."""
    times = [t for t, _ in events]
    sizes = np.cumsum([0] + [s for _, s in events])
    best_n = best_b = 0
    j = 0
    for i in range(len(times)):
        while times[i] - times[j] > window:
            j += 1
        best_n = max(best_n, i - j + 1)
        best_b = max(best_b, sizes[i + 1] - sizes[j])
    return best_n / window, best_b / window


# Benchmark-side instrumentation inside the kernel (lepton_magic itself is untouched): the time
# of every frame the panel draws during the cell, and how many new points it read.
INSTRUMENT = """
import time as _time, lepton_magic.ui.panel as _panel
_bench_frames = []
_bench_update = _panel.RunPanel.update
def _timed_update(self, force=False):
    t0 = _time.perf_counter()
    drawn = _bench_update(self, force)
    if drawn:
        _bench_frames.append((_time.perf_counter() - t0, self.view.new_points))
    return drawn
_panel.RunPanel.update = _timed_update
"""
FRAMES = "import json as _json; print(_json.dumps(_bench_frames)); _bench_frames.clear()"
# The reference: the same cell with the text progress line instead of the panel.
NO_PANEL = ("import lepton_magic.ui.live as _live; _live.widgets_available = lambda shell: False; "
            "get_ipython().input_transformers_post.remove(_live.await_lepton_cells)")


def cell_output(kc, code: str) -> str:
    msg_id = kc.execute(code)
    text = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(text)


def points_of_last_run(home: str) -> tuple[str, int, float, float, float | None, list]:
    db = sqlite3.connect(os.path.join(home, "store.sqlite"))
    try:
        seq, status, ended = db.execute("SELECT seq, status, ended FROM runs ORDER BY seq DESC LIMIT 1").fetchone()
        count, first, last = db.execute("SELECT COUNT(*), MIN(time), MAX(time) FROM metrics WHERE run=?",
                                        (seq,)).fetchone()
        per_rank = db.execute("SELECT rank, COUNT(*) FROM metrics WHERE run=? GROUP BY rank", (seq,)).fetchall()
    finally:
        db.close()
    return status, count, first or 0.0, last or 0.0, ended, per_rank


def iopub(seconds: float) -> None:
    from jupyter_client import KernelManager

    home = tempfile.mkdtemp(prefix="lepton-bench-iopub-")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "LEPTON_HOME": home})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        run_cell(kc, "%load_ext lepton_magic")
        run_cell(kc, INSTRUMENT)
        t0 = time.perf_counter()
        seen = run_cell(kc, CELL.format(seconds=seconds))
        wall = time.perf_counter() - t0
        frames = json.loads(cell_output(kc, FRAMES).strip() or "[]")
        panel_run = points_of_last_run(home)
        run_cell(kc, NO_PANEL)
        t0 = time.perf_counter()
        seen_text = run_cell(kc, CELL.format(seconds=seconds))
        wall_text = time.perf_counter() - t0
        text_run = points_of_last_run(home)
        run_cell(kc, "%lepton down")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
        shutil.rmtree(home, ignore_errors=True)

    print(f"iopub traffic: one blocking %%lepton --nodes 2 cell, lepton.log as fast as possible for ~{seconds:g} s")
    rates = {}
    for label, (status, count, first, last, ended, per_rank), cell_wall in (
            ("with the panel", panel_run, wall), ("text progress, no panel", text_run, wall_text)):
        rates[label] = count / max(last - first, 1e-9) if count else 0.0
        into = f", {count / max(ended - first, 1e-9):,.0f} points/s into the store" if count and ended else ""
        print(f"  {label:<24} run {status}, cell {cell_wall:.2f} s, {count:,} points "
              f"({', '.join(f'rank {r}: {c:,}' for r, c in per_rank)}): "
              f"logged at {rates[label]:,.0f} points/s{into}")
    if frames:
        costs = sorted(f[0] for f in frames)
        print(f"  panel frames in the kernel during the cell: {len(frames)}, median {statistics.median(costs) * 1e3:.0f} ms, "
              f"max {costs[-1] * 1e3:.0f} ms, up to {max(f[1] for f in frames):,} new points read per frame")
    events = sorted((t, s) for t, _, s in seen)
    span = events[-1][0] - events[0][0] if len(events) > 1 else 0.0
    total = sum(s for _, s in events)
    print(f"  iopub messages {len(events):,}, {total / 1024:.1f} kB over {span:.2f} s "
          f"(mean {len(events) / max(span, 1e-9):.1f} msgs/s, {total / max(span, 1e-9) / 1024:.1f} kB/s)")
    kinds: dict[str, list[int]] = {}
    for _, kind, size in seen:
        kinds.setdefault(kind, []).append(size)
    for kind, sizes in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {kind:<20} {len(sizes):6,} msgs  {sum(sizes) / 1024:9.1f} kB  (largest {max(sizes) / 1024:.1f} kB)")
    print(f"  text progress cell: {len(seen_text)} iopub messages, {sum(s for _, _, s in seen_text) / 1024:.1f} kB")
    msgs_1s, bytes_1s = peak_window(events, 1.0)
    # What jupyter_server itself counts: every iopub message but status/comm_open/execute_input,
    # stream bytes only, averaged over its 3-s window.
    counted = sorted((t, s if k == "stream" else 0) for t, k, s in seen
                     if k not in ("status", "comm_open", "execute_input"))
    msgs_3s, bytes_3s = peak_window(counted, 3.0) if counted else (0.0, 0.0)
    print(f"  peak over any 1-s window: {msgs_1s:.0f} msgs/s, {bytes_1s / 1024:.1f} kB/s")
    print(f"  as jupyter_server counts (3-s window, stream bytes only): {msgs_3s:.1f} msgs/s, {bytes_3s:.0f} B/s")
    print(f"RATIO iopub peak messages vs Jupyter's limit: {msgs_1s / 1000:.3f}x of 1000 msgs/s  (target < 1)")
    print(f"RATIO iopub peak bytes vs Jupyter's limit: {bytes_1s / 1e6:.3f}x of 1 MB/s  (target < 1)")
    print(f"RATIO logging rate with the panel vs without: "
          f"{rates['with the panel'] / max(rates['text progress, no panel'], 1e-9):.2f}x  (informational)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--skip-iopub", action="store_true")
    args = parser.parse_args()
    redraw([int(s) for s in args.sizes.split(",")], args.repeat)
    if not args.skip_iopub:
        print()
        iopub(args.seconds)


if __name__ == "__main__":
    main()
