"""Accelerated sampling from a plain script: the same calls the ComfyUI adapter makes
(run.begin, run.dispatch per model call, run.end_call, run.end even after an error), around
turbo_core.diffusion's Euler sampler."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..diffusion import EDM, sample_euler
from .run import Turbo4DRun
from .registry import build_run
from .stats import RunStats


def sample_accelerated(net, edm: EDM, specs: Sequence, noise: torch.Tensor, sigmas: torch.Tensor,
                       cond: torch.Tensor, camera: torch.Tensor, views: int, frames: int, *,
                       callback: Optional[Callable] = None, backend="short-axis", stream: str = "default",
                       run: Optional[Turbo4DRun] = None, frame_index=None) -> tuple[torch.Tensor, RunStats]:
    """Euler-samples a V x F grid with the accelerators of `specs` (or a prebuilt `run`).

    noise, cond: (N, C, H, W) stacked frame-major; camera: (N, 2). Returns (x, RunStats). Specs
    build a fresh run per call, so two calls share nothing. Peak memory is the CUDA allocator's
    peak since its last reset (callers reset it to measure one run)."""
    run = run if run is not None else build_run(specs, backend=backend)
    layout = net.token_layout(noise.shape[0], views, frames)
    cost = net.cost(layout)
    dtype = next(net.parameters()).dtype
    device = noise.device
    schedule = [float(s) for s in sigmas]

    def call(x, sigma):
        d = run.dispatch(layout, sigma, schedule, stream, dtype, device, net.depth, cost)
        space = edm.output_space(x, sigma)

        def network(inp, *args, **kwargs):
            return run.model_call(d, inp, lambda: net(inp, *args, **kwargs), space)

        out = edm.denoise(network, x, sigma, cond, camera, views, frames, dispatch=d, frame_index=frame_index)
        run.end_call(d)
        return out

    def denoise(x, sigma, i):
        # Whole steps are decided here, ahead of the preconditioning, as the ComfyUI adapter does.
        return run.step(x, sigma, schedule, lambda: call(x, sigma), edm.sigma_data)

    run.begin()
    peak = None
    try:
        x = sample_euler(denoise, noise, sigmas, callback=callback)
    finally:
        if device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(device))
        stats = run.end(peak)
    return x, stats

