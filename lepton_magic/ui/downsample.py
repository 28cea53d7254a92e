"""Curves with a bounded number of points, whatever was logged: min/max per bucket.

Each bucket of consecutive points keeps its lowest and highest value (in step order), so spikes
and the envelope of a noisy loss survive, and drawing costs the same at 1k or 1M points.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def minmax(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``2 * buckets`` points of (x, y), in x order."""
    n = len(x)
    if n <= 2 * buckets:
        return x, y
    size = -(-n // buckets)  # ceil
    full = n // size
    head = y[: full * size].reshape(full, size)
    if np.isnan(head).any():  # NaNs (a diverging loss) must not win the min or the max
        low_of, high_of = np.where(np.isnan(head), np.inf, head), np.where(np.isnan(head), -np.inf, head)
    else:
        low_of = high_of = head
    base = np.arange(full) * size
    keep = [base + low_of.argmin(axis=1), base + high_of.argmax(axis=1)]
    tail = y[full * size:]
    if len(tail) and not np.isnan(tail).all():
        keep.append(np.array([full * size + np.nanargmin(tail), full * size + np.nanargmax(tail)]))
    index = np.unique(np.concatenate(keep))
    return x[index], y[index]


class Series:
    """One curve (a metric of one rank) that grows as points arrive, with its smoothed copy
    kept up to date incrementally: a redraw never walks all the points in Python."""

    def __init__(self) -> None:
        self._x = np.empty(1024)
        self._y = np.empty(1024)
        self.n = 0
        self._weight = 0.0
        self._smooth = np.empty(0)

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self.n]

    def extend(self, xs, ys) -> None:
        m = len(xs)
        if self.n + m > len(self._x):
            capacity = max(2 * len(self._x), self.n + m)
            self._x = np.resize(self._x, capacity)
            self._y = np.resize(self._y, capacity)
        self._x[self.n : self.n + m] = xs
        self._y[self.n : self.n + m] = ys
        self.n += m

    def drop_from(self, step: float) -> None:
        """Forget the points from ``step`` on: a retried run logs them again, and the latest
        attempt's points are the curve (steps grow along a series)."""
        later = np.flatnonzero(self.x >= step)
        if len(later):
            self.n = int(later[0])
            self._smooth = self._smooth[: self.n]

    def smoothed(self, weight: float) -> np.ndarray:
        """Exponential moving average (TensorBoard's smoothing); weight 0 is the raw curve."""
        if weight <= 0:
            return self.y
        if weight != self._weight:
            self._weight, self._smooth = weight, np.empty(0)
        done = len(self._smooth)
        if done < self.n:
            new = self.y[done:]
            if done:  # continue the recurrence from the last smoothed value
                new = np.concatenate([self._smooth[-1:], new])
            ema = pd.Series(new).ewm(alpha=1 - weight, adjust=False, ignore_na=True).mean().to_numpy()
            self._smooth = np.concatenate([self._smooth, ema[1:] if done else ema])
        return self._smooth
