#!/usr/bin/env bash
# Set everything up (idempotent, with Chromium for the browser tests) and run the whole test suite:
# fast unit tests and the slow end-to-end ones (real vLLM, real NeMo Gym, real browser).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
