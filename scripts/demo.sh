#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/power-retention demo "$@"
