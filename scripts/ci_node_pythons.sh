#!/usr/bin/env bash
# Environments of the other Pythons a node may run (the oldest and newest supported), holding only
# the agent's own dependencies (no torch), for tests/test_node_pythons.py. pyenv on these machines
# has 3.10 and 3.13 beside the default 3.11; a Python that is missing is skipped, and so is its test.
# Idempotent: an environment that imports its packages already is kept.
set -euo pipefail
root="${PYENV_ROOT:-$HOME/.pyenv}"
dest="${LEPTON_NODE_PYTHONS:-${XDG_CACHE_HOME:-$HOME/.cache}/lepton-magic/node-pythons}"
mkdir -p "$dest"
for minor in 3.10 3.13; do
    python=$(ls -d "$root"/versions/"$minor".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$python" ]; then
        echo "ci_node_pythons: no Python $minor under $root; its node test will skip"
        continue
    fi
    venv="$dest/$minor"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import msgpack, cloudpickle, psutil" 2>/dev/null; then
        echo "ci_node_pythons: $venv ready"
        continue
    fi
    t=$(date +%s)
    rm -rf "$venv"
    "$python" -m venv "$venv"
    packages=(msgpack cloudpickle psutil)
    [ "$minor" = 3.10 ] && packages+=(tomli)
    # This machine's pip config names local indexes that lack some packages: drop that noise.
    "$venv/bin/python" -m pip install -q "${packages[@]}" 2> >(grep -v "is ignored: it is neither" >&2 || true)
    echo "ci_node_pythons: $venv made in $(( $(date +%s) - t )) s"
done
