"""The panel of a sweep: one curve per trial (its objective metric, coloured by how good the
trial ended, pruned ones faded), the trials table as trials start, report and end, and Cancel.
Everything comes from the store (SweepView), so the same panel follows a sweep of this kernel,
of another one, or a finished one; when the sweep ends it leaves a static record (table and
curve image) that a saved notebook keeps."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import ipywidgets as w

from ..store import TERMINAL, Store
from .panel import _PanelBox, _badge

#: Trials shown in the table (the best first once trials have ended; the rest: run.trials).
TABLE_ROWS = 20
#: Redraws of the curve image at most this often.
DRAW_SECONDS = 0.5


@dataclass
class TrialLine:
    number: int
    status: str
    params: dict
    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    pruned_step: int | None = None

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None


class SweepView:
    """What a sweep's panel shows, read from the store incrementally (new points only)."""

    def __init__(self, store: Store, seq: int):
        self.store = store
        self.seq = seq
        self.trials: dict[int, TrialLine] = {}
        self.row: dict = {}
        self.spec: dict = {}
        self._seq_of: dict[int, int] = {}  # trial run's seq → trial number
        self._cursor = 0
        self.changed = True

    @property
    def finished(self) -> bool:
        return self.row.get("status") in TERMINAL

    @property
    def metric(self) -> str | None:
        return self.spec.get("objective")

    @property
    def maximize(self) -> bool:
        return self.spec.get("direction") == "maximize"

    def refresh(self) -> "SweepView":
        from ..sweeps.studies import trial_status

        self.row = self.store.run_row(self.seq) or {}
        self.spec = json.loads(self.row.get("sweep") or "{}")
        before = {n: (t.status, len(t.values)) for n, t in self.trials.items()}
        for child in self.store.query("SELECT seq, trial, status, reason, pruned_step, params FROM runs "
                                      "WHERE parent=? ORDER BY trial", (self.seq,)):
            line = self.trials.get(child["trial"])
            if line is None:
                line = self.trials[child["trial"]] = TrialLine(child["trial"], "queued", json.loads(child["params"] or "{}"))
                self._seq_of[child["seq"]] = child["trial"]
            line.status, line.pruned_step = trial_status(child), child["pruned_step"]
        if self.metric and self._seq_of:
            marks = ",".join("?" for _ in self._seq_of)
            rows = self.store.execute(
                f"SELECT rowid, run, step, value FROM metrics WHERE run IN ({marks}) AND rank=0 AND name=? "
                f"AND rowid>? ORDER BY rowid", (*self._seq_of, self.metric, self._cursor))
            for rowid, run, step, value in rows:
                self._cursor = rowid
                line = self.trials[self._seq_of[run]]
                if line.steps and step <= line.steps[-1]:  # a retried attempt: one curve
                    keep = next((i for i, s in enumerate(line.steps) if s >= step), len(line.steps))
                    del line.steps[keep:], line.values[keep:]
                line.steps.append(step)
                line.values.append(math.nan if value is None else value)
        self.changed = before != {n: (t.status, len(t.values)) for n, t in self.trials.items()}
        return self

    def ranked(self) -> list[TrialLine]:
        """Trials with an objective first, best first; then the others by number."""
        scored = [t for t in self.trials.values() if t.status == "succeeded" and _finite(t.last)]
        scored.sort(key=lambda t: -t.last if self.maximize else t.last)
        rest = [t for t in sorted(self.trials.values(), key=lambda t: t.number) if t not in scored]
        return scored + rest


class SweepPanel:
    def __init__(self, view: SweepView, on_cancel: Callable[[], None] | None = None):
        self.view = view
        self._on_cancel = on_cancel
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self._frozen = False
        self.header = w.HTML()
        self.image = w.Image(format="png", layout=w.Layout(width="640px"))
        self.table = w.HTML()
        self.cancel = w.Button(description="Cancel", button_style="warning", icon="stop",
                               layout=w.Layout(width="110px"))
        self.cancel.add_class("lepton-cancel")
        self.cancel.on_click(self._cancel_clicked)
        self.widget = _PanelBox([
            w.HBox([self.header, self.cancel], layout=w.Layout(justify_content="space-between")),
            self.image, self.table], panel=self)
        self.widget.add_class("lepton-panel")
        self.widget.add_class("lepton-sweep")

    @property
    def frozen(self) -> bool:
        return self._frozen

    def update(self, force: bool = False) -> bool:
        with self._lock:
            if self._frozen:
                return False
            self.view.refresh()
            self.header.value = self._header_html()
            if force or self.view.changed or self.view.finished:
                self.table.value = self._table_html()
            if force or self.view.finished or (self.view.changed and time.monotonic() - self._last_draw > DRAW_SECONDS):
                png = self._render()
                if png is not None:
                    self.image.value = png
                self._last_draw = time.monotonic()
            if self.view.finished:
                self._frozen = True
                self.cancel.disabled = True
            return True

    def _cancel_clicked(self, _button) -> None:
        self.cancel.disabled = True
        self.cancel.description = "Cancelling…"
        if self._on_cancel is not None:
            self._on_cancel()

    # --- what it shows -------------------------------------------------------------------------
    def text(self) -> str:
        row, trials = self.view.row, self.view.trials
        done = sum(t.status in TERMINAL + ("pruned",) for t in trials.values())
        return (f"{row.get('name', 'sweep')} {row.get('status', '?')} · {done} of {self.view.spec.get('trials', '?')} "
                f"trials done · {self._objective_text()}")

    def _objective_text(self) -> str:
        way = "max" if self.view.maximize else "min"
        return f"objective: {way} {self.view.metric}" if self.view.metric else "objective: min of the first metric logged"

    def _header_html(self) -> str:
        row, spec = self.view.row, self.view.spec
        counts: dict[str, int] = {}
        for t in self.view.trials.values():
            counts[t.status] = counts.get(t.status, 0) + 1
        parts = " · ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        best = self.view.ranked()[0] if self.view.ranked() and self.view.ranked()[0].status == "succeeded" else None
        best_text = (f" · best: trial {best.number} ({_params(best.params)}) = {best.last:.4g}"
                     if best is not None and _finite(best.last) else "")
        return (f'<b>{html.escape(row.get("name", ""))}</b> {_badge(row.get("status", "?"))} sweep · '
                f'{spec.get("trials", "?")} trials ({html.escape(spec.get("sampler", "?"))}, '
                f'prune {html.escape(str(spec.get("prune", "none")))}) · {html.escape(self._objective_text())}'
                f'<br><span style="font-size:90%">{html.escape(parts)}{html.escape(best_text)}</span>')

    def _table_html(self) -> str:
        names = self.view.spec.get("names") or []
        head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", *names, "status", "objective"]) + "</tr>"
        rows = []
        for t in self.view.ranked()[:TABLE_ROWS]:
            objective = f"{t.last:.4g}" if _finite(t.last) else ("nan" if t.values else "–")
            status = _badge(t.status) + (f" at step {t.pruned_step}" if t.pruned_step is not None else "")
            cells = [str(t.number), *[html.escape(_value(t.params.get(n))) for n in names], status, objective]
            rows.append(f'<tr class="lepton-trial-row">{"".join(f"<td>{c}</td>" for c in cells)}</tr>')
        more = len(self.view.trials) - TABLE_ROWS
        tail = f"<p>… {more} more: run.trials</p>" if more > 0 else ""
        return f'<div class="jp-RenderedHTMLCommon"><table>{head}{"".join(rows)}</table>{tail}</div>'

    def _render(self) -> bytes | None:
        lines = [t for t in self.view.trials.values() if t.steps]
        if not lines:
            return None
        from matplotlib.figure import Figure

        import matplotlib.style

        with matplotlib.style.context("default"):  # whatever style the notebook set globally
            return self._draw(Figure(figsize=(6.4, 2.8), dpi=100), lines)

    def _draw(self, fig, lines: list[TrialLine]) -> bytes:
        from matplotlib import colormaps
        from matplotlib.colors import Normalize

        ax = fig.add_subplot()
        finals = [t.last for t in lines if t.status == "succeeded" and _finite(t.last)]
        norm = Normalize(min(finals), max(finals)) if len(finals) > 1 and min(finals) < max(finals) else None
        colours = colormaps["viridis_r" if not self.view.maximize else "viridis"]  # the best trials yellow
        for t in sorted(lines, key=lambda t: t.number):
            faded = t.status in ("pruned", "failed", "cancelled")
            colour = colours(norm(t.last)) if norm is not None and t.status == "succeeded" and _finite(t.last) else "#888"
            ax.plot(t.steps, t.values, color=colour, alpha=0.25 if faded else 0.9, linewidth=1.0 if faded else 1.6,
                    linestyle="--" if t.status == "pruned" else "-")
        ax.set_xlabel("step")
        ax.set_ylabel(self.view.metric or "")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    # --- the record it leaves ------------------------------------------------------------------
    def static_bundle(self) -> dict:
        png = self._render()
        image = (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" style="width:640px">'
                 if png else "")
        body = (f'<div class="lepton-panel lepton-static lepton-sweep"><div>{self._header_html()}</div>'
                f"{image}{self._table_html()}</div>")
        bundle = {"text/html": body, "text/plain": self.text()}
        if png:
            bundle["image/png"] = base64.b64encode(png).decode()
        return bundle

    def close(self) -> None:
        self.image.value = b""
        self.table.value = ""
        for widget in (self.widget, self.header, self.image, self.table, self.cancel, *self.widget.children):
            widget.close()


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in params.items())


def _finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
