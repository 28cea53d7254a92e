"""A compact text view of a running run: rank output as it arrives, one status line that is
redrawn in place, and a one-line summary at the end. Everything it shows comes from the store."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..run import Run

#: Redraws of the status line are at most this frequent.
MIN_REDRAW_SECONDS = 0.25
#: A run shorter than this gets only its summary, no status line.
QUIET_SECONDS = 1.0

MARKS = {"succeeded": "✓", "failed": "✗", "cancelled": "■"}


class TextProgress:
    """Where no widget frontend is attached: the status line is redrawn with a carriage return.
    (Notebooks get the panel, ui/panel.py.)"""

    def __init__(self, run: Run, out: TextIO | None = None, show_logs: bool = True, status_line: bool = True):
        self.run = run
        self.out = out or sys.stdout
        self.show_logs = show_logs
        self.status_line = status_line
        self._last_log = 0
        self._drawn = 0  # width of the status line on screen, 0 when none
        self._last_draw = 0.0
        self._t0 = time.monotonic()

    def tick(self) -> None:
        try:
            self._print_logs()
            now = time.monotonic()
            if self.status_line and now - self._t0 > QUIET_SECONDS and now - self._last_draw >= MIN_REDRAW_SECONDS:
                self._draw(self.status_text())
                self._last_draw = now
        except Exception as e:  # a display problem must never stop (or orphan) the run
            self.status_line = self.show_logs = False
            print(f"(progress display stopped: {type(e).__name__}: {e})", file=self.out)

    def finish(self) -> None:
        self._print_logs()
        self._clear()
        print(self.summary_text(), file=self.out, flush=True)

    # --- text ------------------------------------------------------------------------------
    def status_text(self) -> str:
        run = self.run
        parts = [f"⏳ {run.name}", run.status]
        if run.world_size:
            parts.append(f"{run.world_size} rank{'s' if run.world_size != 1 else ''}")
        latest = run._store.latest_metrics(run.seq)
        if latest:
            step = max(s for s, _v in latest.values())
            parts.append(f"step {step}")
            for name, (_s, value) in sorted(latest.items())[:3]:
                parts.append(f"{name} {_number(value)}")
        parts.append(f"{time.monotonic() - self._t0:.1f} s")
        return " · ".join(parts)

    def summary_text(self) -> str:
        run, live = self.run, self.run._live
        if live is not None and live.done.is_set():  # in memory already: no store round trips
            status, world, nodes = live.status, live.world_size, len(live.nodes)
            duration = (live.ended_at or time.time()) - live.started_at if live.started_at else None
        else:
            status, world, nodes, duration = run.status, run.world_size, len(run.nodes), run.duration
        took = f"{duration:.3g} s" if duration is not None else "-"
        text = (f"{MARKS.get(status, '·')} {run.name} {status} in {took} on {nodes} "
                f"node{'s' if nodes != 1 else ''} (world size {world})")
        if status == "succeeded":
            bound = sorted(run.outputs)
            if bound:
                text += " · bound: " + ", ".join(bound)
        for name, why in sorted(run.skipped.items()):
            text += f"\n  ! {name} was not returned: {why}"
        for note in (live.notes if live is not None else []):
            text += f"\n  · {note}"
        return text

    # --- drawing ---------------------------------------------------------------------------
    def _print_logs(self) -> None:
        if not self.show_logs:
            return
        rows = self.run._store.logs_since(self.run.seq, self._last_log)
        if not rows:
            return
        self._clear()
        multi = (self.run.world_size or 1) > 1
        lines = []
        for log_id, rank, _stream, line in rows:
            lines.append(f"[rank {rank}] {line}" if multi else line)
            self._last_log = log_id
        print("\n".join(lines), file=self.out, flush=True)

    def _draw(self, text: str) -> None:
        pad = " " * max(0, self._drawn - len(text))
        self.out.write("\r" + text + pad)
        self.out.flush()
        self._drawn = len(text)

    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r" + " " * self._drawn + "\r")
            self.out.flush()
            self._drawn = 0


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"  # SQLite keeps NaN as NULL

