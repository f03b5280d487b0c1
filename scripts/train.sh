#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python trainer.py "${1:-config.yaml}" "${@:2}"
