#!/usr/bin/env bash
# Install tmux for the terminal test of the text progress (tests/test_progress.py runs terminal
# IPython in a detached tmux pane and reads the screen back). Idempotent; needs root for apt.
set -euo pipefail
if command -v tmux >/dev/null 2>&1; then
    echo "ci_tmux_deps: tmux already installed ($(tmux -V))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ci_tmux_deps: tmux is missing and this is not root: run as root" >&2
    exit 1
fi
t=$(date +%s)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tmux >/dev/null \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tmux >/dev/null; }
echo "ci_tmux_deps: tmux installed in $(( $(date +%s) - t )) s"
