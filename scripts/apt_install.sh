#!/usr/bin/env bash
# apt_install.sh LABEL PACKAGE: install one Debian package as root, updating the package lists
# only when the first try fails. Used by the ci_*_deps.sh scripts once they found it missing.
set -euo pipefail
label=$1 package=$2
if [ "$(id -u)" != 0 ]; then
    echo "$label: $package is missing and this is not root: run as root" >&2
    exit 1
fi
t=$(date +%s)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$package" >/dev/null \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$package" >/dev/null; }
echo "$label: $package installed in $(( $(date +%s) - t )) s"
