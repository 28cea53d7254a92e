"""Which names a cell may read before it binds them: the notebook values it needs.

A flow-sensitive walk over the cell's AST, in the order CPython evaluates it. The state at each point
is what the cell has *settled* on every path that gets there: the names it bound, or deleted (reading
those fails, whatever the notebook holds). A read of a name that is not settled is free: on some path
the notebook's value may be the one read. Where paths meet, only what all of them settled stays
settled, so a name bound on one branch only stays free.

A function body runs when the function is called, not when it is defined: its global reads are kept
with the function's name and made where the cell next reads that name (a call, or handing the
function on, as in ``pool.map(f, xs)``), against what is settled there; a function the cell never
reads is charged at the end of the cell. Decorating is not reading the name: a decorated function is
charged like any other.

When the analysis cannot tell, the name is free: shipping a value the cell does not need costs
bytes, missing one it needs breaks the cell. Only ``ast`` is used (``symtable``'s comprehension
scopes changed in 3.12), so Python 3.10 to 3.13 give the same answers; annotations are taken as
evaluated at once, as those versions do without ``from __future__ import annotations``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


def names_read_before_bound(tree: ast.Module) -> list[str]:
    """Names some execution path of the cell may read before the cell binds them, in order of first
    use. Builtins are among them: which names to leave out is the caller's choice."""
    flow = _CellFlow()
    end = flow.block(tree.body, _State())
    if end is not None:
        # A function the cell never reads may still run: a decorator or a registry kept it.
        flow.charge(end.uncalled, end)
    return list(flow.free)


# --- What a function, class or comprehension body reads: scopes, no flow -------------------------


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[ast.arg]:
    args = node.args
    every = [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg]
    return [arg for arg in every if arg is not None]


def _evaluated_at_definition(node: ast.AST) -> list[ast.expr]:
    """The parts of a def, lambda or class that run in the enclosing scope, in evaluation order."""
    if isinstance(node, ast.ClassDef):
        return [*node.decorator_list, *node.bases, *(keyword.value for keyword in node.keywords)]
    defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
    if isinstance(node, ast.Lambda):
        return defaults
    annotations = [arg.annotation for arg in _arguments(node) if arg.annotation is not None]
    returns = [node.returns] if node.returns is not None else []
    return [*node.decorator_list, *defaults, *annotations, *returns]


def _body(node: ast.AST) -> list[ast.AST]:
    return [node.body] if isinstance(node, ast.Lambda) else node.body


def _comprehension_targets(node: ast.AST) -> frozenset[str]:
    return frozenset(
        name.id
        for generator in node.generators
        for name in ast.walk(generator.target)
        if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store)
    )


def _inside_comprehension(node: ast.AST) -> list[ast.AST]:
    """What a comprehension runs in its own scope, in order: everything but its first iterable."""
    first, *rest = node.generators
    parts: list[ast.AST] = [first.target, *first.ifs]
    for generator in rest:
        parts += [generator.target, generator.iter, *generator.ifs]
    return parts + ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt])


def _same_scope_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """The nodes that run in the scope ``nodes`` belong to. Nested def and class bodies are another
    scope (their decorators and defaults are not); so are a comprehension's iteration variables,
    while a ``:=`` inside a comprehension binds here."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, _DEFINITIONS):
            stack.extend(_evaluated_at_definition(node))
        elif isinstance(node, ast.comprehension):
            stack.extend([node.iter, *node.ifs])
        else:
            stack.extend(ast.iter_child_nodes(node))


def _names_bound_by(node: ast.AST) -> list[str]:
    """The names one node binds in the scope it runs in (``del x`` counts: it makes x local)."""
    if isinstance(node, ast.Name):
        return [] if isinstance(node.ctx, ast.Load) else [node.id]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name != "*"]
    if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
        return [node.name] if node.name else []
    if isinstance(node, ast.MatchMapping):
        return [node.rest] if node.rest else []
    return []


@dataclass(frozen=True)
class _Scope:
    """How a function, class or comprehension body resolves a name: a local, a closure, or a global."""

    local: frozenset[str]
    #: Names of the enclosing function and comprehension scopes.
    closures: frozenset[str]
    declared_global: frozenset[str] = frozenset()
    is_class: bool = False

    def resolves(self, name: str) -> bool:
        return name not in self.declared_global and (name in self.local or name in self.closures)

    def for_nested(self) -> frozenset[str]:
        """The closures of a scope nested in this one: a class body's names are not among them."""
        inherited = self.closures - self.declared_global
        return inherited if self.is_class else inherited | self.local


def _scope_of(node: ast.AST, closures: frozenset[str]) -> _Scope:
    is_class = isinstance(node, ast.ClassDef)
    bound = set() if is_class else {arg.arg for arg in _arguments(node)}
    declared_global: set[str] = set()
    for inner in _same_scope_nodes(_body(node)):
        bound.update(_names_bound_by(inner))
        if isinstance(inner, ast.Global):
            declared_global.update(inner.names)
        elif isinstance(inner, ast.Nonlocal):
            bound.update(inner.names)  # an enclosing function's: not a global read
    return _Scope(frozenset(bound - declared_global), closures, frozenset(declared_global), is_class)


def _global_reads(node: ast.AST, closures: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Module names the body of a def, lambda or class reads when it runs (a class: its methods too),
    in order, once each."""
    return tuple(dict.fromkeys(_reads(_body(node), _scope_of(node, closures))))


def _reads(nodes: Iterable[ast.AST], scope: _Scope) -> Iterator[str]:
    for node in nodes:
        yield from _reads_of(node, scope)


def _reads_of(node: ast.AST, scope: _Scope) -> Iterator[str]:
    if isinstance(node, ast.Name):
        if not isinstance(node.ctx, ast.Store) and not scope.resolves(node.id):
            yield node.id
    elif isinstance(node, _DEFINITIONS):
        yield from _reads(_evaluated_at_definition(node), scope)
        # Charged with the enclosing body: whether that body calls it is not followed.
        yield from _global_reads(node, scope.for_nested())
    elif isinstance(node, _COMPREHENSIONS):
        yield from _reads_of(node.generators[0].iter, scope)
        inner = _Scope(_comprehension_targets(node), scope.for_nested())
        yield from _reads(_inside_comprehension(node), inner)
    elif isinstance(node, ast.AnnAssign) and not scope.is_class:
        # A function never evaluates the annotations of its local variables.
        yield from _reads([node.target] + ([node.value] if node.value else []), scope)
    else:
        yield from _reads(ast.iter_child_nodes(node), scope)


# --- The cell itself (and class bodies): flow -----------------------------------------------------


@dataclass(frozen=True, order=True)
class _Deferred:
    """The global reads of a function's body (a class's: of its methods), made when it is called."""

    #: Creation order, so that charging several is deterministic.
    serial: int
    reads: tuple[str, ...] = field(compare=False)


@dataclass(frozen=True)
class _Namespace:
    """A namespace as every path so far leaves it."""

    #: Bound on every path (at module level: or deleted, since reading those does not reach the notebook).
    settled: frozenset[str] = frozenset()
    #: The cell's functions each name may hold on some path.
    functions: Mapping[str, frozenset[_Deferred]] = field(default_factory=dict)

    def bind(self, name: str, deferred: _Deferred | None = None) -> _Namespace:
        functions = {key: value for key, value in self.functions.items() if key != name}
        if deferred is not None:
            functions[name] = frozenset({deferred})
        return _Namespace(self.settled | {name}, functions)

    def delete(self, name: str, *, settles: bool) -> _Namespace:
        functions = {key: value for key, value in self.functions.items() if key != name}
        settled = self.settled | {name} if settles else self.settled - {name}
        return _Namespace(settled, functions)

    def join(self, other: _Namespace) -> _Namespace:
        functions = dict(self.functions)
        for name, deferreds in other.functions.items():
            functions[name] = functions.get(name, frozenset()) | deferreds
        return _Namespace(self.settled & other.settled, functions)


@dataclass(frozen=True)
class _State:
    module: _Namespace = field(default_factory=_Namespace)
    #: Functions defined on some path and not read since: charged at the end of the cell.
    uncalled: frozenset[_Deferred] = frozenset()
    #: The namespace of the class body being run, if any.
    cls: _Namespace | None = None


def _join(*states: _State | None) -> _State | None:
    """The state where paths meet; None stands for a path that never gets there (after a raise...)."""
    live = [state for state in states if state is not None]
    return functools.reduce(_join_two, live) if live else None


def _join_two(a: _State, b: _State) -> _State:
    cls = a.cls.join(b.cls) if a.cls is not None else None
    return _State(a.module.join(b.module), a.uncalled | b.uncalled, cls)


@dataclass
class _LoopExits:
    breaks: list[_State] = field(default_factory=list)
    continues: list[_State] = field(default_factory=list)


def _always_true(test: ast.expr) -> bool:
    return isinstance(test, ast.Constant) and bool(test.value)


def _suppresses(node: ast.With | ast.AsyncWith) -> bool:
    """``with suppress(...)``: the body may stop at any statement and the cell carry on after it."""
    for item in node.items:
        call = item.context_expr
        if isinstance(call, ast.Call):
            func = call.func
            if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) == "suppress":
                return True
    return False


def _matches_anything(pattern: ast.pattern) -> bool:
    if isinstance(pattern, ast.MatchAs):
        return pattern.pattern is None or _matches_anything(pattern.pattern)
    return isinstance(pattern, ast.MatchOr) and any(_matches_anything(p) for p in pattern.patterns)


class _CellFlow:
    """Walks the cell's statements and expressions in evaluation order, threading a ``_State``."""

    def __init__(self) -> None:
        self.free: dict[str, None] = {}
        self._deferred: dict[ast.AST, _Deferred] = {}
        self._loops: list[_LoopExits] = []
        #: For each enclosing try (body or whole), the states it passed through: where it may raise.
        self._raise_sinks: list[list[_State]] = []
        self._comprehension_scopes: list[frozenset[str]] = []
        self._class_globals: frozenset[str] = frozenset()

    def block(self, statements: Iterable[ast.stmt], state: _State | None) -> _State | None:
        for statement in statements:
            if state is None:
                return None  # the rest never runs
            for sink in self._raise_sinks:
                sink.append(state)
            handler = self._STATEMENTS.get(type(statement), _CellFlow._children)
            state = handler(self, statement, state)
        return state

    def charge(
        self, deferreds: Iterable[_Deferred], state: _State, seen: set[_Deferred] | None = None
    ) -> _State:
        """The cell calls (or hands on) functions: their bodies' global reads, and those of the cell's
        functions they read in turn, happen now. Each is charged once per call, so recursion ends."""
        seen = set() if seen is None else seen
        for deferred in sorted(deferreds):
            if deferred in seen:
                continue
            seen.add(deferred)
            state = replace(state, uncalled=state.uncalled - {deferred})
            for name in deferred.reads:
                state = self._load_global(name, state, seen)
        return state

    # Names

    def _in_comprehension(self, name: str) -> bool:
        return any(name in scope for scope in self._comprehension_scopes)

    def _in_class_namespace(self, state: _State, name: str) -> bool:
        # A comprehension in a class body does not see the class's names (but its first iterable does).
        return state.cls is not None and not self._comprehension_scopes and name not in self._class_globals

    def _load(self, name: str, state: _State) -> _State:
        if self._in_comprehension(name):
            return state
        if self._in_class_namespace(state, name):
            state = self.charge(state.cls.functions.get(name, frozenset()), state)
            if name in state.cls.settled:
                return state
        return self._load_global(name, state)

    def _load_global(self, name: str, state: _State, seen: set[_Deferred] | None = None) -> _State:
        if name not in state.module.settled:
            self.free.setdefault(name)
        return self.charge(state.module.functions.get(name, frozenset()), state, seen)

    def _store(self, name: str, state: _State, deferred: _Deferred | None = None) -> _State:
        if self._in_comprehension(name):
            return state  # an iteration variable: local to the comprehension
        if self._in_class_namespace(state, name):
            return replace(state, cls=state.cls.bind(name, deferred))
        uncalled = state.uncalled | {deferred} if deferred is not None else state.uncalled
        return replace(state, module=state.module.bind(name, deferred), uncalled=uncalled)

    def _delete(self, name: str, state: _State) -> _State:
        if self._in_class_namespace(state, name):
            # Only the class namespace loses it: a later read in the body falls back to the module's.
            return replace(state, cls=state.cls.delete(name, settles=False))
        if name not in state.module.settled:
            self.free.setdefault(name)  # del needs the name to exist
        return replace(state, module=state.module.delete(name, settles=True))

    def _deferred_of(self, node: ast.AST) -> _Deferred:
        # One per node: the passes over a loop body then see the same functions, and the loop-head
        # state stops changing.
        if node not in self._deferred:
            self._deferred[node] = _Deferred(len(self._deferred), _global_reads(node))
        return self._deferred[node]

    # Expressions

    def _expr(self, node: ast.AST, state: _State) -> _State:
        handler = self._EXPRESSIONS.get(type(node), _CellFlow._children)
        return handler(self, node, state)

    def _evaluate(self, nodes: Iterable[ast.AST], state: _State) -> _State:
        for node in nodes:
            state = self._expr(node, state)
        return state

    def _children(self, node: ast.AST, state: _State) -> _State:
        return self._evaluate(ast.iter_child_nodes(node), state)

    def _name(self, node: ast.Name, state: _State) -> _State:
        if isinstance(node.ctx, ast.Store):
            return self._store(node.id, state)
        if isinstance(node.ctx, ast.Del):
            return self._delete(node.id, state)
        return self._load(node.id, state)

    def _walrus(self, node: ast.NamedExpr, state: _State) -> _State:
        return self._expr(node.target, self._expr(node.value, state))

    def _short_circuit(self, operands: list[ast.expr], state: _State) -> _State:
        """Every operand after the first may be skipped: what it binds is not settled after."""
        outcomes = []
        for operand in operands:
            state = self._expr(operand, state)
            outcomes.append(state)
        return _join(*outcomes)

    def _bool_op(self, node: ast.BoolOp, state: _State) -> _State:
        return self._short_circuit(node.values, state)

    def _compare(self, node: ast.Compare, state: _State) -> _State:
        # `a < b < c` stops at the first false comparison.
        return self._short_circuit(node.comparators, self._expr(node.left, state))

    def _if_exp(self, node: ast.IfExp, state: _State) -> _State:
        state = self._expr(node.test, state)
        return _join(self._expr(node.body, state), self._expr(node.orelse, state))

    def _dict(self, node: ast.Dict, state: _State) -> _State:
        for key, value in zip(node.keys, node.values):
            state = self._expr(value, state if key is None else self._expr(key, state))
        return state

    def _lambda(self, node: ast.Lambda, state: _State) -> _State:
        # Not bound to a name, a lambda is a key or a callback that runs soon: its reads count now.
        state = self._evaluate(_evaluated_at_definition(node), state)
        for name in _global_reads(node, frozenset().union(*self._comprehension_scopes)):
            state = self._load_global(name, state)
        return state

    def _comprehension(self, node: ast.AST, state: _State) -> _State:
        state = self._expr(node.generators[0].iter, state)  # evaluated in the enclosing scope
        self._comprehension_scopes.append(_comprehension_targets(node))
        inside = self._evaluate(_inside_comprehension(node), state)
        self._comprehension_scopes.pop()
        return _join(state, inside)  # it may iterate zero times

    # Statements

    def _assign(self, node: ast.Assign, state: _State) -> _State:
        return self._assign_value(node.targets, node.value, state)

    def _assign_value(self, targets: list[ast.expr], value: ast.expr, state: _State) -> _State:
        if isinstance(value, ast.Lambda) and all(isinstance(target, ast.Name) for target in targets):
            # `name = lambda: ...` is a def: its body runs when `name` is called.
            state = self._evaluate(_evaluated_at_definition(value), state)
            for target in targets:
                state = self._store(target.id, state, self._deferred_of(value))
            return state
        return self._evaluate(targets, self._expr(value, state))

    def _aug_assign(self, node: ast.AugAssign, state: _State) -> _State:
        target = node.target
        if isinstance(target, ast.Name):
            return self._store(target.id, self._expr(node.value, self._load(target.id, state)))
        return self._expr(node.value, self._expr(target, state))  # `a.b += v` reads a first

    def _ann_assign(self, node: ast.AnnAssign, state: _State) -> _State:
        if node.value is not None:
            state = self._assign_value([node.target], node.value, state)
        elif not isinstance(node.target, ast.Name):
            state = self._expr(node.target, state)  # `a.b: int` evaluates a; `x: int` binds nothing
        # At module and class level 3.10-3.13 evaluate the annotation at once.
        return self._expr(node.annotation, state)

    def _bind_names(self, node: ast.AST, state: _State) -> _State:
        """For imports and capture patterns. `from m import *` binds names nobody can list: it
        settles none, so the reads after it stay free."""
        for name in _names_bound_by(node):
            state = self._store(name, state)
        return state

    def _function_def(self, node: ast.FunctionDef | ast.AsyncFunctionDef, state: _State) -> _State:
        state = self._evaluate(_evaluated_at_definition(node), state)
        return self._store(node.name, state, self._deferred_of(node))

    def _class_def(self, node: ast.ClassDef, state: _State) -> _State | None:
        state = self._class_body(node, self._evaluate(_evaluated_at_definition(node), state))
        return None if state is None else self._store(node.name, state, self._deferred_of(node))

    def _class_body(self, node: ast.ClassDef, state: _State) -> _State | None:
        # Break and continue cannot leave a class body. An enclosing try already holds the state
        # before the class statement, and the body changes the module namespace only through a
        # `global` declaration.
        saved = self._loops, self._raise_sinks, self._class_globals
        self._loops, self._raise_sinks = [], []
        self._class_globals = _scope_of(node, frozenset()).declared_global
        end = self.block(node.body, replace(state, cls=_Namespace()))
        self._loops, self._raise_sinks, self._class_globals = saved
        return None if end is None else replace(end, cls=state.cls)

    def _if(self, node: ast.If, state: _State) -> _State | None:
        state = self._expr(node.test, state)
        return _join(self.block(node.body, state), self.block(node.orelse, state))

    def _loop(
        self, body: list[ast.stmt], entry: _State, start_iteration: Callable[[_State], _State]
    ) -> tuple[_State, _State, _LoopExits]:
        """Runs ``body`` until the state at the loop head stops changing: an iteration also sees what
        the ones before left (the functions they defined), and there may be no iteration at all.
        Returns the head state, the state an iteration starts with, and how the loop was left."""
        head = entry
        while True:
            exits = _LoopExits()
            self._loops.append(exits)
            started = start_iteration(head)
            end = self.block(body, started)
            self._loops.pop()
            next_head = _join(head, end, *exits.continues)
            if next_head == head:
                return head, started, exits
            head = next_head

    def _for(self, node: ast.For | ast.AsyncFor, state: _State) -> _State | None:
        state = self._expr(node.iter, state)
        head, _, exits = self._loop(node.body, state, lambda head: self._expr(node.target, head))
        # The else runs once the iterator is exhausted, maybe at once; a break skips it.
        return _join(self.block(node.orelse, head), *exits.breaks)

    def _while(self, node: ast.While, state: _State) -> _State | None:
        _, tested, exits = self._loop(node.body, state, lambda head: self._expr(node.test, head))
        finished = None if _always_true(node.test) else self.block(node.orelse, tested)
        return _join(finished, *exits.breaks)

    def _break(self, node: ast.Break, state: _State) -> None:
        if self._loops:  # outside a loop it does not compile: nothing runs after it either way
            self._loops[-1].breaks.append(state)

    def _continue(self, node: ast.Continue, state: _State) -> None:
        if self._loops:
            self._loops[-1].continues.append(state)

    def _with(self, node: ast.With | ast.AsyncWith, state: _State) -> _State | None:
        for item in node.items:
            state = self._expr(item.context_expr, state)
            if item.optional_vars is not None:
                state = self._expr(item.optional_vars, state)
        end = self.block(node.body, state)
        return _join(state, end) if _suppresses(node) else end

    def _try(self, node: ast.Try, state: _State) -> _State | None:
        in_try: list[_State] = []
        in_body: list[_State] = []
        self._raise_sinks += [in_try, in_body]
        body_end = self.block(node.body, state)
        self._raise_sinks.pop()
        # A handler starts from wherever the body raised: from what every state in the body settled.
        caught = _join(*in_body)
        exits = [self._handler(handler, caught) for handler in node.handlers]
        exits.append(self.block(node.orelse, body_end))
        self._raise_sinks.pop()
        left_normally = _join(*exits)
        if node.finalbody:
            # The finally also runs on the way out of an exception or a break, from any state the try
            # passed through: its reads count against those. What follows the try comes after a
            # normal exit only.
            self.block(node.finalbody, _join(*in_try, left_normally))
        return self.block(node.finalbody, left_normally)

    def _handler(self, node: ast.ExceptHandler, state: _State) -> _State | None:
        if node.type is not None:
            state = self._expr(node.type, state)
        if node.name is None:
            return self.block(node.body, state)
        end = self.block(node.body, self._store(node.name, state))
        # CPython ends the handler with `name = None; del name`.
        return None if end is None else self._delete(node.name, self._store(node.name, end))

    def _match(self, node: ast.Match, state: _State) -> _State | None:
        state = self._expr(node.subject, state)
        ends = []
        for case in node.cases:
            # The cases before failed, settling nothing for sure.
            matched = self._pattern(case.pattern, state)
            if case.guard is not None:
                matched = self._expr(case.guard, matched)
            ends.append(self.block(case.body, matched))
        if not any(case.guard is None and _matches_anything(case.pattern) for case in node.cases):
            ends.append(state)  # no case matched
        return _join(*ends)

    def _pattern(self, node: ast.pattern, state: _State) -> _State:
        if isinstance(node, ast.MatchOr):
            return _join(*(self._pattern(alternative, state) for alternative in node.patterns))
        for child in ast.iter_child_nodes(node):
            # A pattern holds sub-patterns, and expressions (values, classes) it evaluates.
            is_pattern = isinstance(child, ast.pattern)
            state = self._pattern(child, state) if is_pattern else self._expr(child, state)
        return self._bind_names(node, state)

    def _raise(self, node: ast.Raise, state: _State) -> None:
        self._children(node, state)

    def _assert(self, node: ast.Assert, state: _State) -> _State:
        state = self._expr(node.test, state)
        if node.msg is not None:
            self._expr(node.msg, state)  # only on the way to raising
        return state

    _EXPRESSIONS = {
        ast.Name: _name,
        ast.NamedExpr: _walrus,
        ast.BoolOp: _bool_op,
        ast.Compare: _compare,
        ast.IfExp: _if_exp,
        ast.Dict: _dict,
        ast.Lambda: _lambda,
        **dict.fromkeys(_COMPREHENSIONS, _comprehension),
    }
    _STATEMENTS = {
        ast.Assign: _assign,
        ast.AugAssign: _aug_assign,
        ast.AnnAssign: _ann_assign,
        ast.Import: _bind_names,
        ast.ImportFrom: _bind_names,
        ast.FunctionDef: _function_def,
        ast.AsyncFunctionDef: _function_def,
        ast.ClassDef: _class_def,
        ast.If: _if,
        ast.For: _for,
        ast.AsyncFor: _for,
        ast.While: _while,
        ast.Break: _break,
        ast.Continue: _continue,
        ast.With: _with,
        ast.AsyncWith: _with,
        ast.Try: _try,
        **({ast.TryStar: _try} if hasattr(ast, "TryStar") else {}),
        ast.Match: _match,
        ast.Raise: _raise,
        ast.Assert: _assert,
    }
