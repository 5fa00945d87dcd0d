#!/usr/bin/env bash
# Sets up Cairn and runs the demo pipeline in ./cairn-demo (run it twice: the second run reuses every step).
set -euo pipefail
cd "$(dirname "$0")/.."
CAIRN_EXTRAS=demo bash scripts/setup.sh
exec .venv/bin/cairn demo "${1:-cairn-demo}"
