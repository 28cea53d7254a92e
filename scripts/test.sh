#!/usr/bin/env bash
# Set up from nothing and run every test, the tutorials (nbval) included.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
export LEPTON_HOME="${LEPTON_HOME:-$(mktemp -d)}"
python3 -m pytest -q "$@"
