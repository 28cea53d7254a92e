#!/usr/bin/env bash
# Install OpenSSH's server for the ssh backend's tests (they start their own sshd on 127.0.0.1).
# Idempotent; needs root for apt. Debian's policy keeps the packaged service from starting.
set -euo pipefail
if command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; then
    echo "ci_ssh_deps: sshd already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ci_ssh_deps: sshd is missing and this is not root: run as root" >&2
    exit 1
fi
t=$(date +%s)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server >/dev/null \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server >/dev/null; }
echo "ci_ssh_deps: openssh-server installed in $(( $(date +%s) - t )) s"
