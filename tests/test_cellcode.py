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
