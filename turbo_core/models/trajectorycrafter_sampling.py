"""TrajectoryCrafter's pipeline around the network, as its reference pipeline
(`models/pipeline_trajectorycrafter.py`, `inference.py`) does it: the noise schedule and the DDIM
sampler, the text length, and the conditioning latents (render, mask, reference frames).

Plain PyTorch (and numpy for the reference's own timestep arithmetic); the ComfyUI adapter
(nodes/trajectorycrafter.py) feeds it ComfyUI's tensors and drives the sampler through ComfyUI's
sampling machinery.

Schedule. The reference loads CogVideoX-Fun-V1.1-5b-InP's scheduler config into diffusers'
DDIMScheduler (its default sampler, "DDIM_Origin"; "DDIM_Cog", CogVideoXDDIMScheduler, computes the
same): scaled_linear betas 0.00085..0.012 over 1000 steps, rescaled to zero terminal SNR,
v-prediction, "trailing" timesteps, eta 0, final alpha 1. In ComfyUI's terms the model is a
discrete V_PREDICTION model with `zsnr` (ComfyUI's "linear" beta schedule is diffusers'
"scaled_linear"), and a DDIM step with eta 0 is an Euler step in sigma = sqrt((1 - a) / a): both
move x0 + sigma * eps from one sigma to the next with x0 and eps held. Two things differ:

- Zero terminal SNR puts the first timestep (999) at alpha 0, sigma infinite. ComfyUI stands in a
  finite sigma there (alpha_bar 4.9e-8, sigma 4519); at that sigma its V_PREDICTION denoiser is
  off the reference's x0 = -v by 2e-4 relative, and so is an Euler step's eps = (x - x0) / sigma.
  `v_coefficients` gives the denoiser x0 = -v at the stand-in (the TrajectoryCrafter model uses
  them), and `sample_ddim` takes eps = the sample itself there: the first step at alpha 0 exactly.
- ComfyUI's "simple" scheduler picks the trailing timesteps only when the step count divides 1000;
  `trailing_timesteps` is diffusers' own arithmetic for any count.

For step counts that do not divide 1000, diffusers' DDIM moves each sample to t - 1000 // steps,
not to the next trailing timestep, and then evaluates the model at the next trailing timestep all
the same (the sample is read as if it were at that noise level). `trailing_step_sigmas` gives those
targets and `sample_ddim` follows them, so any step count samples as the reference does; for 50
steps (its default) and every other divisor of 1000 the targets are the next timesteps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
TEXT_TOKENS = 226          # T5 tokens per prompt, padded, no attention mask
T5_EOS, T5_PAD = 1, 0
REFERENCE_FRAMES = 10      # source frames the perceiver sees (3 latent frames)
NOISE_AUG_STRENGTH = 0.0563  # the pipeline's noise_aug_strength for the render (add_noise_in_inpaint_model)
DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_SEED = 50, 6.0, 43
DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH = 49, 384, 672
# inference.py's defaults: the negative prompt, and what it appends to the caption.
DEFAULT_NEGATIVE = ("The video is not of a high quality, it has a low resolution. Watermark present in each frame. "
                    "The background is solid. Strange body and strange trajectory. Distortion.")
REFINE_PROMPT = (". The video is of high quality, and the view is very clear. High quality, masterpiece, best "
                 "quality, highres, ultra-detailed, fantastic.")
VAE_SPATIAL, VAE_TEMPORAL, PATCH = 8, 4, 2


# --- schedule ----------------------------------------------------------------------------------
def alphas_cumprod(zero_snr: bool = True) -> torch.Tensor:
    """alpha_bar of the 1000 training timesteps (float64): scaled_linear betas, and with
    `zero_snr` the shift and scale that make alpha_bar[999] exactly 0 while alpha_bar[0] keeps its
    value (Lin et al. 2024; diffusers' rescale_zero_terminal_snr)."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    a = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr:
        s = a.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * (s0 / (s0 - sT))
        a = s ** 2
    return a


def trailing_timesteps(steps: int) -> list[int]:
    """The reference's timesteps for `steps` steps (diffusers' timestep_spacing="trailing"):
    round(arange(1000, 0, -1000 / steps)) - 1, e.g. 999, 979, ..., 19 for 50."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ratio = NUM_TRAIN_TIMESTEPS / int(steps)
    return (np.round(np.arange(NUM_TRAIN_TIMESTEPS, 0, -ratio)).astype(np.int64) - 1).tolist()


def trailing_sigmas(sigma_table: torch.Tensor, steps: int) -> torch.Tensor:
    """steps + 1 decreasing sigmas: the model's sigma at each trailing timestep (`sigma_table`
    holds one per training timestep, ComfyUI's model_sampling.sigmas), then 0 (final alpha 1)."""
    if sigma_table.dim() != 1 or sigma_table.numel() != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"sigma_table must hold one sigma per training timestep ({NUM_TRAIN_TIMESTEPS}), "
                         f"got shape {tuple(sigma_table.shape)}")
    t = torch.tensor(trailing_timesteps(steps), dtype=torch.long)
    return torch.cat([sigma_table.detach().float().cpu()[t], torch.zeros(1)])


def v_coefficients(sigma: torch.Tensor, zero_snr_sigma: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of a v-prediction denoiser, x0 = c_skip * x + c_out * v for x = x0 + sigma *
    eps: 1 / (sigma^2 + 1) and -sigma / sqrt(sigma^2 + 1); at `zero_snr_sigma` (the finite sigma a
    host stands in for alpha 0) 0 and -1, the alpha-0 limit (x0 = -v)."""
    s = sigma.float()
    c_skip, c_out = 1.0 / (s * s + 1.0), -s / (s * s + 1.0).sqrt()
    if zero_snr_sigma is not None:
        at = (s - zero_snr_sigma).abs() <= 1e-5 * zero_snr_sigma
        c_skip = torch.where(at, torch.zeros_like(c_skip), c_skip)
        c_out = torch.where(at, -torch.ones_like(c_out), c_out)
    return c_skip, c_out


def trailing_step_sigmas(sigma_table: torch.Tensor, steps: int) -> torch.Tensor:
    """The sigma each reference DDIM step moves its sample to: timestep t - 1000 // steps (0, final
    alpha 1, below timestep 0). Equal to trailing_sigmas()[1:] when steps divides 1000."""
    table = sigma_table.detach().float().cpu()
    jump = NUM_TRAIN_TIMESTEPS // int(steps)
    return torch.tensor([float(table[t - jump]) if t - jump >= 0 else 0.0 for t in trailing_timesteps(steps)])


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable] = None, disable=None, zero_snr_sigma: Optional[float] = None,
                step_sigmas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM with eta 0 in k-diffusion's form (ComfyUI's sampler functions): `model(x, sigma)` is the
    denoiser (x0 from x = x0 + sigma * eps, CFG applied), `x` the noise already scaled to
    sigmas[0]. Each step holds x0 and eps = (x - x0) / sigma and moves to the next sigma, which is
    diffusers' DDIMScheduler.step for v-prediction with eta 0.

    `zero_snr_sigma`: the finite sigma a host stands in for alpha 0 (ComfyUI's sigma_max under
    zsnr), where the denoiser gives x0 = -v (`v_coefficients`). When the run starts there, the
    first step is taken at alpha 0 as the reference takes it: eps is the sample itself (x at sigma
    s is noise * sqrt(1 + s^2)), not (x - x0) / s.

    `step_sigmas` (one per step, `trailing_step_sigmas`): where each step moves the sample when
    that is not the next sigma evaluated; the sample is then read at the next sigma, as the
    reference's scheduler does."""
    extra_args = extra_args or {}
    sig = [float(s) for s in sigmas.detach().cpu().tolist()]
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = model(x, sigmas[i] * s_in, **extra_args)
        x0 = den
        if zero_snr_sigma is not None and math.isclose(s, zero_snr_sigma, rel_tol=1e-5):
            eps = x / math.sqrt(1.0 + s * s)
        else:
            eps = (x - den) / s
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
        target = s_next if step_sigmas is None else float(step_sigmas[i])
        x = x0 + eps * target if target > 0 else x0
        if target != s_next:
            # a sample at sigma `target` (in VP terms x / sqrt(1 + target^2)) taken to be at s_next;
            # at the end (s_next 0) that VP sample is the output, as the reference returns it
            x = x * math.sqrt((1.0 + s_next * s_next) / (1.0 + target * target))
    return x


# --- text --------------------------------------------------------------------------------------
def t5_tokens_to_length(tokens: Sequence, length: int = TEXT_TOKENS, eos: int = T5_EOS, pad: int = T5_PAD) -> list:
    """One prompt's T5 tokens as the reference's tokenizer call makes them (padding="max_length",
    truncation, add_special_tokens): the text tokens, EOS, then pad tokens up to `length`; a longer
    text keeps its first length - 1 tokens and EOS. Items are token ids or tuples whose first
    element is the id (ComfyUI's (id, weight[, word]) pairs, kept as they are; added pads and a
    moved EOS take the weight 1.0)."""
    def tid(t):
        return int(t[0]) if isinstance(t, (tuple, list)) else int(t)

    items = list(tokens)
    end = next((i for i, t in enumerate(items) if tid(t) == eos), None)
    text = items[:end] if end is not None else [t for t in items if tid(t) != pad]
    eos_item = items[end] if end is not None else None
    like_tuple = bool(items) and isinstance(items[0], (tuple, list))

    def make(token):
        return (token, 1.0) if like_tuple else token

    if len(text) > length - 1:
        text = text[:length - 1]
    out = text + [eos_item if eos_item is not None else make(eos)]
    return out + [make(pad)] * (length - len(out))


# --- frames and latents ------------------------------------------------------------------------
def latent_frames(frames: int) -> int:
    return (int(frames) - 1) // VAE_TEMPORAL + 1


def check_frames(frames: int) -> None:
    """8k + 1 frames: the VAE encodes 4k + 1 frames to k + 1 latent frames, but diffusers'
    CogVideoX decoder (TrajectoryCrafter's too) upsamples the latent frames after the first in
    pairs, so only an odd latent count (8k + 1 frames) decodes to as many frames as went in."""
    if int(frames) < 1 or (int(frames) - 1) % (2 * VAE_TEMPORAL):
        raise ValueError(f"frames={frames}: TrajectoryCrafter's VAE round trip takes 8k + 1 frames (49, 41, 33, 25, "
                         f"17, 9, 1); 49 is the reference's")


def check_size(height: int, width: int) -> None:
    unit = VAE_SPATIAL * PATCH
    if height % unit or width % unit or height < unit or width < unit:
        raise ValueError(f"{width} x {height}: width and height must be multiples of {unit} (VAE 8 x patch 2)")


def images_to_video(images: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """(F, H, W, C) images in [0, 1] -> (1, C, F, height, width), resized like the reference
    (F.interpolate, bilinear without corner alignment for frames, nearest for masks)."""
    x = images.float().permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != (height, width):
        kw = {"align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(height, width), mode=mode, **kw)
    return x.permute(1, 0, 2, 3).unsqueeze(0)


def masked_render(render: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The render in [-1, 1] with its holes (hole >= 0.5) set to -1, as the pipeline masks it.
    render (B, 3, F, H, W), hole (B, 1, F, H, W) binary."""
    keep = (hole < 0.5).to(render.dtype)
    return render * keep - (hole > 0.5).to(render.dtype)


def add_render_noise(video: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None
                     ) -> torch.Tensor:
    """add_noise_to_reference_video with a fixed ratio: Gaussian noise of std `strength` on every
    pixel that is not exactly -1 (holes stay -1)."""
    device = generator.device if generator is not None else video.device
    noise = torch.randn(video.shape, generator=generator, dtype=torch.float32, device=device).to(video) * strength
    return video + torch.where(video == -1, torch.zeros_like(noise), noise)


def resize_mask(mask: torch.Tensor, size: tuple) -> torch.Tensor:
    """The pipeline's resize_mask (process_first_frame_only): mask (B, 1, F, H, W) -> (B, 1, T, h, w),
    the first frame alone to the first latent frame, the others together to the rest, trilinear."""
    t, h, w = size
    first = F.interpolate(mask[:, :, :1], size=(1, h, w), mode="trilinear", align_corners=False)
    if t == 1:
        return first
    rest = F.interpolate(mask[:, :, 1:], size=(t - 1, h, w), mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)


@torch.no_grad()
def conditioning_latents(vae, render: torch.Tensor, hole: torch.Tensor, reference: torch.Tensor,
                         noise_aug: float = 0.0, generator: Optional[torch.Generator] = None,
                         encode: Optional[Callable] = None, progress: Optional[Callable] = None) -> dict:
    """What the transformer is conditioned on, built as the reference pipeline builds it.

    render (1, 3, F, H, W) and reference (1, 3, F_ref, H, W) in [-1, 1]; hole (1, 1, F, H, W), 1
    where the render has no point (the mask the model inpaints). `encode(vae, video, generator)`
    gives scaled latents (B, 16, T, h, w) (default cogvideox_vae.encode: the posterior's mode
    without a generator, a sample with one). Returns

    - "inpaint" (1, 17, T, h, w): the mask latents (1 where the render is valid, resized to the
      latent grid, times the VAE's scaling factor) and the masked render's latents (holes -1,
      noise of std `noise_aug` elsewhere when > 0, the posterior's mode); all zeros when every
      pixel is a hole;
    - "reference" (1, T_ref, 16, h, w): the reference frames' latents (a posterior sample),
      frame-major as the transformer's perceiver takes them.
    """
    if encode is None:
        from .cogvideox_vae import encode
    step = progress or (lambda: None)
    hole = (hole >= 0.5).to(render.dtype)
    ref = encode(vae, reference, generator).float()
    step()
    latent_shape = (latent_frames(render.shape[2]), render.shape[3] // VAE_SPATIAL, render.shape[4] // VAE_SPATIAL)
    if bool((hole == 1).all()):
        channels = ref.shape[1]
        inpaint = torch.zeros(render.shape[0], channels + 1, *latent_shape)
        step()
    else:
        video = masked_render(render, hole)
        if noise_aug > 0:
            video = add_render_noise(video, noise_aug, generator)
        masked = encode(vae, video, None).float()
        step()
        scaling = float(vae.config.scaling_factor)
        mask = resize_mask(1.0 - hole.float(), tuple(masked.shape[2:])) * scaling
        inpaint = torch.cat([mask.to(masked), masked], dim=1)
    return {"inpaint": inpaint.cpu(), "reference": ref.permute(0, 2, 1, 3, 4).contiguous().cpu()}


def decode_video(vae, latents: torch.Tensor, decode: Optional[Callable] = None) -> torch.Tensor:
    """Scaled latents (B, 16, T, h, w) -> images (B * F, H, W, 3) in [0, 1], as the pipeline's
    decode_latents (frames / 2 + 0.5, clamped)."""
    if decode is None:
        from .cogvideox_vae import decode
    with torch.no_grad():
        video = decode(vae, latents).float()
    frames = (video / 2 + 0.5).clamp(0, 1)                     # (B, 3, F, H, W)
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, *frames.shape[3:], 3).cpu()


def noise_like(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise for a (B, C, T, h, w) latent, drawn in the reference's (B, T, C, h, w) order
    from a CPU generator seeded with `seed` (the pipeline's randn_tensor on the CPU)."""
    b, c, t, h, w = latent.shape
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((b, t, c, h, w), generator=g, dtype=torch.float32).permute(0, 2, 1, 3, 4).contiguous()
