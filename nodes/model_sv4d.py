"""Glue between SV4D / SV4D 2.0's UNet (turbo_core.models.sv4d) and ComfyUI's model stack.

- `SV4DModelConfig` / `SV4DModel`: `ModelType.V_PREDICTION_EDM` with sigma_data 1, sigma 0.002..700,
  the SD 1.x latent format (0.18215), like ComfyUI's SVD / SV3D models. ComfyUI then computes
  c_in = 1/sqrt(s^2+1), c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1) and c_noise = 0.25 ln s, which is
  SV4D's `VScalingWithEDMcNoise` (tests/test_host_sv4d.py checks it).
- Conditioning, one row per image of the pass (frame-major, N = T*V):
  c_crossattn (N, 1, 1024) the CLIP image embedding of the image's input frame (zeros for uncond),
  c_concat (N, 4, h, w) the VAE latent of that frame as VAE.encode gives it, not scaled by the latent
  format (SV4D's conditioner does not scale it either; zeros for uncond), y (N, 1280) =
  [256-d embedding of the conditioning noise 0 (zeros for uncond) | 512-d polar | 512-d azimuth],
  cond_view (N, 4*k, h', w') the latents of the V views at the reference frame (k = 2 for passes
  that alternate their frame order: forward reference | reversed reference), views / frames /
  alternate as constants.
- `SV4DDiffusionModel`: the `diffusion_model` slot, forward through the DIFFUSION_MODEL executor
  and the active Turbo4DRun's dispatch (nodes/model.py's helpers). In an alternating pass it
  reverses the frames at even steps (the reference script's backward inputs), runs the network,
  and puts the result back in frame order, so the sampler's latent keeps every frame in place.
  The accelerators' state is kept per frame order (see turbo_core/sampling_plans.py).
"""
from __future__ import annotations

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.supported_models_base
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

from turbo_core.diffusion import call_sigma, per_image_sigma, v_prediction_space
from turbo_core.memory import MemoryConfig
from turbo_core.models.sv4d import SV4DUNet
from turbo_core.sampling_plans import (SIGMA_MAX, SIGMA_MIN, batch_frame_permutation, reference_latents, reversed_at,
                                       step_index)

from . import model as m

# Conditioning entries the SV4D sampler writes and `SV4DModel.extra_conds` reads.
COND_CONCAT, COND_VECTOR, COND_VIEW = "sv4d_concat", "sv4d_vector", "sv4d_cond_view"
COND_VIEWS, COND_FRAMES, COND_ALTERNATE = "sv4d_views", "sv4d_frames", "sv4d_alternate"
LATENT_CHANNELS = 4
# transformer_options[MEMORY_KEY]: the turbo_core.memory.MemoryConfig of a sampling run (the
# SV4D sampler puts one there; a call on the GPU without one gets a fresh one).
MEMORY_KEY = "turbo4d_memory"
PIECE_ROOM = 2 << 30  # what memory_required adds for the pieces' transient work


class SV4DModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}  # the UNet comes from turbo_core
    unet_extra_config = {}
    latent_format = comfy.latent_formats.SD15
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    sampling_settings = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "sigma_data": 1.0}
    memory_usage_factor = 2.0

    def __init__(self):
        super().__init__({"disable_unet_model_creation": True})


def v_denoised_space(x: torch.Tensor, transformer_options: dict):
    """ComfyUI's V_PREDICTION_EDM map from this call's raw output to the denoised latents, for
    accelerators that stand in for a whole call; None without sigmas."""
    sigma = per_image_sigma(transformer_options.get("sigmas"), x)
    return None if sigma is None else v_prediction_space(x, sigma, LATENT_CHANNELS)


class SV4DDiffusionModel(m.ExecutorDiffusionModel):
    def __init__(self, net: SV4DUNet):
        super().__init__()
        self.net = net

    @property
    def dtype(self) -> torch.dtype:
        return self.net.out[2].weight.dtype

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        views, frames, cond_view = kwargs.get("views"), kwargs.get("frames"), kwargs.get("cond_view")
        if views is None or frames is None or cond_view is None or y is None or context is None:
            raise ValueError("the SV4D model got conditioning that is not SV4D's (views, frames, cond_view, y, CLIP "
                             "tokens). Sample it with 'MultiView Sampler (SV4D)'.")
        views, frames = int(views), int(frames)
        n, per = x.shape[0], views * frames
        if n % per:
            raise ValueError(f"the SV4D model got {n} images, not a multiple of frames x views = {frames} x {views}")
        b = n // per
        alternate, reverse = bool(kwargs.get("alternate")), False
        if alternate:
            step = step_index(call_sigma(transformer_options.get("sigmas"), timesteps),
                              transformer_options.get("sample_sigmas"))
            reverse = reversed_at(alternate, step)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        if reverse:
            perm = batch_frame_permutation(frames, views, b, True).to(x.device)
            x, t, context, y, cond_view = x[perm], t[perm], context[perm], y[perm], cond_view[perm]
        cv = reference_latents(cond_view, b, frames, views, LATENT_CHANNELS, reverse)
        layout = self.net.token_layout(n, views, frames, *x.shape[-2:])
        tag = ("|reversed" if reverse else "|forward") if alternate else ""
        # Each attention layer is counted at its own level's grid (four grids in the UNet).
        run, d = m.call_dispatch(transformer_options, layout, timesteps, x, self.net.blocks, self.net.cost(layout),
                                 tag, work=self.net.block_work(layout))
        memory = transformer_options.get(MEMORY_KEY)
        if memory is None and x.is_cuda:
            memory = MemoryConfig()
        forward = transformer_options.get(m.NET_KEY) or self.net  # the Multi-GPU node's split network
        if run is None:
            out = forward(x, t, context, y, cv, views, frames, dispatch=d, memory=memory)
        else:
            out = run.model_call(d, x, lambda: forward(x, t, context, y, cv, views, frames, dispatch=d,
                                                       memory=memory), v_denoised_space(x, transformer_options))
            run.end_call(d)
        if reverse:
            out = out[torch.argsort(perm)]
        return out


class SV4DModel(comfy.model_base.BaseModel):
    def __init__(self, net: SV4DUNet, device=None):
        super().__init__(SV4DModelConfig(), model_type=comfy.model_base.ModelType.V_PREDICTION_EDM, device=device)
        self.diffusion_model = SV4DDiffusionModel(net)
        self.diffusion_model.eval()

    def memory_required(self, input_shape, cond_shapes={}):
        """Activation memory of a call on `input_shape` (N, C, h, w): ComfyUI frees this much before
        sampling and batches cond and uncond together when 1.5x it is free. The forward splits its
        transient work into pieces that fit the free memory, so what it needs is what it holds
        (SV4DUNet.activation_bytes) plus room for a piece, not ComfyUI's area-based guess."""
        n, h, w = int(input_shape[0]), int(input_shape[-2]), int(input_shape[-1])
        dtype = self.manual_cast_dtype or self.get_dtype()
        return self.diffusion_model.net.activation_bytes(n, h, w, dtype.itemsize) + PIECE_ROOM

    def extra_conds(self, **kwargs):
        out = {}
        concat = kwargs.get(COND_CONCAT)
        if concat is None:
            raise ValueError("the SV4D model needs SV4D conditioning (the input video's CLIP tokens and latents, the "
                             "views' cameras and reference latents). Sample it with 'MultiView Sampler (SV4D)'.")
        noise = kwargs.get("noise")
        if noise is not None and tuple(noise.shape) != tuple(concat.shape):
            raise ValueError(
                f"the latent to sample ({tuple(noise.shape)}) does not fit the SV4D conditioning "
                f"({tuple(concat.shape)}: {kwargs[COND_FRAMES]} frames x {kwargs[COND_VIEWS]} views of 4-channel "
                f"latents). Sample with 'MultiView Sampler (SV4D)'.")
        device = kwargs["device"]
        out["c_concat"] = comfy.conds.CONDNoiseShape(concat.to(device))
        out["c_crossattn"] = comfy.conds.CONDCrossAttn(kwargs["cross_attn"].to(device))
        out["y"] = comfy.conds.CONDRegular(kwargs[COND_VECTOR].to(device))
        out["cond_view"] = comfy.conds.CONDRegular(kwargs[COND_VIEW].to(device))
        out["views"] = comfy.conds.CONDConstant(int(kwargs[COND_VIEWS]))
        out["frames"] = comfy.conds.CONDConstant(int(kwargs[COND_FRAMES]))
        out["alternate"] = comfy.conds.CONDConstant(bool(kwargs.get(COND_ALTERNATE, False)))
        return out


m.SCM_MODELS.append(SV4DModel)

_noise_embedder, _angle_embedder = Timestep(256), Timestep(512)


def vector_condition(polar: torch.Tensor, azimuth: torch.Tensor, frames: int, uncond: bool) -> torch.Tensor:
    """y (frames*views, 1280) of a pass, frame-major: [conditioning-noise embedding | polar | azimuth]
    per view, as SV4D's conditioner builds it (noise level 0: cos 1 / sin 0; zeroed in the uncond
    branch, which forces the input frames' embeddings to zero)."""
    v = polar.numel()
    noise = _noise_embedder(torch.zeros(v))
    if uncond:
        noise = torch.zeros_like(noise)
    per_view = torch.cat([noise, _angle_embedder(polar.float()), _angle_embedder(azimuth.float())], dim=1)
    return per_view.repeat(frames, 1)


def is_sv4d_model(model_patcher) -> bool:
    return isinstance(getattr(model_patcher, "model", None), SV4DModel)


def get_sv4d_net(model_patcher, node: str) -> SV4DUNet:
    if not is_sv4d_model(model_patcher):
        kind = type(getattr(model_patcher, "model", model_patcher)).__name__
        raise ValueError(f"{node}: the 'model' input is a {kind} model, not SV4D / SV4D 2.0. Load sv4d.safetensors or "
                         f"sv4d2.safetensors with 'Turbo4D Model Loader' and connect its MODEL (directly or through "
                         f"the Turbo4D accelerator nodes).")
    return model_patcher.model.diffusion_model.net


def make_sv4d_model_patcher(net: SV4DUNet, dtype=None):
    """A MODEL around a loaded SV4D UNet; the accelerator nodes accept it like the reference model."""
    return m.wrap_model(net, dtype, SV4DModelConfig.supported_inference_dtypes,
                        lambda n, device: SV4DModel(n, device=device))
