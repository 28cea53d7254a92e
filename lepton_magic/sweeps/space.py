"""What ``--sweep`` and its companion options say, read into Optuna's terms.

``--sweep "lr=[1e-3,3e-3]; width=choice(64,128); p=uniform(0,0.5)"``: one ``name=values`` per
dimension, separated by ``;``. A list or ``choice(...)`` is a set of values (a grid dimension);
``uniform(lo, hi)``, ``loguniform(lo, hi)``, ``int(lo, hi[, step])`` and ``logint(lo, hi)`` are
ranges a sampler draws from. Values are Python literals, read with ``ast.literal_eval``: nothing
in a sweep is ever executed.
"""

from __future__ import annotations

import ast
import itertools
import keyword
from dataclasses import dataclass, field
from typing import Any

from ..errors import LeptonError

RANGES = ("uniform", "loguniform", "int", "logint")
ACCEPTED = "[a, b, ...], choice(a, b, ...), uniform(lo, hi), loguniform(lo, hi), int(lo, hi[, step]), logint(lo, hi)"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "none")


class SweepError(LeptonError):
    """A sweep option that cannot be read: one line saying what and what is accepted."""


@dataclass
class Dimension:
    name: str
    kind: str  # "choice" or one of RANGES
    values: tuple = ()  # choice
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None

    @property
    def discrete(self) -> bool:
        return self.kind == "choice"

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.values))
        if self.kind in ("int", "logint"):
            return IntDistribution(int(self.low), int(self.high), log=self.kind == "logint", step=self.step or 1)
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "loguniform")

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.values)}"
        return f"{self.name}={self.kind}({self.low}, {self.high})"


@dataclass
class Objective:
    """Which logged metric a trial is judged by, and which way. ``metric`` None: the first
    metric the first trial logs (minimised), decided when it is logged."""

    metric: str | None = None
    direction: str = "minimize"

    def __str__(self) -> str:
        way = "min" if self.direction == "minimize" else "max"
        return f"{way} {self.metric}" if self.metric else f"{way} of the first metric logged"


@dataclass
class SweepSpec:
    space: list[Dimension]
    trials: int
    sampler: str
    objective: Objective = field(default_factory=Objective)
    seed: int | None = None
    parallel: int | None = None
    nodes_per_trial: int = 1
    prune: str = "none"
    study: str | None = None
    fail_fast: bool = False

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.space]

    def distributions(self) -> dict:
        return {d.name: d.distribution() for d in self.space}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of a grid sweep's values, in the order they were written."""
        return [dict(zip(self.names, combo)) for combo in itertools.product(*(d.values for d in self.space))]

    def describe(self) -> dict:
        """What the store keeps of it (the sweep's row), JSON-ready."""
        from optuna.distributions import distribution_to_json

        return {"space": [str(d) for d in self.space], "names": self.names, "trials": self.trials,
                "distributions": {d.name: distribution_to_json(d.distribution()) for d in self.space},
                "sampler": self.sampler, "objective": self.objective.metric,
                "direction": self.objective.direction, "seed": self.seed, "parallel": self.parallel,
                "nodes_per_trial": self.nodes_per_trial, "prune": self.prune, "study": self.study,
                "fail_fast": self.fail_fast}


def parse_space(text: str) -> list[Dimension]:
    dims: list[Dimension] = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or keyword.iskeyword(name):
            raise SweepError(f"--sweep takes name=values parts separated by ';' (like lr=[1e-3,1e-2]), got {part!r}")
        if name in (d.name for d in dims):
            raise SweepError(f"--sweep names {name} twice")
        dims.append(_dimension(name, value.strip()))
    if not dims:
        raise SweepError(f"--sweep names no parameter; write name=values, each value one of: {ACCEPTED}")
    return dims


def _dimension(name: str, text: str) -> Dimension:
    where = f"--sweep {name}={text}"
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise SweepError(f"{where}: cannot be read; accepted: {ACCEPTED}") from None
    if isinstance(node, (ast.List, ast.Tuple)):
        return _choice(name, node.elts, where)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords):
        raise SweepError(f"{where}: not a list or a distribution; accepted: {ACCEPTED}")
    kind = node.func.id
    if kind == "choice":
        return _choice(name, node.args, where)
    if kind not in RANGES:
        raise SweepError(f"{where}: unknown distribution {kind!r}; accepted: {ACCEPTED}")
    args = [_literal(a, where) for a in node.args]
    if len(args) not in ((2, 3) if kind == "int" else (2,)) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SweepError(f"{where}: {kind} takes two numbers, low and high" + (" (and a step)" if kind == "int" else ""))
    low, high = args[0], args[1]
    if kind in ("int", "logint") and not all(isinstance(a, int) for a in args):
        raise SweepError(f"{where}: {kind} takes whole numbers")
    if not low < high:
        raise SweepError(f"{where}: low must be below high")
    if kind in ("loguniform", "logint") and low <= 0:
        raise SweepError(f"{where}: {kind} needs a low above 0")
    return Dimension(name, kind, low=low, high=high, step=args[2] if len(args) == 3 else None)


def _choice(name: str, elements: list, where: str) -> Dimension:
    values = tuple(_literal(e, where) for e in elements)
    if not values:
        raise SweepError(f"{where}: no values to choose from")
    for v in values:
        if not isinstance(v, (int, float, str, bool, type(None))):
            raise SweepError(f"{where}: values are numbers, strings, True/False or None, got {v!r}")
    if len(set(map(repr, values))) != len(values):
        raise SweepError(f"{where}: a value is listed twice")
    return Dimension(name, "choice", values=values)


def _literal(node: ast.AST, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise SweepError(f"{where}: {ast.unparse(node)} is not a literal value") from None


def parse_objective(text: str | None) -> Objective:
    if text is None:
        return Objective()
    words = str(text).split()
    if len(words) != 2 or words[0] not in ("min", "max") or not words[1].isidentifier():
        raise SweepError(f"--objective takes \"min METRIC\" or \"max METRIC\" (like \"min val_loss\"), got {text!r}")
    return Objective(words[1], "minimize" if words[0] == "min" else "maximize")


def make_spec(sweep: str, *, trials: int | None = None, sampler: str | None = None, objective: str | None = None,
              seed: int | None = None, parallel: int | None = None, nodes_per_trial: int | None = None,
              prune: str | None = None, study: str | None = None, fail_fast: bool = False) -> SweepSpec:
    """Every sweep option checked together, before any node is used."""
    space = parse_space(sweep)
    if sampler is not None and sampler not in SAMPLERS:
        raise SweepError(f"--sampler takes {', '.join(SAMPLERS)}, got {sampler!r}")
    if prune is not None and prune not in PRUNERS:
        raise SweepError(f"--prune takes {', '.join(PRUNERS)}, got {prune!r}")
    discrete = all(d.discrete for d in space)
    size = 1
    for d in space:
        size *= len(d.values) if d.discrete else 1
    if sampler == "grid" and not discrete:
        ranges = ", ".join(d.name for d in space if not d.discrete)
        raise SweepError(f"--sampler grid needs listed values; {ranges} is a range: list its values, or use tpe or random")
    chosen = sampler or ("grid" if discrete and trials is None else "tpe")
    if chosen == "grid":
        count = min(trials, size) if trials else size
    elif trials is None:
        ranges = ", ".join(d.name for d in space if not d.discrete)
        raise SweepError(f"a sweep over ranges ({ranges}) needs --trials N: how many to draw")
    else:
        count = trials
    return SweepSpec(space, count, chosen, parse_objective(objective), seed, parallel, nodes_per_trial or 1,
                     prune or "none", study, fail_fast)
