#!/usr/bin/env bash
# Install what the browser tests (tests/browser, marker `browser`) need on a fresh Debian machine,
# as root: Debian's chromium and the Python packages jupyterlab and playwright.
# Idempotent: each part is skipped when it is already there. Prints what it does and how long
# each part took.
#
# Never runs `playwright install`: the tests drive Debian's chromium through
# executable_path=shutil.which("chromium"); Playwright's own browser builds cannot be downloaded here.
set -euo pipefail

PY="${PYTHON:-python3}"
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

if command -v chromium >/dev/null 2>&1; then
    echo "ci_browser_deps: chromium already installed: $(chromium --version 2>/dev/null || echo '?')"
else
    if [ "$(id -u)" != 0 ]; then
        echo "ci_browser_deps: chromium is missing and this is not root: run as root" >&2
        exit 1
    fi
    t=$(now)
    echo "ci_browser_deps: apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    echo "ci_browser_deps: apt-get update took $(took "$t")"
    t=$(now)
    echo "ci_browser_deps: apt-get install -y chromium"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
    echo "ci_browser_deps: chromium installed in $(took "$t"): $(chromium --version 2>/dev/null || echo '?')"
fi

missing=()
"$PY" -c "import jupyterlab" 2>/dev/null || missing+=(jupyterlab)
"$PY" -c "import playwright.sync_api" 2>/dev/null || missing+=(playwright)
if [ ${#missing[@]} -eq 0 ]; then
    echo "ci_browser_deps: jupyterlab and playwright already installed"
else
    t=$(now)
    echo "ci_browser_deps: pip install ${missing[*]}"
    # This machine's pip config names local indexes that lack some packages: drop that noise.
    "$PY" -m pip install -q "${missing[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)
    echo "ci_browser_deps: pip install took $(took "$t")"
fi
"$PY" - <<'EOF'
import importlib.metadata as m
print("ci_browser_deps: jupyterlab", m.version("jupyterlab"), "| playwright", m.version("playwright"))
EOF
