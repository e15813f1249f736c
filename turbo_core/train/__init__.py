"""Trains the shipped SCM networks (configs default and px64) as EDM's F_theta on procedural 4D scenes.

    python -m turbo_core.train --out runs/NAME [--config default|px64] [--steps N] [--minutes M]
                               [--batch IMAGES] [--device cuda|cpu] [--resume] [--compile]
    python -m turbo_core.train --export runs/NAME --to models/turbo4d_default.safetensors
    python -m turbo_core.train --out runs/NEW --init-from models/turbo4d_px64.safetensors --steps N
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m turbo_core.train --out ... (data-parallel)

Every step renders fresh scenes on the training device (`data.synth4d.render_batch`) from seeds
drawn in [0, 1_000_000); held-out seeds (evaluation, validation, the mean-image baseline) start at
1_000_000 and are never drawn here. A sample is one scene of V views x F frames, stacked
frame-major; each image is conditioned on the reference view's (view 0's) frame of the same
time, and the reference view is itself among the views to generate, with its input as target.
The net sees cameras relative to the reference: azimuth of view v minus azimuth of view 0, and
the absolute elevation. V and F change from step to step so one set of weights serves several
grids. 10% of scenes get a zeroed reference video, the negative condition of classifier-free
guidance.

All randomness of step k comes from generators seeded with (seed, k), so `--resume` repeats the
uninterrupted run exactly; `--init-from` continues exported weights in a new run (their step
count on, AdamW's moments fresh, warm-up and cosine restarted); under torchrun every process renders
scenes of its own (keys per rank) and the gradients are averaged each step. The resumable state is
safetensors only (model, EMA, AdamW moments
under parameter names, counters and configs as JSON metadata), split into shards of at most
15 MiB so each file fits where files are size-limited.

Modules by concern: config (TrainConfig), batches (a step's scenes), attention (the fastest
attention per sequence length), loop (Trainer, validation, `train`), shards (the resumable state
files), export (the embedded weights), cli (`python -m turbo_core.train`).
"""
