"""EDM (Karras et al. 2022) preconditioning, noise schedule, loss and a plain Euler sampler.

ComfyUI's `ModelType.EDM` with `ModelSamplingContinuousEDM` applies exactly this preconditioning
(c_in, c_noise = log(sigma)/4, c_skip, c_out with sigma_data), so the network trained here samples
the same through ComfyUI's samplers; tests/test_host_model.py checks the two agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


# The embedded model's sampling defaults, chosen from measured quality against steps (BENCHMARKS.md,
# "Default sampling settings"): MultiView Sampler and `python -m turbo_core.evaluate` start here.
DEFAULT_SAMPLER = "euler"
DEFAULT_SCHEDULER = "karras"
DEFAULT_STEPS = 12
DEFAULT_CFG = 1.0


@dataclass(frozen=True)
class EDM:
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.0   # training noise levels: log-normal
    p_std: float = 1.4

    def coefficients(self, sigma: torch.Tensor):
        sd2 = self.sigma_data ** 2
        s2 = sigma ** 2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1.0 / (s2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip, c_out, c_in, c_noise

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, camera: torch.Tensor,
                views: int, frames: int, dispatch=None, frame_index=None) -> torch.Tensor:
        """D(x; sigma): x (N, C, H, W) noisy images, sigma (N,) or scalar, cond (N, Cc, H, W)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in self.coefficients(sigma))
        inp = torch.cat([x * c_in, cond.to(x.dtype)], dim=1)
        f = net(inp, c_noise.view(-1), camera, views, frames, frame_index=frame_index, dispatch=dispatch)
        return c_skip * x + c_out * f.float()

    def output_space(self, x: torch.Tensor, sigma) -> "DenoisedSpace":
        """How this call's raw network output maps to the denoised image (see DenoisedSpace)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in self.coefficients(sigma))
        return DenoisedSpace(x, c_skip, c_out, self.sigma_data)

    def input_space(self, x_in: torch.Tensor, sigma: torch.Tensor, channels: int) -> "DenoisedSpace":
        """The output space of a call whose network input holds c_in * x_noisy in its first
        `channels` channels (how ComfyUI's EDM model calls the network); sigma per image."""
        _, _, c_in, _ = self.coefficients(sigma)
        return self.output_space(x_in[:, :channels].float() / c_in.view(-1, 1, 1, 1), sigma)

    def sample_sigma(self, n: int, device=None, generator=None) -> torch.Tensor:
        z = torch.randn(n, device=device, generator=generator)
        return (z * self.p_std + self.p_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class DenoisedSpace:
    """D = c_skip * x + c_out * F: the raw output F of one model call on the noisy images x as a
    denoised image, and back. Accelerators that stand in for a whole call work on D: holding D
    over Euler steps is exactly a longer Euler step, holding F is not."""

    def __init__(self, x: torch.Tensor, c_skip, c_out, sigma_data: float):
        self.x, self.c_skip, self.c_out = x, c_skip, c_out
        self.sigma_data = sigma_data  # lets accelerators place a call by sigma alone, without a host sync
        self.is_identity = False

    @classmethod
    def identity(cls, x: torch.Tensor, sigma_data: float) -> "DenoisedSpace":
        """For a call whose output already is the denoised image (Turbo4DRun.step): no kernels at all."""
        space = cls(x, 0.0, 1.0, sigma_data)
        space.is_identity = True
        return space

    def denoised(self, f: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return f.float()
        return self.c_skip * self.x.float() + self.c_out * f.float()

    def output(self, d: torch.Tensor) -> torch.Tensor:
        if self.is_identity:  # a copy all the same: d may be a held forecast the caller must not alias
            out = d.float()
            return out.clone() if out is d else out
        return (d.float() - self.c_skip * self.x.float()) / self.c_out


def v_prediction_space(x_in: torch.Tensor, sigma: torch.Tensor, channels: int,
                       sigma_data: float = 1.0) -> DenoisedSpace:
    """The output space of a v-prediction EDM call (ComfyUI's V_PREDICTION_EDM: D = c_skip * x_noisy
    + c_out * F with c_out negative) whose network input holds c_in * x_noisy in its first
    `channels` channels; sigma per image."""
    sigma = sigma.view(-1, 1, 1, 1)
    sd2 = sigma_data ** 2
    norm = (sigma ** 2 + sd2).sqrt()
    noisy = x_in[:, :channels].float() * norm
    return DenoisedSpace(noisy, sd2 / (sigma ** 2 + sd2), -sigma * sigma_data / norm, sigma_data)


def call_sigma(sigmas: Optional[torch.Tensor], c_noise: torch.Tensor) -> float:
    """A model call's sigma: the first of the sigmas its host passed, else recovered from the
    network's noise input c_noise = log(sigma) / 4 (EDM's, and SV4D's v-parameterisation's)."""
    if sigmas is not None:
        return float(sigmas.flatten()[0])
    return math.exp(4.0 * float(c_noise.flatten()[0]))


def per_image_sigma(sigmas: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A call's sigma per image of x (float32), from the sigmas its host passed (one per image, or
    one for the call: ComfyUI batches cond and uncond under the sampler's sigma); None without."""
    if sigmas is None:
        return None
    sigma = sigmas.flatten().to(device=x.device, dtype=torch.float32)
    if sigma.numel() != x.shape[0]:
        sigma = sigma[:1].expand(x.shape[0])
    return sigma


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """steps+1 decreasing sigmas ending in 0 (ComfyUI's "karras" scheduler)."""
    ramp = torch.linspace(0, 1, steps, device=device, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)]).float()


@torch.no_grad()
def sample_euler(denoise: Callable[[torch.Tensor, float, int], torch.Tensor], noise: torch.Tensor,
                 sigmas: torch.Tensor, callback: Optional[Callable] = None) -> torch.Tensor:
    """Euler ODE sampler (ComfyUI's "euler"): denoise(x, sigma, step) -> D(x)."""
    sig = [float(v) for v in sigmas.detach().cpu().tolist()]  # one host read, not two per step
    x = noise * sig[0]
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(x, s, i)
        d = (x - den) / s
        x = x + d * (s_next - s)
        if callback is not None:
            callback(i, x, den)
    return x
