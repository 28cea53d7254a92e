#!/usr/bin/env bash
# Install the ray extra (pyproject.toml: lepton-magic[ray]) for tests/test_ray.py, the Ray tutorial
# and benchmarks/ray.py; without it they skip, saying why. Idempotent: an importable ray is kept.
# The extra's requirements are read from pyproject.toml and installed directly, so the editable
# install (and its sidebar build) is not redone; torch stays at its pin.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import ray, ray.util.placement_group" 2>/dev/null; then
    echo "ci_ray_deps: ray $(python3 -c 'import ray; print(ray.__version__)') already installed"
    exit 0
fi
mapfile -t wanted < <(python3 - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["ray"]))
PY
)
t=$(date +%s)
# This machine's pip config names local indexes that lack some packages: drop that noise.
python3 -m pip install -q "${wanted[@]}" "torch==2.13.0" \
    2> >(grep -v "is ignored: it is neither" >&2 || true)
echo "ci_ray_deps: ${wanted[*]} installed in $(( $(date +%s) - t )) s"
