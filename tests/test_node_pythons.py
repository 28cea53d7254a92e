"""The node side on the oldest and newest supported Pythons (3.10, 3.13): the agent, a rank, the
protocol and the settings parser, for real, in environments scripts/ci_node_pythons.sh makes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(os.environ.get("LEPTON_NODE_PYTHONS")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lepton-magic" / "node-pythons")


@pytest.mark.parametrize("minor", ["3.10", "3.13"])
def test_a_node_runs_a_cell_under_another_python(minor, tmp_path):
    """Regression (3.10): config.py imported tomllib (3.11+), so the kernel side and every node
    agent failed at import on the oldest Python the package claims."""
    python = VENVS / minor / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no Python {minor} node environment at {python} (scripts/ci_node_pythons.sh makes it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), LEPTON_HOME=str(tmp_path))
    done = subprocess.run([str(python), str(ROOT / "tests" / "node_smoke.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["kind"] == "result", out.get("error")
    assert out["python"] == [int(p) for p in minor.split(".")]
    assert out["agent_python"].startswith(minor)
    assert out["outputs"] == {"z": 42, "version": out["python"]}
    assert f"hello from {out['python']}" in out["log"]
