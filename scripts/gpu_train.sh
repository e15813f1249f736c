#!/usr/bin/env bash
# Trains one of the shipped networks on the GPUs of one host, in chunks that each fit a 10-minute
# command limit, and puts what must come back under $OUT (at most 8 files, each under 16 MiB):
#   CONFIG=default  the embedded model (models/turbo4d_default.safetensors)
#   CONFIG=px64     the 64 px benchmark network, 32 x 32 tokens per image (models/turbo4d_px64.safetensors)
# What comes back: the fp16 weights ($OUT/turbo4d_$CONFIG.safetensors, exported before anything
# else runs), the training log (log.jsonl), with COMPACT=1 the resumable state in 16 bits (`train
# --compact`: at most 4 shards of < 15 MiB, small enough to carry to the next machine), SHA256SUMS
# of the weights and state (check with `sha256sum -c` where they land), with EVAL=1 the GPU
# evaluation (and for the default the sampler sweep) as JSON, with ACCEL_BENCH=1 the accelerator
# rows of bench_accel on the new weights (b50/, b6/, each JSON rewritten after every row).
#
#   OUT=/somewhere bash scripts/gpu_train.sh                    # chunk 1: a fresh run of the default
#   OUT=/somewhere RESUME=1 EVAL=1 bash scripts/gpu_train.sh    # chunk 2: resumes runs/$RUN
#   BENCH=512,1024,2048 OUT=/somewhere bash scripts/gpu_train.sh   # throughput probe only
#   EVAL_ONLY=1 OUT=/somewhere bash scripts/gpu_train.sh        # GPU eval + sampler sweep of models/turbo4d_$CONFIG
#   CONFIG=px64 OUT=/somewhere bash scripts/gpu_train.sh        # px64 from scratch, then its benchmarks
#   CONFIG=px64 RESUME=1 OUT=/somewhere bash scripts/gpu_train.sh   # px64 continued from the shipped weights
#
# RESUME=1 continues runs/$RUN where its state is (carry it, or the state*.safetensors that came
# back, copied into runs/$RUN/); where there is none it warm-starts from the shipped weights
# models/turbo4d_$CONFIG.safetensors (INIT=another.safetensors to pick others): their step count
# and training time continue, AdamW's moments start fresh, warm-up and cosine restart over STEPS
# more steps. Weights and state are read through safetensors only.
# With NGPU > 1 (default: every visible GPU) the training runs data-parallel under torchrun: each
# GPU renders and trains on BATCH images of its own per step, gradients averaged (NCCL); the
# benchmarks then run side by side on cuda:0 and cuda:1.
# Environment: CONFIG, RUN (run name), MINUTES (wall time of the training process; it saves before),
# BATCH (images per step per GPU), STEPS (length of the cosine schedule, or `auto`: the steps that
# fit MINUTES, from a throughput probe), LR, SEED, EXTRA (more train flags; on resume a recorded
# change), NGPU, COMPACT, EVAL, EVAL_SCENES, EVAL_FLAGS, EVAL_PNG, SWEEP_SCENES, EVAL_SECONDS,
# SWEEP_SECONDS (0: no sweep), ACCEL_BENCH, ROWS50, ROWS6 (bench_accel rows), BENCH_SECONDS, PYTHON.
# Time: MINUTES*60 + ~25 s (start, export) + the evaluations' and benchmarks' limits must stay
# under the command limit.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
CONFIG=${CONFIG:-default}
case "$CONFIG" in
  default)  # the embedded model's recipe (MODEL_CARD.md)
    D_MINUTES=8.3 D_BATCH=1024 D_STEPS=12000 D_EXTRA="" D_COMPACT=1 D_EVAL=0 D_ACCEL=0
    D_EVAL_SCENES=32 D_EVAL_FLAGS="--bf16 --also 3x6 --also 6x12 --steps 20 --chunk 32" D_EVAL_PNG=0
    D_EVAL_SECONDS=60 D_SWEEP_SECONDS=90 ;;
  px64)     # the benchmark network's (MODEL_CARD.md, "Second network: 64 px")
    D_MINUTES=5.0 D_BATCH=256 D_STEPS=auto D_COMPACT=0 D_EVAL=1 D_ACCEL=1
    D_EXTRA="--warmup 100 --ema-decay 0.995 --p-mean 0.0 --default-camera-prob 0.9 --val-every-min 100 --ckpt-every-min 100"
    D_EVAL_SCENES=16 D_EVAL_FLAGS="--chunk 16" D_EVAL_PNG=1 D_EVAL_SECONDS=40 D_SWEEP_SECONDS=0 ;;
  *) echo "CONFIG=$CONFIG: this script trains CONFIG=default or CONFIG=px64"; exit 2 ;;
esac
RUN=${RUN:-turbo4d_$CONFIG}
MINUTES=${MINUTES:-$D_MINUTES}
BATCH=${BATCH:-$D_BATCH}
STEPS=${STEPS:-$D_STEPS}
LR=${LR:-6e-4}
SEED=${SEED:-0}
EXTRA=${EXTRA-$D_EXTRA}   # e.g. "--p-mean 0.0 --default-camera-prob 0.9" (on resume: a recorded change)
COMPACT=${COMPACT:-$D_COMPACT}
EVAL=${EVAL:-$D_EVAL}
ACCEL_BENCH=${ACCEL_BENCH:-$D_ACCEL}
EVAL_SCENES=${EVAL_SCENES:-$D_EVAL_SCENES}
EVAL_FLAGS=${EVAL_FLAGS-$D_EVAL_FLAGS}
EVAL_PNG=${EVAL_PNG:-$D_EVAL_PNG}
SWEEP_SCENES=${SWEEP_SCENES:-16}
EVAL_SECONDS=${EVAL_SECONDS:-$D_EVAL_SECONDS}
SWEEP_SECONDS=${SWEEP_SECONDS:-$D_SWEEP_SECONDS}
BENCH_SECONDS=${BENCH_SECONDS:-150}
ROWS50=${ROWS50:-full,block-reuse-quality,block-reuse-balanced,block-reuse-fast,block-reuse-asis,token-reuse-balanced,token-reuse-fast,per-call,bypass-quality,bypass-balanced,bypass-fast,turbo4d-quality,turbo4d-balanced,turbo4d-fast,block-reuse+step,fewer-steps-10,fewer-steps-7,fewer-steps-5,fewer-steps-4,fewer-steps-3,fewer-steps-2,fbcache-t0.1,fixed-chain-k2,fixed-chain-k3}
ROWS6=${ROWS6:-$ROWS50}
PY=${PYTHON:-python3}
NAME=turbo4d_$CONFIG.safetensors
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs
T0=$(date +%s)
say(){ echo "[gpu_train $CONFIG $(( $(date +%s) - T0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, safetensors, numpy, cv2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
NGPU=${NGPU:-$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")}

if [ -n "${BENCH:-}" ]; then
  $PY -m turbo_core.train --bench "$BENCH" --config "$CONFIG" --device cuda | tee "$OUT/bench.jsonl"
  exit 0
fi

evaluate(){  # $1: the weights, $2: the GPU
  # bounded, so the whole command ends inside its limit; sweep rows stream into $OUT as they finish
  E=$(mktemp -d)
  say "evaluate on $EVAL_SCENES held-out scenes (at most ${EVAL_SECONDS}s), then sweep on $SWEEP_SCENES (at most ${SWEEP_SECONDS}s)"
  CUDA_VISIBLE_DEVICES=${2:-0} timeout "$EVAL_SECONDS" $PY -m turbo_core.evaluate --model "$1" --device cuda \
      --scenes "$EVAL_SCENES" --views 4 --frames 8 $EVAL_FLAGS --out "$E" || true
  if [ "$SWEEP_SECONDS" != 0 ]; then
    CUDA_VISIBLE_DEVICES=${2:-0} timeout "$SWEEP_SECONDS" $PY -m turbo_core.evaluate --model "$1" --device cuda --bf16 \
        --scenes "$SWEEP_SCENES" --views 4 --frames 8 --sweep-steps 4,8,12,20,30 --sweep-cfg 1.0,1.5,2.0 \
        --sweep-samplers euler,heun --chunk 32 --out "$E" | tee "$OUT/gpu_sweep.jsonl" || true
  fi
  cp "$E/eval.json" "$OUT/gpu_eval.json" 2>/dev/null || true
  cp "$E/sweep.json" "$OUT/gpu_sweep.json" 2>/dev/null || true
  if [ "$EVAL_PNG" = 1 ]; then cp "$E"/samples_*.png "$OUT/" 2>/dev/null || true; fi
}

accel_bench(){  # $1: the weights. bench_accel with 4 held-out scenes batched per call; every
  # process has its own full-compute row (each speedup is against the full row of its process)
  B="$PY -m bench.bench_accel --device cuda --model $1 --scenes 4 --no-plot"
  if [ "$NGPU" -gt 1 ]; then  # side by side: 50 steps on cuda:0; 6 steps, then the evaluation on cuda:1
    ( CUDA_VISIBLE_DEVICES=0 timeout "$BENCH_SECONDS" $B --steps 50 --only "$ROWS50" --out "$OUT/b50" 2>&1 | sed -u "s/^/[b50] /" || true ) &
    ( CUDA_VISIBLE_DEVICES=1 timeout "$BENCH_SECONDS" $B --steps 6 --repeats 3 --only "$ROWS6" --out "$OUT/b6" 2>&1 | sed -u "s/^/[b6] /" || true
      if [ "$EVAL" = 1 ]; then evaluate "$1" 1 2>&1 | sed -u "s/^/[eval] /"; fi ) &
    wait
  else
    CUDA_VISIBLE_DEVICES=0 timeout "$BENCH_SECONDS" $B --steps 50 --only "$ROWS50" --out "$OUT/b50" 2>&1 | sed -u "s/^/[b50] /" || true
    CUDA_VISIBLE_DEVICES=0 timeout "$BENCH_SECONDS" $B --steps 6 --repeats 3 --only "$ROWS6" --out "$OUT/b6" 2>&1 | sed -u "s/^/[b6] /" || true
    if [ "$EVAL" = 1 ]; then evaluate "$1" 0 2>&1 | sed -u "s/^/[eval] /"; fi
  fi
}

if [ "${EVAL_ONLY:-0}" = 1 ]; then  # no training: score the committed model
  evaluate "models/$NAME"; say "done"; ls -la "$OUT"; exit 0
fi

# whatever happens, bring the log (and with COMPACT=1 the latest saved state) back with the sha256
# sums (SHA256SUMS), so a file that comes back truncated is caught before a resume or a commit
bring_back(){
  cp -f runs/"$RUN"/log.jsonl "$OUT/" 2>/dev/null || true
  if [ "$COMPACT" = 1 ]; then $PY -m turbo_core.train --compact runs/"$RUN" --to "$OUT" >/dev/null || true; fi
  (cd "$OUT" && sha256sum $(ls state*.safetensors "$NAME" 2>/dev/null) > SHA256SUMS 2>/dev/null) || true
}
trap bring_back EXIT

# what to start from, checked before any GPU time is spent
INIT=${INIT:-models/$NAME}
if [ "${RESUME:-0}" = 1 ] && [ -f "runs/$RUN/state.safetensors" ]; then
  FROM=(--resume)
elif [ "${RESUME:-0}" = 1 ]; then
  [ -f "$INIT" ] || { echo "RESUME=1 but neither runs/$RUN/state.safetensors nor $INIT is here: carry runs/$RUN or set INIT"; exit 2; }
  rm -rf "runs/$RUN"
  FROM=(--init-from "$INIT" --config "$CONFIG" --batch "$BATCH" --lr "$LR" --seed "$SEED")
else
  rm -rf "runs/$RUN"
  FROM=(--config "$CONFIG" --batch "$BATCH" --lr "$LR" --seed "$SEED")
fi

if [ "$STEPS" = auto ]; then  # the schedule ends with the time: steps that fit MINUTES less ~40 s
  # of start, validation and save
  say "throughput probe, $BATCH images a step"
  P=$(mktemp)
  CUDA_VISIBLE_DEVICES=0 $PY -m turbo_core.train --bench "$BATCH" --config "$CONFIG" --device cuda | tee "$P"
  STEPS=$($PY -c "import json; s=json.loads(open('$P').read().splitlines()[-1])['s_per_step']; print(int(($MINUTES*60-40)/s))")
fi

ARGS=(--out "runs/$RUN" --device cuda --minutes "$MINUTES" --steps "$STEPS" $EXTRA "${FROM[@]}")
if [ "$NGPU" -gt 1 ]; then
  TRAIN=($PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m turbo_core.train)
else
  TRAIN=($PY -m turbo_core.train)
fi
say "train on $NGPU GPU(s): ${ARGS[*]}"
"${TRAIN[@]}" "${ARGS[@]}"
say "export"
$PY -m turbo_core.train --export "runs/$RUN" --to "$OUT/$NAME"
cp -f runs/"$RUN"/log.jsonl "$OUT/"
(cd "$OUT" && sha256sum "$NAME")

if [ "$ACCEL_BENCH" = 1 ]; then
  accel_bench "$OUT/$NAME"
elif [ "$EVAL" = 1 ]; then
  evaluate "$OUT/$NAME"
fi
say "done"; ls -la "$OUT"
