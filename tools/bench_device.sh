#!/usr/bin/env bash
# The one accelerator check: every benchmark a device session reports, as JSON lines in $OUT, in under 8 minutes (the step limits add up to 470 s).
#
# Run on the lent machine from the repository root (its python3 has jax, flax, optax, orbax, torch; not grain):
#   here, once:  echo /.whl/ >> .git/info/exclude; echo /.bench/ >> .git/info/exclude
#                mkdir -p .bench && cp ../shared/bench/plain_jax_llama.py .bench/   # ../shared does not travel
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux2014_x86_64 -d .whl grain==<the pinned version> array-record <its pin>
#   device run:  bash tools/bench_device.sh          (carry: .whl .bench; timeout_s 560)
# Out: $OUT/bench.jsonl (one line per measurement, each with "bench"), $OUT/card.txt, $OUT/bench.log.
# A failing step is logged and the next one runs; each step has its own time limit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/bench_device}
PY=${PYTHON:-python3}
CONFIG=${BENCH_CONFIG:-configs/ar+nar-llama-8.yaml}
QUICK=${BENCH_QUICK:-0}  # 1: tiny shapes, to check this script on a CPU (BENCH_CONFIG=configs/tiny.yaml)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c 'import jax; print(jax.__version__, jax.devices())'; } >"$OUT/card.txt" 2>&1

# step NAME SECONDS COMMAND...: its JSON lines go to bench.jsonl tagged {"bench": NAME}, the rest to bench.log
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" >>"$OUT/bench.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>>"$OUT/bench.log" | tee -a "$OUT/bench.log" \
    | $PY -c 'import json,sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        try: print(json.dumps({"bench": sys.argv[1], **json.loads(line)}), flush=True)
        except ValueError: pass' "$name" >>"$OUT/bench.jsonl"
  echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" >>"$OUT/bench.log"
}

if [ "$QUICK" = 1 ]; then
  TRAIN=(--batch 2 --length 128 --steps 2 --warmup 1 --matmul-n 256); SYNTH=(--batch 1 2 --steps 16 --chunk 8)
  PLAIN=(); JOB=(--job 4 --job-slots 2 --steps 16 --chunk 8 --batch 1); FWD=(--batch 2 --length 128 --iters 2)
else
  TRAIN=(--batch 16 --length 1080 --steps 10 --warmup 3 --matmul-n 8192 --peak h200-measured)
  SYNTH=(--batch 1 8 64 256 --steps 450); PLAIN=(--full); JOB=(--job 128 --job-slots 64 --batch 1)
  FWD=(--batch 16 --length 1080 --iters 10)
fi

# the plain hand-written JAX Llama of the released shape, the bar we must meet on this same device
PLAIN_PY=../shared/bench/plain_jax_llama.py; [ -f "$PLAIN_PY" ] || PLAIN_PY=.bench/plain_jax_llama.py
step plain_jax_llama 60 $PY "$PLAIN_PY" "${PLAIN[@]}"
# training: fused attention (auto), a bigger batch, and the XLA path with attention dropout
step train_auto 75 $PY tools/bench_train.py --config "$CONFIG" --dtype bfloat16 --attention auto "${TRAIN[@]}"
step train_auto_b32 60 $PY tools/bench_train.py --config "$CONFIG" --dtype bfloat16 --attention auto "${TRAIN[@]}" --batch 32
step train_xla_dropout 60 $PY tools/bench_train.py --config "$CONFIG" --dtype bfloat16 --attention xla "${TRAIN[@]}" \
  model.attention_dropout=0.1
# the teacher-forced forward alone (inference attention path)
step forward 30 $PY tools/bench_forward.py --config "$CONFIG" --dtype bfloat16 --attention auto "${FWD[@]}"
# synthesis: cached decode by batch (greedy and the CLI sampler) with the NAR, the full-recompute loop, the job
step synth_ar 85 $PY tools/bench_synth.py --config "$CONFIG" --dtype bfloat16 "${SYNTH[@]}" --sampler greedy cli
step synth_full 40 $PY tools/bench_synth.py --config "$CONFIG" --dtype bfloat16 --batch 1 --steps 150 --no-nar --compare-full
step synth_job 60 $PY tools/bench_synth.py --config "$CONFIG" --dtype bfloat16 "${JOB[@]}" --job-sampler cli
echo "done: $(wc -l <"$OUT/bench.jsonl") JSON lines in $OUT/bench.jsonl" | tee -a "$OUT/bench.log"
