#!/usr/bin/env bash
# Creates .venv with Cairn and its test tools. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Cairn needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2; exit 2
fi
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install --quiet uv
fi
UV="$("$PY" -m uv --version >/dev/null 2>&1 && echo "$PY -m uv" || echo uv)"
[ -x .venv/bin/python ] || $UV venv --quiet --python "$PY" .venv
# --compile-bytecode: imports stay fast even where PYTHONDONTWRITEBYTECODE is set.
$UV pip install --quiet --python .venv/bin/python --compile-bytecode -e ".[${CAIRN_EXTRAS:-dev}]"
.venv/bin/python -m compileall -q src >/dev/null
# Azurite (the Azure Blob emulator the integration tests start) comes from npm.
if [ "${CAIRN_EXTRAS:-dev}" = "dev" ] && [ ! -x node_modules/.bin/azurite-blob ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is needed for the test services (Azurite): install Node.js" >&2; exit 2; }
  npm install --no-audit --no-fund --silent
fi
