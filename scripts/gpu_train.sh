#!/usr/bin/env bash
# Trains the embedded default model (models/turbo4d_default.safetensors) on one GPU, in chunks
# that each fit a 10-minute command limit, and puts what must come back under $OUT (at most 8
# files, each under 16 MiB): the fp16 weights, the resumable state in 16 bits (`train --compact`: at
# most 4 shards of < 15 MiB, small enough to carry to the next machine), the log,
# SHA256SUMS of the weights and state (check with `sha256sum -c` where they land), and with EVAL=1
# the GPU evaluation and sampler sweep as JSON.
#
#   OUT=/somewhere bash scripts/gpu_train.sh                    # chunk 1: a fresh run
#   OUT=/somewhere RESUME=1 EVAL=1 bash scripts/gpu_train.sh    # chunk 2: resumes runs/$RUN
#   BENCH=512,1024,2048 OUT=/somewhere bash scripts/gpu_train.sh   # throughput probe only
#   EVAL_ONLY=1 OUT=/somewhere bash scripts/gpu_train.sh        # GPU eval + sampler sweep of models/turbo4d_default
#
# For chunk 2 on a new machine, copy chunk 1's state*.safetensors into runs/$RUN/ first and carry
# runs/$RUN (they are what came back); on the same machine still warm, carry nothing: the full
# state of the last chunk is still in runs/$RUN there.
# Environment: RUN (run name), CONFIG (model config of a fresh run), MINUTES (wall time of the training process; it saves before),
# BATCH (images per step), STEPS (length of the cosine schedule), LR, EXTRA, EVAL_SCENES, SWEEP_SCENES,
# EVAL_SECONDS, SWEEP_SECONDS (time limits of the two evaluations), PYTHON.
# Time: MINUTES*60 + ~25 s (start, export) + EVAL_SECONDS + SWEEP_SECONDS must stay under the command limit.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
RUN=${RUN:-turbo4d_default}
CONFIG=${CONFIG:-default}
MINUTES=${MINUTES:-8.3}
BATCH=${BATCH:-1024}
STEPS=${STEPS:-12000}
LR=${LR:-6e-4}
EVAL_SCENES=${EVAL_SCENES:-32}
SWEEP_SCENES=${SWEEP_SCENES:-16}
EVAL_SECONDS=${EVAL_SECONDS:-60}
SWEEP_SECONDS=${SWEEP_SECONDS:-90}
EXTRA=${EXTRA:-}   # more train flags, e.g. "--p-mean 0.0 --default-camera-prob 0.9" (on resume: a recorded change)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs
T0=$(date +%s)
say(){ echo "[gpu_train $(( $(date +%s) - T0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, safetensors, numpy, cv2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"

if [ -n "${BENCH:-}" ]; then
  $PY -m turbo_core.train --bench "$BENCH" --config "$CONFIG" --device cuda | tee "$OUT/bench.jsonl"
  exit 0
fi

evaluate(){
  # bounded, so the whole command ends inside its limit; sweep rows stream into $OUT as they finish
  E=$(mktemp -d)
  say "evaluate on $EVAL_SCENES held-out scenes (at most ${EVAL_SECONDS}s), then sweep on $SWEEP_SCENES (at most ${SWEEP_SECONDS}s)"
  timeout "$EVAL_SECONDS" $PY -m turbo_core.evaluate --model "$1" --device cuda --bf16 \
      --scenes "$EVAL_SCENES" --views 4 --frames 8 --also 3x6 --also 6x12 --steps 20 --chunk 32 --out "$E" || true
  timeout "$SWEEP_SECONDS" $PY -m turbo_core.evaluate --model "$1" --device cuda --bf16 \
      --scenes "$SWEEP_SCENES" --views 4 --frames 8 --sweep-steps 4,8,12,20,30 --sweep-cfg 1.0,1.5,2.0 \
      --sweep-samplers euler,heun --chunk 32 --out "$E" | tee "$OUT/gpu_sweep.jsonl" || true
  cp "$E/eval.json" "$OUT/gpu_eval.json" 2>/dev/null || true
  cp "$E/sweep.json" "$OUT/gpu_sweep.json" 2>/dev/null || true
}

if [ "${EVAL_ONLY:-0}" = 1 ]; then  # no training: score the committed model
  evaluate models/turbo4d_default.safetensors; say "done"; ls -la "$OUT"; exit 0
fi

# whatever happens, bring the log and the latest saved state back
# with their sha256 sums (SHA256SUMS), so a file that comes back truncated is caught before a resume
bring_back(){
  cp -f runs/"$RUN"/log.jsonl "$OUT/" 2>/dev/null || true
  $PY -m turbo_core.train --compact runs/"$RUN" --to "$OUT" >/dev/null || true
  (cd "$OUT" && sha256sum state*.safetensors turbo4d_default.safetensors > SHA256SUMS 2>/dev/null) || true
}
trap bring_back EXIT

ARGS=(--out "runs/$RUN" --device cuda --minutes "$MINUTES" --steps "$STEPS" $EXTRA)
if [ "${RESUME:-0}" = 1 ]; then
  [ -f "runs/$RUN/state.safetensors" ] || { echo "RESUME=1 but runs/$RUN/state.safetensors is missing: carry runs/$RUN"; exit 2; }
  ARGS+=(--resume)
else
  rm -rf "runs/$RUN"
  ARGS+=(--config "$CONFIG" --batch "$BATCH" --lr "$LR")
fi
say "train ${ARGS[*]}"
$PY -m turbo_core.train "${ARGS[@]}"
say "export"
$PY -m turbo_core.train --export "runs/$RUN" --to "$OUT/turbo4d_default.safetensors"

if [ "${EVAL:-0}" = 1 ]; then evaluate "$OUT/turbo4d_default.safetensors"; fi
say "done"; ls -la "$OUT"
