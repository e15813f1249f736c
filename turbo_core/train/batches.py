"""The training batch of a step: fresh procedural scenes, a function of (seed, step) alone."""
from __future__ import annotations

import torch

from ..data.scenes import TRAIN_SEEDS, relative_cameras
from ..data.synth4d import SceneConfig, render_batch
from ..diffusion import EDM
from ..models.scm_net import SCMNetConfig
from .config import TrainConfig, grid_choices


def _step_generators(tcfg: TrainConfig, step: int, device, rank: int = 0):
    # rank r > 0 of a data-parallel run draws from keys of its own, r * 0x6A09E667 apart (inside
    # the 32 bits that seed the CPU generator), so the processes train on different scenes; rank 0
    # keeps the single-process keys
    key = (tcfg.seed * 1_000_003 + step + rank * 0x6A09E667) & 0x7FFF_FFFF_FFFF
    g = torch.Generator().manual_seed(key)
    gd = torch.Generator(device=device).manual_seed(key ^ 0x5DEECE66D)
    return g, gd


def make_batch(step: int, tcfg: TrainConfig, mcfg: SCMNetConfig, device, edm: EDM = EDM(), rank: int = 0) -> dict:
    """The training batch of `step` (on process `rank` of a data-parallel run): a function of
    (seed, step, rank) alone."""
    device = torch.device(device)
    g, gd = _step_generators(tcfg, step, device, rank)
    views, frames = grid_choices(tcfg, mcfg)
    V = views[int(torch.randint(len(views), (1,), generator=g))]
    F = frames[int(torch.randint(len(frames), (1,), generator=g))]
    S = max(1, tcfg.images_per_step // (V * F))
    seeds = torch.randint(0, TRAIN_SEEDS, (S,), generator=g).tolist()
    u = torch.rand(5, generator=g).tolist()
    if u[0] < tcfg.default_camera_prob:
        scene = SceneConfig(size=mcfg.image_size, views=V, frames=F)
    else:
        lo, hi = tcfg.elevation_range
        span = 360.0 if u[3] < 0.5 else 90.0 + 270.0 * u[4]
        scene = SceneConfig(size=mcfg.image_size, views=V, frames=F, elevation_deg=lo + (hi - lo) * u[1],
                            azimuth_start_deg=360.0 * u[2], azimuth_span_deg=span)
    data = render_batch(seeds, scene, device)
    images = data["images"]                                   # (S, F, V, 3, H, W)
    H = images.shape[-1]
    x = images.reshape(-1, 3, H, H)
    cond = images[:, :, 0:1].expand(-1, -1, V, -1, -1, -1)
    keep = (torch.rand(S, generator=g) >= tcfg.cond_dropout).float().to(device)
    cond = (cond * keep.view(S, 1, 1, 1, 1, 1)).reshape(-1, 3, H, H)
    camera = relative_cameras(data["cameras"]).repeat(S * F, 1)  # frame-major: image i is view i % V
    sigma = edm.sample_sigma(S, generator=g).to(device).repeat_interleave(F * V)
    noise = torch.randn(x.shape, device=device, generator=gd)
    return {"x": x, "cond": cond, "camera": camera, "sigma": sigma, "noise": noise, "views": V,
            "frames": F, "scenes": S, "seeds": seeds}
