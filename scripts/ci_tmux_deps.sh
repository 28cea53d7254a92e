#!/usr/bin/env bash
# Install tmux for the terminal test of the text progress (tests/test_progress.py runs terminal
# IPython in a detached tmux pane and reads the screen back). Idempotent; needs root for apt.
set -euo pipefail
if command -v tmux >/dev/null 2>&1; then
    echo "ci_tmux_deps: tmux already installed ($(tmux -V))"
    exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" ci_tmux_deps tmux
