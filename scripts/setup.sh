#!/usr/bin/env bash
# Create .venv (or $DCSS_VENV) and install dcss-plugin with its test extras, once per pyproject change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DCSS_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.dcss-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('dcss_plugin') is None)" 2>/dev/null; then
  echo "setup: installing dcss-plugin and dependencies into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import dcss_plugin, dcss_plugin.adapters, dcss_plugin.export" \
    || { echo "setup: install failed" >&2; exit 1; }
  touch "$stamp"
fi
