"""Where one model call sits in a sampling run: its StepInfo, and its position in the schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class StepInfo:
    """One model call. `index` counts calls of this stream since the run began (a sampler that
    evaluates the model twice per step, like Heun, makes two calls); `percent` is how far the
    noise level is through the schedule, 0 at the first sigma and 1 at the last."""

    index: int
    sigma: float
    percent: float
    total: int  # model calls the schedule implies for a one-call-per-step sampler
    stream: str  # which forward this is (cond, uncond, both batched): caches are per stream
    sigma_next: Optional[float] = None  # the schedule's next sigma below this one (None: no schedule)


def schedule_position(sigma: float, sample_sigmas: Optional[Sequence[float] | torch.Tensor]) -> tuple[float, int]:
    """(percent, total steps) of `sigma` within a sampling schedule. Sigmas between two schedule
    entries (second-order samplers) get an interpolated percent. Plain Python on a list of floats
    (called at every model call and every skipped step; a tensor is read to the host first)."""
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return 0.0, 1
    if isinstance(sample_sigmas, torch.Tensor):
        s = sample_sigmas.detach().flatten().double().cpu().tolist()
    else:
        s = [float(v) for v in sample_sigmas]
    total = len(s) - 1
    s_eval = s[:-1] if s[-1] <= 0 else s  # the final 0 is never evaluated
    if len(s_eval) < 2:
        return 0.0, total
    # Schedules are decreasing; find the segment holding sigma.
    sig = float(sigma)
    if sig >= s_eval[0]:
        return 0.0, total
    if sig <= s_eval[-1]:
        return 1.0, total
    i = sum(1 for v in s_eval if v > sig) - 1
    hi, lo = s_eval[i], s_eval[i + 1]
    frac = (hi - sig) / max(hi - lo, 1e-12)
    return (i + frac) / (len(s_eval) - 1), total


def next_sigma(sigma: float, sample_sigmas: Optional[Sequence[float]]) -> Optional[float]:
    """The first sigma of a decreasing schedule (a list of floats) below `sigma`: where an Euler
    step from `sigma` lands (0 after the last); None without a schedule."""
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return None
    sig = float(sigma)
    return next((float(v) for v in sample_sigmas if float(v) < sig), 0.0)
