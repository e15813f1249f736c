"""Sampling a V x F grid on one process or split over a group, from a plain script: the calls the
ComfyUI adapter makes (run.begin, run.step per sampler step, run.dispatch / model_call / end_call
per model call, run.end even after an error), with classifier-free guidance batched the way
ComfyUI batches it (conditional and unconditional halves in one call of batch 2), so "cfg" splits
exactly what it splits under ComfyUI."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..accel.registry import build_run
from ..accel.stats import RunStats
from ..diffusion import EDM, sample_euler
from .engine import ParallelError, ParallelGroup
from .net import ParallelNet, begin_run, end_run


def sample_grid(net, edm: EDM, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                camera: torch.Tensor, views: int, frames: int, *, specs: Sequence = (), cfg: float = 1.0,
                group: Optional[ParallelGroup] = None, mode: str = "auto", callback: Optional[Callable] = None,
                backend: str = "short-axis", frame_index: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, RunStats]:
    """Euler-samples one grid (noise, cond: (F*V, C, H, W) frame-major; camera (F*V, 2)) with the
    accelerators of `specs`. cfg > 1 guides against the same cameras without the reference (cond
    zeroed), both halves in one call. With `group` (rank 0 of a ParallelGroup) every call is split
    over its processes in `mode`; RunStats then holds every rank's work and `stats.parallel` the
    split's own figures. Returns (x, RunStats)."""
    guided = cfg != 1.0
    model = net if group is None else ParallelNet(net, group, mode)
    run = build_run(specs, backend=backend)
    n = noise.shape[0]
    batch = 2 if guided else 1
    layout = net.token_layout(batch * n, views, frames)
    cost = net.cost(layout)
    dtype = next(net.parameters()).dtype
    device = noise.device
    schedule = [float(s) for s in sigmas]
    cond_in = torch.cat([cond, torch.zeros_like(cond)]) if guided else cond
    camera_in = camera.repeat(batch, 1)
    index_in = None if frame_index is None else frame_index.repeat(batch)
    stream = "(0, 1)" if guided else "(0,)"

    def call(x, sigma):
        d = run.dispatch(layout, sigma, schedule, stream, dtype, device, net.depth, cost)
        x_in = torch.cat([x, x]) if guided else x
        space = edm.output_space(x_in, sigma)

        def network(inp, *args, **kwargs):
            return run.model_call(d, inp, lambda: model(inp, *args, **kwargs), space)

        out = edm.denoise(network, x_in, sigma, cond_in, camera_in, views, frames, dispatch=d, frame_index=index_in)
        run.end_call(d)
        if not guided:
            return out
        c, u = out.chunk(2)
        return u + cfg * (c - u)

    def denoise(x, sigma, i):
        return run.step(x, sigma, schedule, lambda: call(x, sigma), edm.sigma_data)

    run.begin()
    if group is not None:
        begin_run(group, specs, backend)
    peak = None
    failed = True
    try:
        x = sample_euler(denoise, noise, sigmas, callback=callback)
        failed = False
    finally:
        if device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(device))
        stats = run.end(peak)
        if group is not None and group.alive:
            try:
                end_run(group, stats)
            except ParallelError:
                if not failed:
                    raise
                # The run's own error is the one to report; the group is down and restarts next run.
    return x, stats
