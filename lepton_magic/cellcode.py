"""What a cell needs and what it gives back, found by reading its AST (nothing is executed).

- ``check_syntax``: reject a broken cell before any node is touched.
- ``free_names``: names some path of the cell may read before the cell binds them: candidates
  for shipping by value (the analysis is in ``freenames``).
- ``assigned_names``: names the cell binds at top level: what comes back to the notebook.

Line numbers are those of the notebook cell, where the ``%%lepton`` line is line 1, so a
remote traceback points at the line the person sees.
"""

from __future__ import annotations

import ast
import builtins
import sys
from dataclasses import dataclass

from . import freenames

#: Filename the cell is compiled under on the nodes; tracebacks show it.
CELL_FILENAME = "<lepton cell>"
#: The body of a cell magic starts on the line after ``%%lepton``.
MAGIC_LINE_OFFSET = 1

_BUILTINS = frozenset(dir(builtins))
#: Names that exist on the node whatever the notebook holds.
_PROVIDED = frozenset({"lepton", "__name__", "__file__", "__builtins__"})


@dataclass(frozen=True)
class CellSyntaxError(Exception):
    """The cell does not parse; ``line`` is the notebook cell's line number."""

    message: str
    line: int
    text: str = ""
    offset: int = 0

    def __str__(self) -> str:
        where = f"line {self.line}"
        out = f"SyntaxError in the cell, {where}: {self.message}"
        if self.text:
            caret = " " * max(self.offset - 1, 0) + "^"
            out += f"\n    {self.text.rstrip()}\n    {caret}"
        return out


def padded_source(code: str, offset: int = MAGIC_LINE_OFFSET) -> str:
    """The cell body shifted down so compiled line numbers match the notebook's."""
    return "\n" * offset + code


def check_syntax(code: str, offset: int = MAGIC_LINE_OFFSET) -> ast.Module:
    try:
        return ast.parse(padded_source(code, offset), CELL_FILENAME, "exec")
    except SyntaxError as e:
        text = e.text or ""
        if text.lstrip().startswith(("%", "!")):
            message = "IPython magics and shell escapes (% and !) cannot run on the nodes"
        else:
            message = e.msg
        raise CellSyntaxError(message, e.lineno or 0, text, e.offset or 0) from None


_TRY_STATEMENTS = (ast.Try, ast.TryStar) if hasattr(ast, "TryStar") else (ast.Try,)


def _captured(pattern: ast.pattern) -> set[str]:
    """Names a ``case`` pattern binds."""
    names = set()
    for n in ast.walk(pattern):
        if isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            names.add(n.rest)
    return names


def _bound(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement may bind, on any path."""
    names: set[str] = set()

    def targets(node: ast.AST) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                names.add(n.id)
            elif isinstance(n, ast.Starred) and isinstance(n.value, ast.Name):
                names.add(n.value.id)

    if isinstance(stmt, ast.Assign):
        for t in stmt.targets:
            targets(t)
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        if not isinstance(stmt, ast.AnnAssign) or stmt.value is not None:
            targets(stmt.target)
    elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.add(stmt.name)
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
        for alias in stmt.names:
            if alias.name != "*":
                names.add(alias.asname or alias.name.split(".")[0])
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        for item in stmt.items:
            if item.optional_vars is not None:
                targets(item.optional_vars)
        for inner in stmt.body:
            names |= _bound(inner)
    elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.While, ast.If, *_TRY_STATEMENTS)):
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            targets(stmt.target)
        blocks = [stmt.body, getattr(stmt, "orelse", [])]
        if isinstance(stmt, _TRY_STATEMENTS):
            blocks += [stmt.finalbody] + [h.body for h in stmt.handlers]
            names |= {h.name for h in stmt.handlers if h.name}
        for block in blocks:
            for inner in block:
                names |= _bound(inner)
    elif isinstance(stmt, ast.Match):
        for case in stmt.cases:
            names |= _captured(case.pattern)
            for inner in case.body:
                names |= _bound(inner)
    # Walrus targets bind in the enclosing (here: global) scope wherever they appear.
    for n in ast.walk(stmt):
        if isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name):
            names.add(n.target.id)
    return names


def free_names(tree: ast.Module) -> list[str]:
    """Names some path of the cell may read before the cell binds them, in order of first use
    (see ``freenames``).

    Builtins and the names the node provides (``lepton``) are left out; whether a free name
    exists in the notebook is for the caller to decide.
    """
    return [
        name for name in freenames.names_read_before_bound(tree)
        if name not in _BUILTINS and name not in _PROVIDED
    ]


def assigned_names(tree: ast.Module) -> list[str]:
    """Names bound at top level, imports excluded (modules are not results), in order."""
    out: dict[str, None] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        for name in sorted(_bound(stmt)):
            if not name.startswith("_") and name not in _PROVIDED:
                out.setdefault(name)
    return list(out)


#: Uses of the ``lepton`` object that need torch on the node.
_TORCH_ATTRIBUTES = frozenset({"device", "init_distributed", "barrier", "restore"})


def needs_only_stdlib(tree: ast.Module) -> bool:
    """True when the cell imports nothing beyond the standard library and does not ask the
    ``lepton`` object for torch things: a light rank (without torch preloaded) can run it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [(node.module or "").split(".")[0]] if node.level == 0 else ["."]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "lepton" and node.attr in _TORCH_ATTRIBUTES):
            return False
        else:
            continue
        if any(root not in sys.stdlib_module_names for root in roots):
            return False
    return True


def parse_name_list(text: str, option: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; anything that is not a Python identifier is refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(
            f"{option} takes comma-separated variable names (like a,b), got {', '.join(map(repr, bad))}"
        )
    return names
