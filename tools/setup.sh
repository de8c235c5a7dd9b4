#!/usr/bin/env bash
# Set up a fresh machine: Debian packages, a virtualenv at .venv with the pinned stack, the package itself.
# Idempotent: a second run only checks. Needs root (or sudo) for apt-get the first time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[setup] installing espeak-ng (Debian package)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.valle_jax-requirements
want=$(cat requirements.txt tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements (torch pinned to the CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps descript-audio-codec==1.0.0 descript-audiotools==0.7.2
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/tmp/valle_jax-install.log 2>&1 \
    || { cat /tmp/valle_jax-install.log; exit 1; }  # setuptools is chatty about editable installs
  echo "$want" > "$stamp"
fi
.venv/bin/python -m valle_jax.codec.torchaudio_fix >/dev/null  # every time: a reinstall restores the CUDA-linked files
.venv/bin/python -c "import encodec, vocos, dac" || { echo "[setup] codec packages do not import"; exit 1; }
.venv/bin/python -c "import jax, flax, torch, valle_jax; print(f'[setup] ok: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}')"
