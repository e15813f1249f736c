"""Which procedural scenes serve what, and how a scene becomes the network's input.

Seed ranges keep training, evaluation, validation and the mean-image baseline apart: training draws
seeds in [0, TRAIN_SEEDS); every held-out use starts at 1_000_000, so no held-out scene is ever
trained on. The network sees cameras relative to the reference view (view 0): azimuth of view v
minus azimuth of view 0, and the absolute elevation.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .synth4d import SceneConfig, render_batch

TRAIN_SEEDS = 1_000_000          # training draws seeds in [0, TRAIN_SEEDS)
EVAL_SEED_START = 1_000_000      # evaluate.py scores scenes from here on
VAL_SEED_START = 2_000_000       # validation samples during training
MEAN_SEED_START = 3_000_000      # scenes averaged into the mean-image baseline


def relative_cameras(cameras: torch.Tensor) -> torch.Tensor:
    """(V, 2) [azimuth, elevation] -> azimuth relative to view 0 (the reference), elevation kept."""
    rel = cameras.clone()
    rel[:, 0] = cameras[:, 0] - cameras[0, 0]
    return rel


def scene_samples(seeds: Sequence[int], views: int, frames: int, size: int, device="cpu",
                  elevation_deg: float = 20.0) -> list[dict]:
    """Held-out procedural scenes as sampler inputs, one dict per seed: noise (seeded by the scene
    seed, drawn on the CPU so every device samples the same), cond (view 0's frame f for every view
    of frame f), camera (relative_cameras), ground truth, all (F*V, ...) frame-major. Use seeds >=
    EVAL_SEED_START: training never draws them."""
    cfg = SceneConfig(size=size, views=views, frames=frames, elevation_deg=elevation_deg)
    data = render_batch(list(seeds), cfg, device)
    cams = relative_cameras(data["cameras"].float())
    out = []
    for i, seed in enumerate(seeds):
        gt = data["images"][i]                                         # (F, V, 3, H, W)
        cond = gt[:, 0:1].expand(-1, views, -1, -1, -1).reshape(-1, 3, size, size)
        noise = torch.randn(frames * views, 3, size, size, generator=torch.Generator().manual_seed(int(seed)))
        out.append({"seed": int(seed), "noise": noise.to(device), "cond": cond.contiguous(),
                    "camera": cams.repeat(frames, 1), "gt": gt.reshape(-1, 3, size, size)})
    return out
