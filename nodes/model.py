"""Glue between the core SCM network and ComfyUI's model stack.

ComfyUI drives a model through `ModelPatcher -> BaseModel.apply_model -> diffusion_model(x, t, ...)`.
Here the network becomes a pixel-space EDM model:

- `PixelRGB`: a 3-channel "latent" that is the image itself in [-1, 1] (previews work as is);
- `Turbo4DModelConfig` / `Turbo4DModel`: `ModelType.EDM` with sigma_data from the network's config,
  so ComfyUI computes c_in, c_noise = log(sigma) / 4, c_skip and c_out exactly as
  `turbo_core.diffusion.EDM` does (tests/test_host_model.py checks the two agree);
- `Turbo4DDiffusionModel`: the `diffusion_model` whose `forward` goes through the DIFFUSION_MODEL
  wrapper executor like `UNetModel.forward`, so wrappers such as ComfyUI's EasyCache apply unchanged;
- `turbo4d_sample_wrapper`: the OUTER_SAMPLE wrapper that builds a fresh `Turbo4DRun` from the
  accelerator specs for every sampling run and reports its stats at the end;
- `turbo4d_step_wrapper`: the PREDICT_NOISE wrapper that lets the run stand in for whole steps.

Accelerator contract: accelerator nodes clone the MODEL and store their specs with
`turbo_core.accel.registry.merge_spec` as a list of `(name, config)` at
`model_options["transformer_options"]["turbo4d"]["accelerators"]`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base
from comfy.patcher_extension import WrappersMP

from turbo_core.accel.registry import build_run
from turbo_core.accel.stats import MemoryReport
from turbo_core.diffusion import EDM, call_sigma, per_image_sigma
from turbo_core.memory import CacheBudget, active_budget, cache_budget
from turbo_core.models.scm_net import SCMNet

log = logging.getLogger("turbo4d")

WRAPPER_KEY = "turbo4d"
OPTIONS_KEY = "turbo4d"          # transformer_options[OPTIONS_KEY]["accelerators"] = [(name, config), ...]
RUN_KEY = "turbo4d_run"          # the active Turbo4DRun during one sampling run
REPORTS_KEY = "turbo4d_reports"  # a StatsSink a node puts there to read the run's stats back
# A stand-in for the network during a run, called with the network's arguments (the Multi-GPU
# node's turbo_core.parallel.ParallelNet, which splits each call over its processes).
NET_KEY = "turbo4d_net"

# Names of the conditioning entries the MultiView nodes write and `extra_conds` reads.
COND_REFERENCE, COND_CAMERA, COND_FRAME_INDEX = "turbo4d_reference", "turbo4d_camera", "turbo4d_frame_index"
COND_VIEWS, COND_FRAMES = "turbo4d_views", "turbo4d_frames"
# Notes for the run's stats line (RunStats.notes), in transformer_options or a conditioning entry.
NOTES_KEY = "turbo4d_notes"


class PixelRGB(comfy.latent_formats.LatentFormat):
    """Pixel space: the latent is the RGB image in [-1, 1]."""

    latent_channels = 3
    latent_dimensions = 2
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class Turbo4DModelConfig(comfy.supported_models_base.BASE):
    # The network exists before the BaseModel (it comes from a safetensors file with its own
    # config), so ComfyUI must not build a UNet; Turbo4DModel attaches the adapter instead.
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = PixelRGB
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, sigma_data: float):
        super().__init__({"disable_unet_model_creation": True})
        self.sampling_settings = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": float(sigma_data)}


class ExecutorDiffusionModel(torch.nn.Module):
    """A `diffusion_model` whose `forward` goes through the DIFFUSION_MODEL wrapper executor, like
    ComfyUI's `UNetModel.forward`, so wrappers such as EasyCache apply; subclasses write `_forward`."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward,
            self,
            comfy.patcher_extension.get_all_wrappers(WrappersMP.DIFFUSION_MODEL, transformer_options),
        ).execute(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        raise NotImplementedError


def call_dispatch(transformer_options: dict, layout, timesteps, x: torch.Tensor, blocks: int,
                  cost: Optional[dict] = None, stream_tag: str = "", work: Optional[dict] = None):
    """(run, dispatch) of one model call inside a sampling run (the OUTER_SAMPLE wrapper's
    Turbo4DRun), or (None, None) outside one. The stream (whose accelerator state this call uses)
    is the CFG half (cond_or_uncond) plus `stream_tag`."""
    run = transformer_options.get(RUN_KEY)
    if run is None:
        return None, None
    sigma = call_sigma(transformer_options.get("sigmas"), timesteps)
    stream = str(tuple(transformer_options.get("cond_or_uncond") or ())) + stream_tag
    d = run.dispatch(layout, sigma, transformer_options.get("sample_sigmas"), stream=stream, dtype=x.dtype,
                     device=x.device, blocks=blocks, cost=cost, work=work)
    return run, d


def denoised_space(net: SCMNet, x: torch.Tensor, transformer_options: dict):
    """The EDM map from this call's raw output to the denoised images (Turbo4DModel declares
    ModelType.EDM with the network's sigma_data, and ComfyUI hands the network c_in * x_noisy in
    the first channels), for accelerators that stand in for a whole call; None without sigmas."""
    sigma = per_image_sigma(transformer_options.get("sigmas"), x)
    if sigma is None:
        return None
    return EDM(sigma_data=net.cfg.sigma_data).input_space(x, sigma, net.cfg.out_channels)


class Turbo4DDiffusionModel(ExecutorDiffusionModel):
    """ComfyUI's `diffusion_model` slot: runs the SCM network for one stacked V x F batch."""

    def __init__(self, net: SCMNet):
        super().__init__()
        self.net = net

    @property
    def dtype(self) -> torch.dtype:
        return self.net.patch.weight.dtype

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        camera, views, frames = kwargs.get("camera"), kwargs.get("views"), kwargs.get("frames")
        if camera is None or views is None or frames is None:
            raise ValueError(
                "the Turbo4D model got conditioning without views, frames and cameras. Build its positive "
                "and negative with the 'MultiView Conditioning' node (or use 'MultiView Sampler').")
        net = self.net
        s = net.cfg.image_size
        if tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"the Turbo4D model got a {x.shape[-2]}x{x.shape[-1]} latent, but it samples {s}x{s} pixel images. "
                f"Sample into the latent output of 'MultiView Conditioning' (not an Empty Latent Image).")
        layout = net.token_layout(x.shape[0], int(views), int(frames))
        frame_index = kwargs.get("frame_index")
        run, d = call_dispatch(transformer_options, layout, timesteps, x, net.depth, net.cost(layout))
        forward = transformer_options.get(NET_KEY) or net
        if run is None:
            return forward(x, timesteps, camera, int(views), int(frames), frame_index=frame_index, layout=layout)
        out = run.model_call(d, x, lambda: forward(x, timesteps, camera, int(views), int(frames),
                                                      frame_index=frame_index, dispatch=d, layout=layout),
                             denoised_space(net, x, transformer_options))
        run.end_call(d)
        return out


class Turbo4DModel(comfy.model_base.BaseModel):
    def __init__(self, net: SCMNet, device=None):
        super().__init__(Turbo4DModelConfig(net.cfg.sigma_data), model_type=comfy.model_base.ModelType.EDM, device=device)
        self.diffusion_model = Turbo4DDiffusionModel(net)
        self.diffusion_model.eval()

    def extra_conds(self, **kwargs):
        out = {}
        ref = kwargs.get(COND_REFERENCE)
        if ref is None:
            return super().extra_conds(**kwargs)
        noise = kwargs.get("noise")
        if noise is not None and (tuple(noise.shape[1:]) != tuple(ref.shape[1:]) or noise.shape[0] % ref.shape[0]):
            raise ValueError(
                f"the latent to sample ({noise.shape[0]} images of {noise.shape[-2]}x{noise.shape[-1]}, "
                f"{noise.shape[1]} channels) does not fit the Turbo4D conditioning ({ref.shape[0]} images of "
                f"{ref.shape[-2]}x{ref.shape[-1]}, a {kwargs[COND_VIEWS]} x {kwargs[COND_FRAMES]} grid). Sample into "
                f"the latent output of 'MultiView Conditioning' (not an Empty Latent Image).")
        device = kwargs["device"]
        out["c_concat"] = comfy.conds.CONDNoiseShape(ref.to(device))
        out["camera"] = comfy.conds.CONDRegular(kwargs[COND_CAMERA].to(device))
        out["frame_index"] = comfy.conds.CONDRegular(kwargs[COND_FRAME_INDEX].to(device))
        out["views"] = comfy.conds.CONDConstant(int(kwargs[COND_VIEWS]))
        out["frames"] = comfy.conds.CONDConstant(int(kwargs[COND_FRAMES]))
        return out


class StatsSink:
    """Where the OUTER_SAMPLE wrapper leaves a run's RunStats for the node that started it.

    Not a list on purpose: ComfyUI copies every list inside model_options whenever it clones them
    (comfy.patcher_extension.copy_nested_dicts), so a list would receive the stats in a copy."""

    def __init__(self):
        self.items: list = []

    def append(self, stats) -> None:
        self.items.append(stats)


def add_run_note(model_patcher, note: str) -> None:
    """A note for the statistics of every run of an already cloned MODEL (run_notes reads it)."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    notes = list(to.get(NOTES_KEY) or [])
    if note not in notes:
        to[NOTES_KEY] = notes + [note]


def run_notes(guider, transformer_options: dict) -> list:
    """The notes a node left for this run: in the model's transformer_options, or in the positive
    conditioning (MultiView Conditioning's, which the stock KSampler passes on)."""
    notes = list(transformer_options.get(NOTES_KEY) or [])
    for c in (getattr(guider, "original_conds", None) or {}).get("positive", []):
        notes += [n for n in (c.get(NOTES_KEY) or []) if n not in notes]
    return notes


def turbo4d_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE: one fresh Turbo4DRun per sampling run (cf. easycache_sample_wrapper)."""
    guider = executor.class_obj
    orig_model_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig_model_options)
    to = guider.model_options.setdefault("transformer_options", {})
    run = build_run((to.get(OPTIONS_KEY) or {}).get("accelerators", []))
    run.listeners = list(to.get("turbo4d_listeners", []))  # nodes/events.py: the GUI's live map
    device = guider.model_patcher.load_device
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    run.begin()
    to[RUN_KEY] = run
    # The Turbo4D Memory node's bound (nodes/memory_limit.py) for a run that no sampler planned
    # memory for (MultiView Sampler (SV4D) sets its own budget from it): every cache of the run,
    # the per-call levels' included, stays within it on the model's device, the rest in CPU memory.
    gb = ((to.get(OPTIONS_KEY) or {}).get("memory") or {}).get("cache_gpu_gb") or 0
    budget = CacheBudget(int(gb * 2**30)) if gb > 0 and active_budget() is None else None
    try:
        with cache_budget(budget) if budget is not None else contextlib.nullcontext():
            return executor(*args, **kwargs)
    finally:
        stats = run.end(torch.cuda.max_memory_allocated(device) if on_cuda else None)
        if budget is not None:
            placed = budget.summary()
            stats.memory = MemoryReport(0, placed["gpu_limit_mb"], placed["gpu_peak_mb"], placed["cpu_peak_mb"])
        stats.notes.extend(n for n in run_notes(guider, to) if n not in stats.notes)
        log.info(stats.format_line())
        sink = to.get(REPORTS_KEY)
        if sink is not None:
            sink.append(stats)
        guider.model_options = orig_model_options


def turbo4d_step_wrapper(executor, x, timestep, model_options={}, seed=None):
    """PREDICT_NOISE: one sampler evaluation (all its model calls, CFG combined) through
    `Turbo4DRun.step`, so a whole step Chain Bypass skips costs none of ComfyUI's per-step
    conditioning and batching work. Outside a Turbo4D run it only calls through."""
    to = (model_options or {}).get("transformer_options", {})
    run = to.get(RUN_KEY)
    if run is None:
        return executor(x, timestep, model_options, seed)
    sampling = getattr(getattr(executor.class_obj, "model_patcher", None), "model", None)
    sigma_data = getattr(getattr(sampling, "model_sampling", None), "sigma_data", None)
    return run.step(x, float(timestep.flatten()[0]), to.get("sample_sigmas"),
                    lambda: executor(x, timestep, model_options, seed),
                    None if sigma_data is None else float(sigma_data))


def wrap_model(net: torch.nn.Module, dtype: Optional[torch.dtype], supported_dtypes: list,
               build) -> comfy.model_patcher.ModelPatcher:
    """A MODEL around a loaded network: `build(net, device)` makes the BaseModel; the patcher gets
    the OUTER_SAMPLE wrapper that gives every sampling run its Turbo4DRun."""
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    if dtype is None:
        params = sum(p.numel() for p in net.parameters())
        dtype = comfy.model_management.unet_dtype(load_device, params, supported_dtypes)
    net = net.to(device=offload_device, dtype=dtype).eval()
    model = build(net, offload_device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, turbo4d_sample_wrapper)
    patcher.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, WRAPPER_KEY, turbo4d_step_wrapper)
    return patcher


def make_model_patcher(net: SCMNet, dtype: Optional[torch.dtype] = None) -> comfy.model_patcher.ModelPatcher:
    """A MODEL for ComfyUI (stock KSampler included) around a loaded network."""
    return wrap_model(net, dtype, Turbo4DModelConfig.supported_inference_dtypes,
                      lambda n, device: Turbo4DModel(n, device=device))


# BaseModel classes whose diffusion_model.net runs its attention through the SCM dispatch (the
# SV4D glue adds its own), i.e. the MODELs the accelerator nodes accept.
SCM_MODELS: list = [Turbo4DModel]


def is_turbo4d_model(model_patcher) -> bool:
    return isinstance(getattr(model_patcher, "model", None), tuple(SCM_MODELS))


def get_scm_net(model_patcher, node: str = "this node"):
    """The SCM network inside a MODEL (an SCMNet, or an SV4DUNet for SV4D models), or a clear error
    when the MODEL is something else."""
    if not is_turbo4d_model(model_patcher):
        kind = type(getattr(model_patcher, "model", model_patcher)).__name__
        raise ValueError(
            f"{node}: the 'model' input is a {kind} model, which has no SCM (spatial/camera/motion) attention. "
            f"Connect the MODEL output of 'Turbo4D Model Loader' (directly or through other Turbo4D nodes).")
    return model_patcher.model.diffusion_model.net


def accelerator_specs(model_patcher) -> list:
    to = model_patcher.model_options.get("transformer_options", {})
    return list((to.get(OPTIONS_KEY) or {}).get("accelerators", []))


def set_accelerator_specs(model_patcher, specs: list) -> None:
    """Stores specs on an already cloned MODEL (accelerator nodes: clone, merge_spec, set)."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    opts = dict(to.get(OPTIONS_KEY) or {})
    opts["accelerators"] = list(specs)
    to[OPTIONS_KEY] = opts


PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
