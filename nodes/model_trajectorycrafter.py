"""Glue between TrajectoryCrafter's transformer (turbo_core.models.trajectorycrafter) and ComfyUI.

- `TrajectoryCrafterModelConfig` / `TrajectoryCrafterModel`: a discrete V_PREDICTION model with
  zero terminal SNR over CogVideoX's scaled_linear betas (ComfyUI's "linear" schedule), so
  ComfyUI's samplers, its schedulers and the Turbo4D sampler all see the reference's sigmas
  (tests/test_host_trajectorycrafter.py compares them with diffusers' scheduler); at ComfyUI's
  finite stand-in for the zero-SNR timestep the denoiser gives the reference's x0 = -v
  (`ZeroSNRVPrediction`). Latents are
  ComfyUI's video layout (B, 16, T, h, w), already times the VAE's scaling factor (the latent
  format's scale is 1).
- Conditioning (written by TrajectoryCrafter Conditioning, read by `extra_conds`): the T5 states
  as cross_attn; `COND_INPAINT` (1, 17, T, h, w), mask and render latents, concatenated to the
  noisy latents as the model's channels 16..32; `COND_REFERENCE`, a `ReferenceLatents` holding the
  source frames' latents for the perceiver.
- `TrajectoryCrafterDiffusionModel`: forward through the DIFFUSION_MODEL wrapper executor and the
  active Turbo4DRun's dispatch (nodes/model.py), the joint / perceiver axes of a JointLayout; under
  Turbo4D Multi-GPU through its split network (the CFG halves on two processes).
- The perceiver's keys/values depend on the reference latents and the weights only; a per-run
  `ReferenceCache` (put in place by an OUTER_SAMPLE wrapper) computes them at the run's first call
  and every later call, both CFG halves included, reads them.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base
from comfy.patcher_extension import WrappersMP

from turbo_core.diffusion import DenoisedSpace, per_image_sigma
from turbo_core.models.trajectorycrafter import TrajectoryCrafterTransformer
from turbo_core.models.trajectorycrafter_sampling import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, v_coefficients

from . import model as m

COND_INPAINT, COND_REFERENCE = "trajcrafter_inpaint", "trajcrafter_reference"
REF_CACHE_KEY = "trajcrafter_reference_cache"
WRAPPER_KEY = "turbo4d_trajectorycrafter"
LATENT_CHANNELS = 16


class CogVideoXLatent(comfy.latent_formats.LatentFormat):
    """CogVideoX's VAE latents, (B, 16, T, h, w), already scaled by the VAE (0.7): scale 1 here."""

    latent_channels = LATENT_CHANNELS
    latent_dimensions = 3
    scale_factor = 1.0


class TrajectoryCrafterModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}  # the transformer comes from turbo_core
    unet_extra_config = {}
    latent_format = CogVideoXLatent
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    # ComfyUI's "linear" betas are linspace(sqrt(start), sqrt(end)) ** 2: diffusers' scaled_linear.
    sampling_settings = {"beta_schedule": "linear", "linear_start": BETA_START, "linear_end": BETA_END,
                         "timesteps": NUM_TRAIN_TIMESTEPS, "zsnr": True}
    # 49 frames at 384 x 672 (batch 2) hold about 1.5 GB of activations next to the weights.
    memory_usage_factor = 0.8

    def __init__(self):
        super().__init__({"disable_unet_model_creation": True})


class ReferenceLatents:
    """The source frames' latents (B, F_ref, 16, h, w) for the perceiver, in the conditioning. Compared
    by identity (ComfyUI's CONDConstant batches the positive and negative together when both carry
    the same object, as TrajectoryCrafter Conditioning gives them)."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def __repr__(self):
        return f"ReferenceLatents{tuple(self.latents.shape)}"


class ReferenceCache:
    """One sampling run's perceiver keys/values, per reference and device/dtype."""

    def __init__(self):
        self.items: dict = {}
        self.computed = 0

    def get(self, net: TrajectoryCrafterTransformer, ref: ReferenceLatents, device, dtype):
        key = (id(ref), str(device), dtype, id(net))
        hit = self.items.get(key)
        if hit is None:
            hit = self.items[key] = (ref, net.reference(ref.latents.to(device)))  # ref kept: its id stays valid
            self.computed += 1
        return hit[1]


def reference_cache_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE: a fresh ReferenceCache for the run, dropped (with its GPU memory) at its end."""
    guider = executor.class_obj
    orig = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    guider.model_options.setdefault("transformer_options", {})[REF_CACHE_KEY] = ReferenceCache()
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig


class ZeroSNRVPrediction(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
    """ComfyUI's discrete V_PREDICTION sampling with zsnr, but at its stand-in for alpha 0 (the last
    sigma, finite) the denoiser gives the alpha-0 limit x0 = -v, as the reference computes it,
    instead of ComfyUI's 2e-4-off value there (turbo_core's v_coefficients)."""

    def calculate_denoised(self, sigma, model_output, model_input):
        c_skip, c_out = v_coefficients(sigma, float(self.sigma_max))
        shape = (-1,) + (1,) * (model_output.ndim - 1)
        return model_input * c_skip.view(shape).to(model_input) + model_output * c_out.view(shape).to(model_output)


def v_denoised_space(noisy_in: torch.Tensor, transformer_options: dict, zero_snr_sigma: float
                     ) -> Optional[DenoisedSpace]:
    """The model's map from the network's output (v, (B, 16, T, h, w)) to the denoised latents,
    D = c_skip x + c_out v with x = the network's noisy input times sqrt(s^2 + 1); for
    accelerators that stand in for a whole call. None without sigmas."""
    sigma = per_image_sigma(transformer_options.get("sigmas"), noisy_in)
    if sigma is None:
        return None
    shape = (-1,) + (1,) * (noisy_in.dim() - 1)
    c_skip, c_out = v_coefficients(sigma, zero_snr_sigma)
    return DenoisedSpace(noisy_in.float() * (sigma.view(shape) ** 2 + 1).sqrt(), c_skip.view(shape),
                         c_out.view(shape), 1.0)


class TrajectoryCrafterDiffusionModel(m.ExecutorDiffusionModel):
    def __init__(self, net: TrajectoryCrafterTransformer):
        super().__init__()
        self.net = net
        self.zero_snr_sigma: Optional[float] = None  # the model sampling's stand-in for alpha 0

    @property
    def dtype(self) -> torch.dtype:
        return self.net.proj_out.weight.dtype

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        net = self.net
        cfg = net.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"the TrajectoryCrafter model got input of shape {tuple(x.shape)}, not (batch, {cfg.in_channels}, frames, "
                f"height, width): sample the latent of 'TrajectoryCrafter Conditioning' with its positive and negative.")
        if context is None:
            raise ValueError("the TrajectoryCrafter model got no text states: encode the prompts with "
                             "'TrajectoryCrafter Text Encode' and pass them through 'TrajectoryCrafter Conditioning'.")
        ref = kwargs.get("reference")
        reference = None
        if cfg.is_train_cross:
            if not isinstance(ref, ReferenceLatents):
                raise ValueError("the TrajectoryCrafter model got no reference frames: build the positive and "
                                 "negative with 'TrajectoryCrafter Conditioning'.")
            cache = transformer_options.get(REF_CACHE_KEY)
            if cache is None:  # outside a sampling run (a direct call): this call alone
                cache = ReferenceCache()
            reference = cache.get(net, ref, x.device, self.dtype)
        b, _, f, hh, ww = x.shape
        video = x.permute(0, 2, 1, 3, 4)                                  # (B, T, 33, h, w)
        t = timesteps.flatten().float()
        layout = net.token_layout(b, context.shape[1], f, hh, ww, reference.tokens if reference is not None else 0)
        work = net.block_work(layout)
        run, d = m.call_dispatch(transformer_options, layout, timesteps, x, net.depth, work=work)

        forward = transformer_options.get(m.NET_KEY) or net  # the Multi-GPU node's split network

        def network():
            out = forward(video, context, t, reference=reference, dispatch=d)
            return out.permute(0, 2, 1, 3, 4)

        if run is None:
            return network()
        space = v_denoised_space(x[:, :LATENT_CHANNELS], transformer_options, self.zero_snr_sigma)
        out = run.model_call(d, x, network, space)
        run.end_call(d)
        return out


class TrajectoryCrafterModel(comfy.model_base.BaseModel):
    def __init__(self, net: TrajectoryCrafterTransformer, device=None):
        super().__init__(TrajectoryCrafterModelConfig(), model_type=comfy.model_base.ModelType.V_PREDICTION,
                         device=device)
        self.diffusion_model = TrajectoryCrafterDiffusionModel(net)
        self.diffusion_model.eval()
        self.model_sampling = ZeroSNRVPrediction(self.model_config)
        self.diffusion_model.zero_snr_sigma = float(self.model_sampling.sigma_max)
        # What the checkpoint's config.json says about the pipeline (add_noise_in_inpaint_model).
        self.pipeline_options: dict = {}

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)  # c_crossattn from the T5 states
        inpaint = kwargs.get(COND_INPAINT)
        if inpaint is None:
            raise ValueError("the TrajectoryCrafter model needs its conditioning (render, mask and reference latents): "
                             "build the positive and negative with 'TrajectoryCrafter Conditioning'.")
        noise = kwargs.get("noise")
        if noise is not None and (noise.dim() != 5 or tuple(noise.shape[2:]) != tuple(inpaint.shape[2:])):
            raise ValueError(
                f"the latent to sample {tuple(noise.shape)} does not fit the TrajectoryCrafter conditioning "
                f"({inpaint.shape[2]} latent frames of {inpaint.shape[3]} x {inpaint.shape[4]}): sample into the latent "
                f"output of 'TrajectoryCrafter Conditioning'.")
        device = kwargs["device"]
        out["c_concat"] = comfy.conds.CONDNoiseShape(inpaint.to(device))
        ref = kwargs.get(COND_REFERENCE)
        if ref is not None:
            out["reference"] = comfy.conds.CONDConstant(ref)
        return out


m.SCM_MODELS.append(TrajectoryCrafterModel)


def is_trajectorycrafter_model(model_patcher) -> bool:
    return isinstance(getattr(model_patcher, "model", None), TrajectoryCrafterModel)


def get_net(model_patcher, node: str) -> TrajectoryCrafterTransformer:
    if not is_trajectorycrafter_model(model_patcher):
        kind = type(getattr(model_patcher, "model", model_patcher)).__name__
        raise ValueError(f"{node}: the 'model' input is a {kind} model, not TrajectoryCrafter. Load the transformer "
                         f"with 'TrajectoryCrafter Loader' and connect its MODEL (directly or through the Turbo4D "
                         f"accelerator nodes).")
    return model_patcher.model.diffusion_model.net


def make_model_patcher(net: TrajectoryCrafterTransformer, dtype=None, pipeline_options: Optional[dict] = None):
    """A MODEL around the transformer: ComfyUI's samplers drive it; the Turbo4D OUTER_SAMPLE and
    PREDICT_NOISE wrappers (runs, whole-step skips) and the run's reference cache come with it."""
    patcher = m.wrap_model(net, dtype, TrajectoryCrafterModelConfig.supported_inference_dtypes,
                           lambda n, device: TrajectoryCrafterModel(n, device=device))
    patcher.model.pipeline_options = dict(pipeline_options or {})
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, reference_cache_wrapper)
    return patcher


# --- the VAE as a model ComfyUI's memory management loads and offloads -------------------------------
class CogVideoXVAE:
    """diffusers' AutoencoderKLCogVideoX in a ModelPatcher: `load()` puts it on ComfyUI's device
    (freeing others' memory first, as ComfyUI's own VAE does), and ComfyUI offloads it when
    another model needs the room."""

    def __init__(self, vae, name: str = ""):
        self.vae = vae
        self.name = name
        load_device = comfy.model_management.vae_device()
        offload_device = comfy.model_management.vae_offload_device()
        vae.to(offload_device)
        # ModelPatcher records the device on the module it holds; diffusers' models make `device` a
        # read-only property, so it holds a plain container.
        holder = torch.nn.Module()
        holder.vae = vae
        self.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def load(self, height: int = 0, width: int = 0):
        """The module on its load device, with room freed for the activations of a frame chunk at
        height x width (diffusers' CogVideoX VAE works through 4-8 frames at a time with 128-512
        channel feature maps)."""
        need = int(8 * height * width * 128 * 8 * torch.empty((), dtype=self.dtype).element_size())
        comfy.model_management.load_models_gpu([self.patcher], memory_required=need)
        return self.vae

    @property
    def device(self):
        return next(self.vae.parameters()).device

    def __repr__(self):
        return f"CogVideoXVAE({self.name})"
