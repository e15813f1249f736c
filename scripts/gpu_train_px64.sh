#!/usr/bin/env bash
# Trains CONFIGS["px64"] (the default network at 64 x 64 px: 32 x 32 tokens per image) on ONE GPU
# (cuda:0) in one command under the 10-minute limit, then benchmarks the per-call levels on it with
# 4 held-out scenes batched per call (128 images x 1024 tokens = 131k tokens), on two GPUs side by
# side so that it fits the same command: cuda:0 the accelerators at 50 steps, cuda:1 the 6-step
# rows, then the 50-step baselines (own full-compute row: every speedup is against the full row of
# its own process), then the held-out evaluation. Files under $OUT (at most 8 come back):
#
#   log                             everything printed (the benchmarks' lines prefixed [b50], [b6], ...)
#   turbo4d_px64.safetensors        EMA weights, fp16, config and training record in the metadata
#   train_log.jsonl                 the training log (throughput, loss, the final validation)
#   b50/bench_accel.json            bench_accel rows at 50 steps (accelerators; cuda:0)
#   b50b/bench_accel.json           bench_accel rows at 50 steps (baselines; cuda:1)
#   b6/bench_accel.json             bench_accel rows at 6 steps (cuda:1)
#   (each JSON is rewritten after every row: a benchmark stopped by its time limit keeps its rows)
#   eval.json, samples_4x8.png      turbo_core.evaluate on 16 held-out scenes (cuda:1)
#
#   OUT=/somewhere bash scripts/gpu_train_px64.sh
#
# The schedule's length is set from a throughput probe at the start (steps that fit MINUTES).
# Environment: MINUTES (training process wall time), BATCH (images per step), SEED, LR, EMA,
# BENCH_SECONDS (limit of each benchmark process), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
MINUTES=${MINUTES:-5.0}
BATCH=${BATCH:-256}
SEED=${SEED:-0}
LR=${LR:-6e-4}
EMA=${EMA:-0.995}
BENCH_SECONDS=${BENCH_SECONDS:-150}
PY=${PYTHON:-python3}
RUN=runs/px64
W=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs
T0=$(date +%s)
say(){ echo "[px64 $(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

say "throughput probe, $BATCH images a step"
CUDA_VISIBLE_DEVICES=0 $PY -m turbo_core.train --bench "$BATCH" --config px64 --device cuda | tee "$W/probe.jsonl"
# the schedule ends with the time: steps that fit MINUTES less ~40 s of start, validation and save
STEPS=$($PY -c "import json,sys; s=json.loads(open('$W/probe.jsonl').read().splitlines()[-1])['s_per_step']; print(int(($MINUTES*60-40)/s))")
say "train $STEPS steps (at most $MINUTES min) on cuda:0"
CUDA_VISIBLE_DEVICES=0 $PY -m turbo_core.train --out "$RUN" --config px64 --device cuda --minutes "$MINUTES" \
    --steps "$STEPS" --batch "$BATCH" --lr "$LR" --warmup 100 --ema-decay "$EMA" --seed "$SEED" \
    --p-mean 0.0 --default-camera-prob 0.9 --val-every-min 100 --ckpt-every-min 100
cp "$RUN/log.jsonl" "$OUT/train_log.jsonl"
M="$OUT/turbo4d_px64.safetensors"
$PY -m turbo_core.train --export "$RUN" --to "$M"
say "exported"; sha256sum "$M"

ACCEL=full,block-reuse-quality,block-reuse-balanced,block-reuse-fast,block-reuse-asis,token-reuse-balanced,token-reuse-fast,per-call,bypass-quality,bypass-balanced,bypass-fast,turbo4d-quality,turbo4d-balanced,turbo4d-fast,block-reuse+step
BASE=full,fewer-steps-10,fewer-steps-7,fewer-steps-5,fewer-steps-4,fewer-steps-3,fewer-steps-2,fbcache-t0.1,fixed-chain-k2,fixed-chain-k3
B="$PY -m bench.bench_accel --device cuda --model $M --scenes 4 --no-plot"
( CUDA_VISIBLE_DEVICES=0 timeout "$BENCH_SECONDS" $B --steps 50 --only "$ACCEL" --out "$OUT/b50" 2>&1 | sed -u "s/^/[b50] /" || true ) &
(
  CUDA_VISIBLE_DEVICES=1 timeout 50 $B --steps 6 --repeats 3 --only "$ACCEL,$BASE" --out "$OUT/b6" 2>&1 | sed -u "s/^/[b6] /" || true
  CUDA_VISIBLE_DEVICES=1 timeout "$BENCH_SECONDS" $B --steps 50 --only "$BASE" --out "$OUT/b50b" 2>&1 | sed -u "s/^/[b50b] /" || true
  CUDA_VISIBLE_DEVICES=1 timeout 40 $PY -m turbo_core.evaluate --model "$M" --device cuda --scenes 16 --views 4 \
      --frames 8 --chunk 16 --out "$W/eval" 2>&1 | sed -u "s/^/[eval] /" || true
) &
wait
cp "$W/eval/eval.json" "$W/eval/samples_4x8.png" "$OUT/" 2>/dev/null || true
say "done"; ls -la "$OUT"
