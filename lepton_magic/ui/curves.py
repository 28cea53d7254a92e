"""The curve image: one line per rank for one metric, drawn with matplotlib (Agg, no pyplot) to
a PNG.

A frame must cost the same at 1k or 1M logged points and far less than a full matplotlib
redraw, so: each line is first cut down by :func:`downsample.minmax`; the figure is built once;
and the axes limits leave headroom, so most frames only blit the lines onto the saved
background (axes, ticks, labels). A full draw happens only when the data outgrows the limits,
or the metric, scale, smoothing or set of ranks changes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .downsample import Series, minmax

#: Points kept per line: about two per horizontal pixel.
BUCKETS = 400
#: Room left above the data when limits are recomputed: a full redraw every 25 % of growth.
HEADROOM = 1.25


class CurvePlot:
    def __init__(self, width: int = 640, height: int = 260, dpi: int = 80):
        # matplotlib's own look, whatever style the notebook set globally (optuna's plots set ggplot)
        with matplotlib.style.context("default"):
            self.figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
            self.canvas = FigureCanvasAgg(self.figure)
            self.axes = self.figure.add_subplot(1, 1, 1)
        self.figure.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.16)
        self.axes.tick_params(labelsize=8)
        self.axes.grid(True, alpha=0.3)
        self.axes.set_xlabel("step", fontsize=9)
        self._lines: dict[int, object] = {}
        self._key: tuple | None = None  # what the background was drawn for
        self._background = None
        self.full_draws = 0

    def render(self, series: dict[int, Series], metric: str, smoothing: float = 0.0,
               log_scale: bool = False) -> bytes:
        """PNG bytes of ``metric`` for every rank in ``series``."""
        data = {rank: minmax(s.x, s.smoothed(smoothing), BUCKETS) for rank, s in sorted(series.items())}
        log_scale = log_scale and all(len(y) == 0 or np.nanmin(y) > 0 for _x, y in data.values())
        key = (metric, smoothing, log_scale, tuple(data))
        for rank, (x, y) in data.items():
            line = self._lines.get(rank)
            if line is None:
                (line,) = self.axes.plot(x, y, lw=1.3, label=f"rank {rank}", color=f"C{rank % 10}",
                                         animated=True)
                self._lines[rank] = line
            else:
                line.set_data(x, y)
        for rank in [r for r in self._lines if r not in data]:
            self._lines.pop(rank).remove()
        if key != self._key or self._background is None or not self._inside_limits(data):
            self._full_draw(key, data, metric, smoothing, log_scale)
        else:
            self.canvas.restore_region(self._background)
        for line in self._lines.values():
            self.axes.draw_artist(line)
        legend = self.axes.get_legend()
        if legend is not None:
            self.axes.draw_artist(legend)
        return self._png()

    # --- internals -------------------------------------------------------------------------
    def _full_draw(self, key, data, metric: str, smoothing: float, log_scale: bool) -> None:
        ax = self.axes
        ax.set_yscale("log" if log_scale else "linear")
        xs = [x for x, _y in data.values() if len(x)]
        ys = [y[np.isfinite(y)] for _x, y in data.values() if len(y)]
        ys = [y for y in ys if len(y)]
        if xs:
            lo, hi = min(float(x[0]) for x in xs), max(float(x[-1]) for x in xs)
            ax.set_xlim(lo, lo + max(hi - lo, 1.0) * HEADROOM)
        if ys:
            lo, hi = min(float(y.min()) for y in ys), max(float(y.max()) for y in ys)
            ax.set_ylim(*_padded(lo, hi, log_scale))
        ax.set_title(metric + (f" (smoothed {smoothing:.2f})" if smoothing > 0 else ""), fontsize=10)
        if len(self._lines) > 1:
            ax.legend(handles=[self._lines[r] for r in sorted(self._lines)], fontsize=8, loc="upper right")
            ax.get_legend().set_animated(True)
        elif ax.get_legend() is not None:
            ax.get_legend().remove()
        self.canvas.draw()  # everything but the animated lines and legend
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._key = key
        self.full_draws += 1

    def _inside_limits(self, data) -> bool:
        (x0, x1), (y0, y1) = self.axes.get_xlim(), self.axes.get_ylim()
        for x, y in data.values():
            if not len(x):
                continue
            if x[0] < x0 or x[-1] > x1:
                return False
            finite = y[np.isfinite(y)]
            if len(finite) and (finite.min() < y0 or finite.max() > y1):
                return False
        return True

    def _png(self) -> bytes:
        width, height = self.canvas.get_width_height()
        rgba = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        buffer = io.BytesIO()
        rgba.convert("RGB").save(buffer, format="png", compress_level=1)
        return buffer.getvalue()


def _padded(lo: float, hi: float, log_scale: bool) -> tuple[float, float]:
    if log_scale:
        lo_l, hi_l = math.log10(lo), math.log10(hi)
        pad = max(hi_l - lo_l, 0.1) * 0.1
        return 10 ** (lo_l - pad), 10 ** (hi_l + pad)
    pad = max(hi - lo, abs(hi) * 0.05, 1e-12) * 0.1
    return lo - pad, hi + pad
