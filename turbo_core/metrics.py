"""Image quality (PSNR, SSIM) and cost (time, peak memory) measurements.

Images are tensors (..., C, H, W) in [-1, 1], so the default data range is 2.0; every quality
function returns one value per image, shape (...), and leaves averaging to the caller (a mean of
per-image PSNRs is not the PSNR of the mean error, and reports say which one they give).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: images of shapes {tuple(a.shape)} and {tuple(b.shape)} differ; "
                         f"compare tensors of the same (..., C, H, W) shape")
    if a.dim() < 3:
        raise ValueError(f"{name}: expected tensors (..., C, H, W), got shape {tuple(a.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, (..., C, H, W) -> (...), in float64 for exact small errors."""
    _check_pair(a, b, "mse")
    return (a.double() - b.double()).square().mean(dim=(-3, -2, -1))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; +inf where the images are identical."""
    e = mse(a, b)
    return (10 * torch.log10(data_range ** 2 / e)).float()  # e == 0 gives +inf


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 2-D gaussian (size, size), the window of Wang et al. (2004)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), (..., C, H, W) -> (...).

    Gaussian window (11 x 11, sigma 1.5), statistics over the 'valid' positions only (no padding,
    so no invented border pixels), each channel separately, then the mean over channels and positions.
    Images smaller than the window are an error rather than a silently different measure.
    """
    _check_pair(a, b, "ssim")
    *lead, c, h, w = a.shape
    if h < window or w < window:
        raise ValueError(f"ssim: images of {h}x{w} pixels are smaller than the {window}x{window} window; "
                         f"pass a smaller window= or compare larger images")
    x = a.double().reshape(-1, c, h, w)
    y = b.double().reshape(-1, c, h, w)
    k = gaussian_window(window, sigma, device=x.device).expand(c, 1, window, window)

    def filt(t):
        return F.conv2d(t, k, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(-3, -2, -1)).reshape(lead).float()


# --- cost -----------------------------------------------------------------------------------------

def synchronize(device) -> None:
    """Waits for queued GPU work, so a wall clock read after it covers that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: Optional[int] = None  # None where the device has no allocator counter (CPU)
    extra: dict = field(default_factory=dict)

    @property
    def peak_mib(self) -> Optional[float]:
        return None if self.peak_bytes is None else self.peak_bytes / 2 ** 20


@contextmanager
def measure(device="cpu"):
    """`with measure(dev) as m: work()` -> m.seconds (device-synchronised wall time) and
    m.peak_bytes (peak allocated GPU memory during the block, CUDA only)."""
    device = torch.device(device)
    m = Measurement()
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        synchronize(device)
        m.seconds = time.perf_counter() - t0
        if cuda:
            m.peak_bytes = int(torch.cuda.max_memory_allocated(device))


def time_call(fn: Callable[[], object], device="cpu", warmup: int = 1, repeats: int = 3) -> dict:
    """Runs fn warmup times untimed, then repeats times; returns seconds (mean, min, each) and peak
    memory of the timed calls."""
    if repeats < 1:
        raise ValueError(f"time_call: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times, peak = [], None
    for _ in range(repeats):
        with measure(device) as m:
            fn()
        times.append(m.seconds)
        if m.peak_bytes is not None:
            peak = max(peak or 0, m.peak_bytes)
    return {"mean_s": sum(times) / len(times), "min_s": min(times), "times_s": times, "peak_bytes": peak}


def finite_mean(values) -> float:
    """Mean of the finite values (a PSNR of +inf for an exact copy would swamp a mean); nan if none."""
    vals = [float(v) for v in (values.flatten().tolist() if torch.is_tensor(values) else values)]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def mean_quality(reference: torch.Tensor, images: torch.Tensor, data_range: float = 2.0) -> dict:
    """{"psnr": mean per-image PSNR (dB; inf when all are identical), "ssim": mean SSIM (None for
    images under the 11-pixel window)} of (..., C, H, W) images against their references."""
    p = psnr(reference.float(), images.float(), data_range=data_range).double()
    mean_psnr = float("inf") if torch.isinf(p).all() else float(p[torch.isfinite(p)].mean())
    s = None
    if min(reference.shape[-2:]) >= 11:
        s = float(ssim(reference.float(), images.float(), data_range=data_range).mean())
    return {"psnr": mean_psnr, "ssim": s}
