"""The curve image: one line per rank for one metric, drawn with matplotlib (Agg, no pyplot) to
a PNG. The figure is built once and only its data changes, so a frame costs the same at 1k or
1M logged points (each line is first cut down by :func:`downsample.minmax`)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .downsample import Series, minmax

#: Points kept per line: about two per horizontal pixel.
BUCKETS = 400


class CurvePlot:
    def __init__(self, width: int = 640, height: int = 260, dpi: int = 80):
        self.figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        FigureCanvasAgg(self.figure)
        self.axes = self.figure.add_subplot(1, 1, 1)
        self.figure.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.16)
        self._lines: dict[int, object] = {}

    def render(self, series: dict[int, Series], metric: str, smoothing: float = 0.0,
               log_scale: bool = False) -> bytes:
        """PNG bytes of ``metric`` for every rank in ``series``."""
        ax = self.axes
        for rank in list(self._lines):
            if rank not in series:
                self._lines.pop(rank).remove()
        for rank, s in sorted(series.items()):
            x, y = minmax(s.x, s.smoothed(smoothing), BUCKETS)
            line = self._lines.get(rank)
            if line is None:
                (line,) = ax.plot(x, y, lw=1.3, label=f"rank {rank}")
                self._lines[rank] = line
            else:
                line.set_data(x, y)
        ax.set_yscale("log" if log_scale and _all_positive(series, smoothing) else "linear")
        ax.relim()
        ax.autoscale_view()
        ax.set_title(metric + (f" (smoothed {smoothing:.2f})" if smoothing > 0 else ""), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8, loc="upper right")
        elif ax.get_legend() is not None:
            ax.get_legend().remove()
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", pil_kwargs={"compress_level": 1})
        return buffer.getvalue()


def _all_positive(series: dict[int, Series], smoothing: float) -> bool:
    for s in series.values():
        y = s.smoothed(smoothing)
        if len(y) and np.nanmin(y) <= 0:
            return False
    return True
