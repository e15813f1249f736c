#!/bin/bash
# The merged main's headline per-call rows again, one H200 GPU, one process per configuration in
# sequence: the per-call levels' defaults alone, the step skip alone, Turbo4D balanced and the
# composition that pays on the large configuration (cb-s0.05-m-t0.35), after the reference-cycle fix.
export PYTHONUNBUFFERED=1
R=full,block-reuse-balanced,token-reuse-balanced,bypass-balanced,turbo4d-balanced,cb-s0.05-m-t0.35
nvidia-smi --query-gpu=name,memory.total --format=csv
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 170 python -m bench.bench_accel --device cuda --large --steps 50 --repeats 2 --compose-sweep --no-plot --only $R --out $OUT/l50 2>&1 | tee $OUT/large.log
timeout 40 python -m bench.bench_accel --device cuda --scenes 16 --steps 6 --repeats 2 --compose-sweep --no-plot --only $R --out $OUT/e6 2>&1 | tee $OUT/emb.log
timeout 70 python -m bench.bench_accel --device cuda --scenes 16 --steps 50 --repeats 2 --compose-sweep --no-plot --only $R --out $OUT/e50 2>&1 | tee -a $OUT/emb.log
