#!/usr/bin/env bash
# Install OpenSSH's server for the ssh backend's tests (they start their own sshd on 127.0.0.1).
# Idempotent; needs root for apt. Debian's policy keeps the packaged service from starting.
set -euo pipefail
if command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; then
    echo "ci_ssh_deps: sshd already installed"
    exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" ci_ssh_deps openssh-server
