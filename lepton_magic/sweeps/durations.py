"""How long a trial will take, from the trials that ran before it, so a grid sweep can start the
longest first (LPT: the classic list-scheduling rule, within 4/3 of the best makespan).

A ridge regression over the parameters (numbers as they are, other values one-hot): cheap,
deterministic, and it extrapolates, so a grid point beyond every finished one is still ranked
as the longest. With nothing finished yet every estimate is the same and the order stays the
one written.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class DurationModel:
    def __init__(self, names: list[str]):
        self.names = names
        self._seen: list[tuple[dict[str, Any], float]] = []
        self._coef: np.ndarray | None = None
        self._columns: list[tuple[str, Any]] = []

    def add(self, params: dict[str, Any], seconds: float) -> None:
        self._seen.append((params, seconds))
        self._coef = None

    def __len__(self) -> int:
        return len(self._seen)

    def estimate(self, params: dict[str, Any]) -> float:
        if not self._seen:
            return 0.0
        if self._coef is None:
            self._fit()
        return float(self._features(params) @ self._coef)

    def longest_first(self, pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``pending`` ordered by estimated duration, longest first (stable: ties keep their order)."""
        if not self._seen:
            return list(pending)
        return sorted(pending, key=lambda p: -self.estimate(p))

    def _fit(self) -> None:
        self._columns = []
        for name in self.names:
            values = [p.get(name) for p, _ in self._seen]
            if all(_number(v) for v in values):
                self._columns.append((name, None))
            else:
                for value in dict.fromkeys(map(repr, values)):
                    self._columns.append((name, value))
        x = np.array([self._features(p) for p, _ in self._seen])
        y = np.array([s for _, s in self._seen])
        ridge = 1e-6 * np.eye(x.shape[1])
        ridge[0, 0] = 0.0  # the intercept is not shrunk
        self._coef = np.linalg.solve(x.T @ x + ridge, x.T @ y)

    def _features(self, params: dict[str, Any]) -> np.ndarray:
        row = [1.0]
        for name, value in self._columns:
            v = params.get(name)
            if value is None:
                row.append(float(v) if _number(v) else 0.0)
            else:
                row.append(1.0 if repr(v) == value else 0.0)
        return np.array(row)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
