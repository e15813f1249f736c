#!/bin/bash
# tr19: token reuse planning sweep, one H200 GPU, the four runs one after another.
export PYTHONUNBUFFERED=1
R=full,token-reuse-balanced,token-reuse-fast,token-reuse-t0.25-w0,token-reuse-t0.4-w0,token-reuse-t0.3,token-reuse-t0.35,token-reuse-t0.25-h0,token-reuse-t0.3-h0,token-reuse-t0.25-b8-k0.125,token-reuse-t0.25-b8-k0.125-h0,token-reuse-t0.3-b8-k0.125-h0,token-reuse-t0.2-b8-k0.125-h0,token-reuse-t0.25-a3
nvidia-smi --query-gpu=name,memory.total --format=csv
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 150 python -m bench.bench_accel --device cuda --large --steps 50 --repeats 1 --no-plot --only $R --out $OUT/l50 2>&1 | tee $OUT/large.log
timeout 30 python -m bench.bench_accel --device cuda --scenes 16 --steps 6 --no-plot --only $R --out $OUT/e6 2>&1 | tee $OUT/emb.log
timeout 100 python -m bench.bench_accel --device cuda --scenes 16 --steps 50 --no-plot --only $R --out $OUT/e50 2>&1 | tee -a $OUT/emb.log
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 60 python -m bench.bench_accel --device cuda --large --steps 6 --repeats 2 --no-plot --only $R --out $OUT/l6 2>&1 | tee -a $OUT/large.log
