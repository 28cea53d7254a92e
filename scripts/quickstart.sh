#!/usr/bin/env bash
# Set up from nothing and run the main job: the quickstart tutorial, headless, on the local backend.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
python3 scripts/run_notebook.py notebooks/01-quickstart.ipynb
