"""The live run panel under a ``%%lepton`` cell (ipywidgets): header, node table, curves, log
tail, Cancel. Everything comes from the store through :class:`RunView`; the widgets only show.

Redraws are throttled (``MAX_FPS``) and each curve is cut to a few hundred points, so the cost
of a frame and the iopub traffic stay bounded however fast the ranks log. When the run ends the
panel freezes into a summary, and a static PNG of the curves goes to the cell's output, so a
saved notebook shows the result without widget state.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import threading
import time
from typing import Callable

import ipywidgets as w

from .curves import CurvePlot
from .model import HEARTBEAT_LATE_SECONDS, NodeRow, RunView

#: Panel redraws per second at most (each is a few comm messages and one PNG of ~30 kB).
MAX_FPS = 4.0
#: A finished run's record in the notebook shows the curves of this many metrics at most.
STATIC_METRICS = 4

STATUS_COLOURS = {
    "queued": "#777", "starting": "#b58900", "running": "#268bd2", "succeeded": "#2e8b57",
    "failed": "#cb4b16", "cancelled": "#6c71c4", "done": "#2e8b57", "lost": "#dc322f",
    "ready": "#2e8b57", "released": "#777", "pruned": "#93a1a1",
}


def _badge(status: str, css: str = "lepton-status") -> str:
    colour = STATUS_COLOURS.get(status, "#777")
    return (f'<span class="{css}" style="background:{colour};color:white;border-radius:8px;'
            f'padding:1px 8px;font-size:90%">{html.escape(status)}</span>')


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "–"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _place(place: str | None) -> str:
    """Where the backend put a node (a Ray node and its GPUs), under its host."""
    return f'<br><small class="lepton-node-place">{html.escape(place)}</small>' if place else ""


def node_table(rows: list[NodeRow]) -> str:
    head = ("<tr><th>node</th><th>host</th><th>ranks</th><th>GPUs</th><th>GPU util</th><th>GPU mem</th>"
            "<th>CPU %</th><th>RSS</th><th>status</th><th>heartbeat</th></tr>")
    body = []
    for r in rows:
        gpus = f"{r.gpus} × {html.escape(r.gpu_name)}" if r.gpus and r.gpu_name else "CPU"
        gpu_mem = (f"{_bytes(r.gpu_mem_used)} / {_bytes(r.gpu_memory * r.gpus if r.gpu_memory else None)}"
                   if r.gpu_mem_used is not None else "–")
        age = r.heartbeat_age
        beat = "–" if age is None else f"{age:.0f} s ago" + (" ⚠" if age > HEARTBEAT_LATE_SECONDS else "")
        place = _place(r.place)
        body.append(
            f'<tr class="lepton-node-row"><td>{html.escape(r.node)}</td><td>{html.escape(r.host)}{place}</td>'
            f"<td>{', '.join(map(str, r.ranks))}</td><td>{gpus}</td>"
            f"<td>{_num(r.gpu_util, '{:.0f} %')}</td><td>{gpu_mem}</td><td>{_num(r.cpu_percent)}</td>"
            f"<td>{_bytes(r.rss)}</td><td>{_badge(r.status, 'lepton-node-status')}</td><td>{beat}</td></tr>"
        )
    return f'<div class="jp-RenderedHTMLCommon"><table>{head}{"".join(body)}</table></div>'


class RunPanel:
    """The widget tree for one run, and the logic that keeps it current."""

    def __init__(self, view: RunView, on_cancel: Callable[[], None] | None = None):
        self.view = view
        self.plot = CurvePlot()
        self._on_cancel = on_cancel
        self._last_draw = 0.0
        self._drawn_points = -1
        self._frozen = False
        # Re-entrant: a widget event handled while this thread draws must not deadlock it.
        self._lock = threading.RLock()
        # The thread setting the controls itself, if any: their observers must not redraw then
        # (ipywidgets calls them synchronously, inside our own update).
        self._syncing: int | None = None

        self.header = w.HTML()
        self.nodes = w.HTML()
        self.metric = w.Dropdown(options=[], description="metric",
                                 layout=w.Layout(width="220px"))
        self.smoothing = w.FloatSlider(value=0.0, min=0.0, max=0.99, step=0.01, description="smoothing",
                                       readout_format=".2f", layout=w.Layout(width="300px"))
        self.log_scale = w.Checkbox(value=False, description="log scale", indent=False,
                                    layout=w.Layout(width="110px"))
        self.image = w.Image(format="png", layout=w.Layout(width="640px"))
        self.image.add_class("lepton-curve-image")
        curve_box = w.VBox([self.image])
        curve_box.add_class("lepton-curve")
        self.log_rank = w.Dropdown(options=[("all ranks", -1)], value=-1, description="log",
                                   layout=w.Layout(width="220px"))
        self.logs = w.HTML()
        self.logs.add_class("lepton-logs")
        self.summary = w.HTML()  # the final values, once the run has ended
        self.cancel = w.Button(description="Cancel", button_style="warning", icon="stop",
                               layout=w.Layout(width="110px"))
        self.cancel.add_class("lepton-cancel")
        self.cancel.on_click(self._cancel_clicked)
        for control in (self.metric, self.smoothing, self.log_scale, self.log_rank):
            control.observe(self._control_changed, names="value")
        self.widget = _PanelBox([
            w.HBox([self.header, self.cancel], layout=w.Layout(justify_content="space-between")),
            self.nodes,
            w.HBox([self.metric, self.smoothing, self.log_scale]),
            curve_box,
            self.summary,
            self.log_rank,
            self.logs,
        ], panel=self)
        self.widget.add_class("lepton-panel")

    @property
    def frozen(self) -> bool:
        """The run has ended and the panel shows its final state."""
        return self._frozen

    # --- updates ---------------------------------------------------------------------------
    def _control_changed(self, _change) -> None:
        """The person changed the metric, smoothing, scale or log rank: redraw at once."""
        if self._syncing != threading.get_ident():
            self.update(force=True)

    def update(self, force: bool = False) -> bool:
        """Redraw from the store if the last frame is old enough (or ``force``); True if drawn.
        A frozen panel (the run ended) reads nothing more; its controls still redraw it."""
        now = time.monotonic()
        if not force and (self._frozen or now - self._last_draw < 1.0 / MAX_FPS):
            return False
        with self._lock:
            self._last_draw = now  # (an update asked for while this frame is drawn is too soon)
            if not self._frozen:
                view = self.view.refresh()
                self._draw_header()
                self._set(self.nodes, node_table(view.nodes))
            self._draw_curve(force)
            self._draw_logs()
            if not self._frozen and self.view.finished:
                self._freeze()
            # The interval counts from the frame's end: slow frames never follow each other back to back.
            self._last_draw = time.monotonic()
        return True

    def _set(self, widget, value) -> None:
        if widget.value != value:  # only changes cross the wire
            widget.value = value

    def _draw_header(self) -> None:
        self._set(self.header, self._header_html())

    def _header_html(self) -> str:
        h = self.view.header
        if h is None:
            return ""
        parts = [f"<b>{html.escape(h.name)}</b> <code>{h.run_id}</code>", _badge(h.status),
                 f"{_num(h.elapsed, '{:.1f} s')}", f"world size {h.world_size or '–'}", f"backend {h.backend}"]
        if h.step is not None:
            parts.append(f"step {h.step}")
        if h.steps_per_second is not None and not self.view.finished:
            parts.append(f"{h.steps_per_second:.1f} steps/s")
        if h.cost:
            parts.append(f"${h.cost:.2f}")
        text = " · ".join(parts)
        if h.attempt:
            text += f'<div class="lepton-attempt">{html.escape(h.attempt)}</div>'
        if h.error:
            text += f'<div style="color:#cb4b16">{html.escape(h.error)}</div>'
        return text

    def _draw_curve(self, force: bool) -> None:
        names = self.view.metric_names
        if not names:
            return
        if list(self.metric.options) != names:
            current = self.metric.value if self.metric.value in names else names[0]
            with self._programmatic():
                self.metric.options = names
                self.metric.value = current
        total = sum(s.n for per in self.view.series.values() for s in per.values())
        if total == self._drawn_points and not force:
            return
        self._drawn_points = total
        self.image.value = self._render(self.metric.value)

    def _render(self, metric: str) -> bytes:
        return self.plot.render(self.view.series.get(metric, {}), metric, self.smoothing.value, self.log_scale.value)

    def _draw_logs(self) -> None:
        ranks = sorted(self.view.tails)
        options = [("all ranks", -1)] + [(f"rank {r}", r) for r in ranks]
        if list(self.log_rank.options) != options:
            with self._programmatic():
                self.log_rank.options = options
        chosen = self.log_rank.value
        if chosen == -1:
            multi = len(ranks) > 1
            lines = [f"[{r}] {line}" if multi else line for r in ranks for line in self._tail(r, 15)]
        else:
            lines = self._tail(chosen, 30)
        body = html.escape("\n".join(lines)) or ("(no output)" if self.view.finished else "(no output yet)")
        self._set(self.logs, f'<pre style="max-height:220px;overflow:auto;font-size:85%;margin:0">{body}</pre>')

    def _tail(self, rank: int, count: int) -> list[str]:
        """A rank's last lines, its unfinished line (a progress bar, as it stands now) last."""
        lines = list(self.view.tails.get(rank, []))
        partial = self.view.partials.get(rank)
        if partial:
            lines.append(partial)
        return lines[-count:]

    @contextlib.contextmanager
    def _programmatic(self):
        """The panel sets a control itself: its observer, called at once in this thread, must
        not start another redraw (widget events from other threads still do)."""
        previous, self._syncing = self._syncing, threading.get_ident()
        try:
            yield
        finally:
            self._syncing = previous

    def _freeze(self) -> None:
        self._frozen = True
        self.cancel.disabled = True
        self.cancel.layout.display = "none"
        self._set(self.summary, self._summary_html())

    def _summary_html(self) -> str:
        final = self.view.final_metrics()
        if not final:
            return ""
        names = self.view.metric_names
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        rows = "".join(
            f"<tr><td>rank {r}</td>" + "".join(f"<td>{final[r].get(n, float('nan')):.4g}</td>" for n in names)
            + "</tr>" for r in sorted(final)
        )
        return f'<div class="jp-RenderedHTMLCommon"><table><tr><th>final</th>{head}</tr>{rows}</table></div>'

    def _cancel_clicked(self, _button) -> None:
        self.cancel.disabled = True
        self.cancel.description = "Cancelling…"
        if self._on_cancel is not None:
            self._on_cancel()

    def close(self) -> None:
        """Close every widget of the panel (their front-end views go, their state is freed).
        The large values are emptied first: a client that keeps the state of every widget it
        saw (nbclient, papermill) then saves kilobytes, not the curves and logs again."""
        for widget in (self.image, self.logs, self.nodes):
            widget.value = b"" if widget is self.image else ""
        for widget in (self.widget, *self._widgets()):
            widget.close()

    def _widgets(self):
        stack = list(self.widget.children)
        while stack:
            widget = stack.pop()
            yield widget
            stack.extend(getattr(widget, "children", ()))

    # --- the record a finished run leaves in the notebook ---------------------------------------
    def static_png(self) -> bytes | None:
        """The curve shown now, as a PNG (None when the run logged no metric)."""
        if not self.view.metric_names:
            return None
        return self._render(self.metric.value)

    def static_bundle(self) -> dict:
        """The finished run as every viewer shows it, widget or not (a saved or exported
        notebook, papermill, GitHub): header, nodes, curves of each metric, final values and
        what the ranks printed, as HTML, with PNG and plain-text forms of the same."""
        lines, earlier = self.view.saved_log()
        if earlier:
            lines = [f"… {earlier} more line{'s' if earlier != 1 else ''}: %lepton logs {self.view.header.name}"] + lines
        text_log = "\n".join(lines)
        names = self.view.metric_names[:STATIC_METRICS]
        pngs = [self._render(name) for name in names]
        images = "".join(
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(name)}" '
            f'style="width:{"640px" if len(pngs) == 1 else "48%"};margin:2px">'
            for name, png in zip(names, pngs)
        )
        log_html = (f'<pre class="lepton-logs" style="max-height:320px;overflow:auto;font-size:85%;margin:0">'
                    f"{html.escape(text_log)}</pre>") if lines else ""
        body = (f'<div class="lepton-panel lepton-static">'
                f"<div>{self._header_html()}</div>{node_table(self.view.nodes)}"
                f'<div class="lepton-curve">{images}</div>{self._summary_html()}{log_html}</div>')
        bundle = {"text/html": body, "text/plain": self.text() + ("\n" + text_log if lines else "")}
        if pngs:
            bundle["image/png"] = base64.b64encode(pngs[0]).decode()
        return bundle

    def text(self) -> str:
        h = self.view.header
        if h is None:
            return "lepton run"
        return f"{h.name} {h.status} · world size {h.world_size} · {_num(h.elapsed, '{:.1f} s')}"


class _PanelBox(w.VBox):
    """A VBox whose plain-text form (no widget frontend) is a status line, not HBox(children=…);
    once the run has ended, the static record rides along for viewers without widgets."""

    def __init__(self, children, panel: RunPanel):
        super().__init__(children)
        self._panel = panel

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        extra = self._panel.static_bundle() if self._panel.frozen else {"text/plain": self._panel.text()}
        return {**(bundle or {}), **extra}


class PoolPanel:
    """``%lepton status``: this session's pools (size, min and max, the next idle release, their
    latest events) and their nodes, with the last telemetry of each."""

    #: Events shown per pool, the latest last.
    EVENTS = 5
    _VERBS = {"pool_grow": "started", "pool_shrink": "released", "pool_grow_refused": "did not start",
              "node_lost": "lost"}

    def __init__(self, session):
        self.session = session
        self.table = w.HTML()
        self.widget = w.VBox([self.table])
        self.widget.add_class("lepton-pool-panel")

    def update(self) -> None:
        pools = [pool for pool in self.session.pools.values() if not pool.closed]
        if not pools:
            self.table.value = "<i>no pool is up: %lepton up --nodes N, or run a %%lepton cell</i>"
            return
        # Released nodes are gone: the pool's events say when and why.
        nodes = self.session.nodes().to_dict("records")
        rows = [self._node_row(r) for r in nodes if r["status"] != "released"]
        head = ("<tr><th>pool</th><th>node</th><th>host</th><th>GPUs</th><th>CPU %</th><th>memory used</th>"
                "<th>torch</th><th>status</th><th>heartbeat</th></tr>")
        table = f'<div class="jp-RenderedHTMLCommon"><table>{head}{"".join(rows)}</table></div>'
        self.table.value = "".join(self._pool_html(pool) for pool in pools) + (table if rows else "")

    def _pool_html(self, pool) -> str:
        price, cost, idle = pool.backend.price_per_hour(), pool.backend.cost_so_far(), pool.idle_remaining()
        text = f"<b>{pool.id}</b> ({pool.backend_name}) · {len(pool.live_nodes)} node(s)"
        if pool.limits:
            text += f" · {pool.limits}"
        if price:
            text += f" · ${price:.2f}/h · ${cost or 0:.2f} so far"
        if idle is not None:
            text += f" · next idle node released in {int(idle // 60)}:{int(idle % 60):02d}"
        events = "".join(
            f'<li class="lepton-pool-event">{time.strftime("%H:%M:%S", time.localtime(e["time"]))} '
            f'{html.escape(self._event_text(e["kind"], e["data"]))}</li>'
            for e in self.session.store.pool_events(pool.id, self.EVENTS)
        )
        listed = f'<ul class="lepton-pool-events" style="margin:2px 0;font-size:90%">{events}</ul>'
        return f'<div class="lepton-pool-line">{text}</div>' + (listed if events else "")

    @classmethod
    def _event_text(cls, kind: str, data: dict) -> str:
        """``released 2 node(s) (local-1, local-2): idle 10 min; min 1``"""
        subject = f"{data['nodes']} node(s)" if "nodes" in data else data.get("node", "")
        names = f" ({', '.join(data['released'])})" if data.get("released") else ""
        text = f"{cls._VERBS.get(kind, kind.replace('_', ' '))} {subject}{names}".strip()
        return f"{text}: {data['reason']}" if data.get("reason") else text

    @staticmethod
    def _node_row(r: dict) -> str:
        age = time.time() - r["last_seen"] if r.get("last_seen") else None
        gpus = f"{r['gpus']} × {html.escape(r['gpu_name'])}" if r.get("gpus") and r.get("gpu_name") else "CPU"
        return (
            f'<tr class="lepton-node-row"><td>{html.escape(str(r["pool"]))}</td><td>{html.escape(r["node"])}</td>'
            f"<td>{html.escape(str(r.get('host') or '?'))}{_place(r.get('place'))}</td><td>{gpus}</td>"
            f"<td>{_num(r.get('cpu_percent'))}</td><td>{_bytes(r.get('mem_used'))}</td>"
            f"<td>{html.escape(str(r.get('torch') or '–'))}</td><td>{_badge(r['status'], 'lepton-node-status')}</td>"
            f"<td>{'–' if age is None else f'{age:.0f} s ago'}</td></tr>"
        )
