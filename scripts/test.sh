#!/usr/bin/env bash
# Set up from nothing and run every test, the tutorials (nbval) included.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
# Debian's chromium for the browser tests (needs root; without it those tests skip, saying why).
bash scripts/ci_browser_deps.sh || echo "test.sh: browser dependencies not installed; browser tests will skip"
# OpenSSH's server for the ssh backend tests (same: root, or they skip).
bash scripts/ci_ssh_deps.sh || echo "test.sh: sshd not installed; ssh tests will skip"
# tmux, for the test that reads the terminal progress line off a real screen (same: root, or it skips).
bash scripts/ci_tmux_deps.sh || echo "test.sh: tmux not installed; the terminal progress test will skip"
# Node environments of the oldest and newest supported Pythons (agent dependencies only, no torch).
bash scripts/ci_node_pythons.sh || echo "test.sh: other Pythons' node environments not made; their tests will skip"
# Ray (the ray extra) for the ray backend's tests, tutorial 06 and benchmarks/ray.py (without it they skip).
bash scripts/ci_ray_deps.sh || echo "test.sh: Ray not installed; the ray backend tests will skip"
export LEPTON_HOME="${LEPTON_HOME:-$(mktemp -d)}"
python3 -m pytest -q "$@"
