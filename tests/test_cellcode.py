import pytest

from lepton_magic.cellcode import (
    CellSyntaxError,
    assigned_names,
    check_syntax,
    free_names,
    parse_name_list,
)


def analyse(code):
    tree = check_syntax(code)
    return free_names(tree), assigned_names(tree)


def test_free_names_are_read_before_bound():
    free, assigned = analyse(
        "import torch\n"
        "model = torch.nn.Linear(64, 10)\n"
        "out = model(X_train)\n"
        "total = x + 1\n"
        "x = 2\n"
    )
    assert free == ["X_train", "x"]
    assert assigned == ["model", "out", "total", "x"]


def test_nested_scopes_and_builtins():
    free, assigned = analyse(
        "def f(a):\n    return a + W + len(a)\n"
        "class C:\n    k = K\n"
        "ys = [i * scale for i in range(3)]\n"
        "lepton.log(loss=1.0)\n"
    )
    assert set(free) == {"W", "K", "scale"}  # not a, i, len, range, lepton
    assert assigned == ["f", "C", "ys"]


def test_conditional_binding_still_ships_the_notebook_value():
    free, assigned = analyse("if flag:\n    y = 1\nprint(y)\ny += 1\n")
    assert free == ["flag", "y"]
    assert assigned == ["y"]


def test_loops_with_and_try_assignments_come_back():
    _free, assigned = analyse(
        "for step in range(3):\n    loss = step\n"
        "with open('f') as fh:\n    data = 1\n"
        "try:\n    z = 1\nexcept Exception as err:\n    pass\n"
        "_private = 1\n"
    )
    assert set(assigned) == {"step", "loss", "fh", "data", "z", "err"}


def test_match_assignments_come_back():
    _free, assigned = analyse(
        "match cmd:\n    case [verb, *args]:\n        n = len(args)\n    case _:\n        n = 0\n"
    )
    assert assigned == ["args", "n", "verb"]


def test_imports_are_not_outputs():
    _free, assigned = analyse("import numpy as np\nfrom os import path\nv = np.zeros(1)\n")
    assert assigned == ["v"]


def test_syntax_error_reports_the_notebook_line():
    with pytest.raises(CellSyntaxError) as info:
        check_syntax("x = 1\ny = = 2\n")
    assert info.value.line == 3  # line 1 of the notebook cell is the %%lepton line
    assert "line 3" in str(info.value) and "y = = 2" in str(info.value)


def test_magics_in_the_cell_are_explained():
    with pytest.raises(CellSyntaxError) as info:
        check_syntax("%time x = 1\n")
    assert "magics" in str(info.value)


def test_name_lists():
    assert parse_name_list("a, b,c", "--in") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="--out takes comma-separated variable names"):
        parse_name_list("a, 1b", "--out")


def cell(*lines):
    """A cell's source, from its lines."""
    return "".join(line + "\n" for line in lines)


# (cell, the names some path of it reads before the cell binds them, in order of first use)
FREE_NAME_CASES = [
    # the two user reports, verbatim
    pytest.param(cell('with open("notes.txt") as f:', "    print(f.read())"), [], id="report-with-as"),
    pytest.param(cell("for batch in range(3):", "    print(batch)"), [], id="report-for-target"),
    # for / async for / while
    pytest.param(
        cell("for batch in loader:", "    pass", "print(batch)"),
        ["loader", "batch"], id="for-zero-iterations",
    ),
    pytest.param(
        cell("for i in range(3):", "    print(acc)", "    acc = i"),
        ["acc"], id="for-read-before-bind-in-body",
    ),
    pytest.param(
        cell(
            "for v in xs:",
            "    if v:",
            "        hit = v",
            "        break",
            "else:",
            "    hit = None",
            "print(hit)",
        ),
        ["xs"], id="for-else-and-break-both-bind",
    ),
    pytest.param(
        cell("for v in xs:", "    if v:", "        break", "else:", "    hit = None", "print(hit)"),
        ["xs", "hit"], id="for-break-skips-else",
    ),
    pytest.param(cell("async for item in feed():", "    print(item)"), ["feed"], id="async-for"),
    pytest.param(
        cell("while n > 0:", "    last = n", "    n -= 1", "print(last)"),
        ["n", "last"], id="while-zero-iterations",
    ),
    pytest.param(
        cell(
            "while True:",
            "    line = source.readline()",
            "    if not line:",
            "        break",
            "print(line)",
        ),
        ["source"], id="while-true-left-by-break",
    ),
    pytest.param(
        cell("while (chunk := stream.read()):", "    total = chunk", "print(chunk, total)"),
        ["stream", "total"], id="while-walrus-test",
    ),
    pytest.param(
        cell(
            "for i in range(2):",
            "    if i:",
            "        step()",
            "    def step():",
            "        return rate",
            "rate = 1",
        ),
        ["step", "rate"], id="loop-calls-function-of-previous-iteration",
    ),
    # with
    pytest.param(cell("with lock:", "    count = 1", "print(count)"), ["lock"], id="with-body-binds"),
    pytest.param(
        cell("with open(path) as path:", "    pass"),
        ["path"], id="with-context-read-before-target",
    ),
    pytest.param(
        cell("async with session() as s:", "    await s.get(url)"),
        ["session", "url"], id="async-with",
    ),
    pytest.param(
        cell(
            "async def main():",
            "    async for item in feed():",
            "        print(item)",
            "    async with session() as s:",
            "        await s.get(url)",
            "asyncio.run(main())",
        ),
        ["asyncio", "feed", "session", "url"], id="async-for-and-with-in-coroutine",
    ),
    pytest.param(
        cell("with suppress(KeyError):", "    v = table['k']", "print(v)"),
        ["suppress", "table", "v"], id="with-suppress-may-skip-body",
    ),
    # try
    pytest.param(
        cell("try:", "    r = compute()", "except ValueError:", "    r = None", "print(r)"),
        ["compute"], id="try-every-way-out-binds",
    ),
    pytest.param(
        cell("try:", "    r = compute()", "except ValueError:", "    pass", "print(r)"),
        ["compute", "r"], id="try-handler-does-not-bind",
    ),
    pytest.param(
        cell("try:", "    run()", "except Error as e:", "    log(e)"),
        ["run", "Error", "log"], id="except-as-binds-in-handler",
    ),
    pytest.param(
        cell("try:", "    raise ValueError", "except ValueError as e:", "    pass", "print(e)"),
        [], id="except-as-unbound-after-handler",
    ),
    pytest.param(
        cell("try:", "    x = 1", "except Exception as e:", "    pass", "print(e)"),
        ["e"], id="except-as-not-bound-without-exception",
    ),
    pytest.param(
        cell(
            "try:",
            "    import torch",
            "except ImportError:",
            "    torch = None",
            "else:",
            "    ok = True",
            "print(torch, ok)",
        ),
        ["ok"], id="try-else",
    ),
    pytest.param(
        cell("try:", "    v = load()", "finally:", "    print(v)"),
        ["load", "v"], id="finally-sees-state-before-try",
    ),
    pytest.param(
        cell("try:", "    v = 1", "finally:", "    done = True", "print(v, done)"),
        [], id="after-finally-body-bound",
    ),
    # walrus
    pytest.param(
        cell("if (n := len(xs)) > 3:", "    pass", "print(n)"),
        ["xs"], id="walrus-always-evaluated",
    ),
    pytest.param(
        cell("if ready and (m := probe()):", "    pass", "print(m)"),
        ["ready", "probe", "m"], id="walrus-right-of-and",
    ),
    pytest.param(cell("y = a if c else (z := 0)", "print(z)"), ["c", "a", "z"], id="walrus-in-ifexp-branch"),
    pytest.param(
        cell("ys = [(last := v) for v in xs]", "print(last)"),
        ["xs", "last"], id="walrus-in-comprehension-body",
    ),
    pytest.param(cell("ys = [(y := v * 2) + y for v in xs]"), ["xs"], id="walrus-read-later-in-comprehension"),
    # comprehensions
    pytest.param(
        cell("ys = [i * k for i in range(3)]", "print(i)"),
        ["k", "i"], id="comprehension-variable-is-local",
    ),
    pytest.param(cell("ys = [x for x in x]"), ["x"], id="comprehension-first-iterable-outside"),
    pytest.param(
        cell("flat = [c for row in grid for c in row if c != pad]"),
        ["grid", "pad"], id="comprehension-nested-for",
    ),
    pytest.param(
        cell("fs = [lambda: i + j for i in range(3)]"),
        ["j"], id="lambda-closes-over-comprehension",
    ),
    # imports
    pytest.param(cell("import os.path", "print(os.sep)"), [], id="import-dotted-binds-root"),
    pytest.param(
        cell("import numpy as np", "from math import sqrt as root", "print(np, root(sqrt))"),
        ["sqrt"], id="import-as",
    ),
    pytest.param(
        cell("from math import *", "print(pi, tau)"),
        ["pi", "tau"], id="star-import-binds-nothing-known",
    ),
    # functions: reads happen at the call
    pytest.param(
        cell("def g():", "    return w", "g()", "w = 1"),
        ["w"], id="function-called-before-binding",
    ),
    pytest.param(cell("def g():", "    return w", "w = 1", "g()"), [], id="function-called-after-binding"),
    pytest.param(cell("def g():", "    return w", "w = 1"), [], id="function-never-called-charged-at-end"),
    pytest.param(cell("def g():", "    return w"), ["w"], id="function-never-called-name-never-bound"),
    pytest.param(
        cell("def square(x):", "    return x * x", "with Pool(2) as p:", "    r = p.map(square, range(4))"),
        ["Pool"], id="multiprocessing-function-passed",
    ),
    pytest.param(
        cell(
            "from multiprocessing import Pool",
            "def square(x):",
            "    return x * x",
            "with Pool(2) as p:",
            "    r = p.map(square, range(4))",
        ),
        [], id="multiprocessing-imported",
    ),
    pytest.param(
        cell("@cached", "def f(x: Tensor = default) -> Out:", "    return x"),
        ["cached", "default", "Tensor", "Out"], id="def-decorators-defaults-annotations",
    ),
    pytest.param(
        cell("@jit", "def f():", "    return w", "w = 1", "f()"),
        ["jit"], id="decorating-is-not-calling",
    ),
    pytest.param(
        cell("def fact(n):", "    return 1 if n < 2 else n * fact(n - 1)", "print(fact(5))"),
        [], id="recursion",
    ),
    pytest.param(
        cell(
            "def even(n):",
            "    return n == 0 or odd(n - 1)",
            "def odd(n):",
            "    return n != 0 and even(n - 1)",
            "print(even(4), base)",
        ),
        ["base"], id="mutual-recursion",
    ),
    pytest.param(
        cell(
            "def outer():",
            "    return inner()",
            "def inner():",
            "    return scale",
            "outer()",
            "scale = 2",
        ),
        ["scale"], id="transitive-call-before-binding",
    ),
    pytest.param(
        cell(
            "def outer():",
            "    return inner()",
            "def inner():",
            "    return scale",
            "scale = 2",
            "outer()",
        ),
        [], id="transitive-call-after-binding",
    ),
    pytest.param(
        cell(
            "def outer(n):",
            "    k = n",
            "    def inner():",
            "        return k + offset",
            "    for j in range(n):",
            "        pass",
            "    return inner",
            "outer(1)",
        ),
        ["offset"], id="closure-is-not-a-global-read",
    ),
    pytest.param(
        cell(
            "def load():",
            "    import json",
            "    with open(p) as fh:",
            "        data = json.load(fh)",
            "    try:",
            "        pass",
            "    except OSError as err:",
            "        print(err)",
            "    return data",
            "load()",
        ),
        ["p"], id="function-locals-from-import-with-except",
    ),
    pytest.param(
        cell(
            "def outer():",
            "    n = 0",
            "    def inc():",
            "        nonlocal n",
            "        n += 1",
            "    inc()",
            "outer()",
        ),
        [], id="nonlocal",
    ),
    pytest.param(cell("f = lambda: w", "w = 1", "f()"), [], id="named-lambda-deferred"),
    pytest.param(cell("f = lambda: w", "f()", "w = 1"), ["w"], id="named-lambda-called-early"),
    pytest.param(
        cell("ys = sorted(xs, key=lambda v: v * scale)", "scale = 2"),
        ["xs", "scale"], id="lambda-read-at-once",
    ),
    # global
    pytest.param(
        cell("def setup():", "    global cfg", "    cfg = 1", "setup()", "print(cfg)"),
        ["cfg"], id="global-may-bind",
    ),
    pytest.param(
        cell("def bump():", "    global n", "    n += 1", "n = 0", "bump()"),
        [], id="global-read-in-function",
    ),
    pytest.param(cell("global q", "q = 1", "print(q)"), [], id="global-at-top-level"),
    # classes
    pytest.param(
        cell("class C(Base, metaclass=Meta):", "    k = K", "    j = k"),
        ["Base", "Meta", "K"], id="class-bases-and-body",
    ),
    pytest.param(cell("class C:", "    y = x", "    x = 1"), ["x"], id="class-body-read-before-local"),
    pytest.param(
        cell("class C:", "    k = 1", "    def m(self):", "        return k", "C().m()"),
        ["k"], id="class-gives-no-closure",
    ),
    pytest.param(
        cell("class Model:", "    def run(self):", "        return cfg", "m = Model()", "cfg = 1"),
        ["cfg"], id="methods-charged-at-class-use",
    ),
    pytest.param(
        cell("class Model:", "    def run(self):", "        return cfg", "cfg = 1", "m = Model()"),
        [], id="methods-charged-late",
    ),
    pytest.param(
        cell("class C:", "    def helper():", "        return w", "    x = helper()"),
        ["w"], id="class-body-calls-its-function",
    ),
    pytest.param(
        cell("class C:", "    n = 3", "    sq = [n * i for i in range(n)]"),
        ["n"], id="class-names-hidden-from-comprehension",
    ),
    pytest.param(
        cell("class C:", "    global registry", "    registry = 1", "print(registry)"),
        [], id="class-body-global",
    ),
    # del, augmented and annotated assignment
    pytest.param(cell("del x"), ["x"], id="del-reads"),
    pytest.param(cell("x = 1", "del x", "print(x)"), [], id="del-after-bind"),
    pytest.param(cell("del cache", "print(cache)"), ["cache"], id="read-after-del-is-not-an-input"),
    pytest.param(cell("total += 1"), ["total"], id="augassign-reads"),
    pytest.param(cell("x: int", "print(x)"), ["x"], id="annotation-alone-binds-nothing"),
    pytest.param(cell("x: Ann = 0", "print(x)"), ["Ann"], id="annotated-assignment-binds"),
    # conditional binding
    pytest.param(cell("if c:", "    x = 1", "print(x)"), ["c", "x"], id="if-binds-on-one-branch"),
    pytest.param(
        cell("if c:", "    x = 1", "else:", "    x = 2", "print(x)"),
        ["c"], id="if-binds-on-both-branches",
    ),
    pytest.param(
        cell("if ok:", "    flag = True", "    print(flag)"),
        ["ok"], id="if-body-reads-own-binding",
    ),
    # match
    pytest.param(
        cell("match cmd:", "    case 'go':", "        d = 1", "    case _:", "        d = 2", "print(d)"),
        ["cmd"], id="match-wildcard",
    ),
    pytest.param(
        cell(
            "match cmd:",
            "    case 'go':",
            "        d = 1",
            "    case _ if ok:",
            "        d = 2",
            "print(d)",
        ),
        ["cmd", "ok", "d"], id="match-guarded-wildcard",
    ),
    pytest.param(
        cell("match cmd:", "    case 'go':", "        d = 1", "print(d)"),
        ["cmd", "d"], id="match-no-irrefutable-case",
    ),
    pytest.param(
        cell(
            "match pair:",
            "    case [a, b]:",
            "        s = a + b",
            "    case other:",
            "        s = other",
            "print(s, a)",
        ),
        ["pair", "a"], id="match-captures",
    ),
    pytest.param(
        cell("match p:", "    case Point(x=px):", "        print(px)"),
        ["p", "Point"], id="match-class-pattern-reads-class",
    ),
    # order and exclusions
    pytest.param(cell("y = b + a", "z = a + c"), ["b", "a", "c"], id="order-of-first-use"),
    pytest.param(cell("print(len(xs), lepton.rank)"), ["xs"], id="builtins-and-provided"),
]


@pytest.mark.parametrize("code, expected", FREE_NAME_CASES)
def test_free_names_table(code, expected):
    assert free_names(check_syntax(code)) == expected
