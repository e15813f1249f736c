"""Whole-step skip (step level): before a sampler step's model calls, skip them all and answer with a
forecast denoised image, while the forecast's measured error stays under a threshold.

The forecast is the last denoised image held (forecast_order 0), or extrapolated linearly from the
last two (order 1, the extrapolation DPM-Solver++ 2M makes), in the phase s = arctan(sigma /
sigma_data) (log(sigma) when the adapter cannot give the output space). With the output held,
Euler over the skipped steps is exactly one longer Euler step from the step that ran (a test checks
this), so the skips choose, per run, which sigmas of the schedule are computed. The forecast error
is modelled as

    error(s) ~= kappa * |s - s_b|               (order 0; order 1: kappa * |s - s_b| * |s - s_a|)

from the points s_b (and s_a) it extrapolates from, and kappa is measured, not assumed: every step
that runs first checks the forecast it would have made against its real output, so a run whose
trajectory bends gets fewer skips, a straight one more. A skip is taken while the estimate is under
step_threshold and fewer than step_max_skips steps were skipped in a row. Until a second step has
run there is nothing to measure kappa from; `kappa_prior` (the median a run reports as
`kappa_measured`, so a model's own) stands in for it, which lets the very first jump be long, as a
short schedule's is, instead of spending the second call at almost the first call's noise level.

The decision is made once per sampler step through `Turbo4DRun.step`, on the CFG-combined denoised
image, ahead of the adapter's per-step work (the ComfyUI PREDICT_NOISE wrapper, the script and SV4D
samplers); holding that is the same as holding each stream's, since CFG is linear in them. Users
find it in the Chain Bypass node (step_threshold and the inputs after it); its change signal is
plotted with the bypass's ("bypass.step").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..schedule import StepInfo
from .base import StepAccelerator, StepDecision
from .config import MechanismConfig
from .storage import TensorStore, nbytes

NAME = "step"
SIGNAL = "bypass.step"


@dataclass(frozen=True)
class StepSkipConfig(MechanismConfig):
    step_threshold: float = 0.0  # estimated relative error of a forecast model output under which a
                                 # whole step is skipped (0 = never skip a whole step)
    step_max_skips: int = 3     # whole steps skipped in a row before one must run again
    forecast_order: int = 0     # 0: hold the last denoised image; 1: extrapolate linearly
    kappa_prior: float = 0.0    # forecast-error rate to assume until one is measured (0 = measure first;
                                # from a calibration run: lets the second call be skipped too)
    start_percent: float = 0.2
    end_percent: float = 0.95
    storage: str = "native"

    def validate(self) -> None:
        if self.step_threshold < 0:
            raise ValueError(f"StepSkipConfig.step_threshold must be >= 0 (0 = never skip a whole step), "
                             f"got {self.step_threshold}")
        if int(self.step_max_skips) < 0:
            raise ValueError(f"StepSkipConfig.step_max_skips must be >= 0, got {self.step_max_skips}")
        if self.kappa_prior < 0:
            raise ValueError(f"StepSkipConfig.kappa_prior must be >= 0 (0 = measure it first), got {self.kappa_prior}")
        if self.forecast_order not in (0, 1):
            raise ValueError(f"StepSkipConfig.forecast_order must be 0 (hold) or 1 (linear), got {self.forecast_order}")


# Whole steps bounded by the error estimate alone (no count limit, and the end of the schedule may
# be skipped too): a count limit or an always-run tail spends calls at the lowest noise levels, where
# the denoised image no longer moves, so the number of model calls follows the error budget, not the
# step count. kappa_prior 0.4 is on the careful side of what the embedded model measures (it only
# shortens the first jump); BENCHMARKS.md has the measurements.
_STEPS = dict(start_percent=0.0, end_percent=1.0, kappa_prior=0.4, step_max_skips=10_000)
PRESETS = {
    "off": None,
    "quality": StepSkipConfig(step_threshold=0.03, **_STEPS),
    "balanced": StepSkipConfig(step_threshold=0.1, **_STEPS),
    "fast": StepSkipConfig(step_threshold=0.2, **_STEPS),
}


def _position(sigma: float, space) -> float:
    """Where a step is on the path from noise to image, in the variable the denoised image moves
    most evenly in: the phase theta = arccos(sqrt(c_skip)) = arctan(sigma / sigma_data) when the
    adapter gives the output space (EDM and v parameterisations alike), else log(sigma). Measured on
    the embedded model: closer to full compute than log(sigma) at equal calls, since log(sigma)
    spends the error budget on the high-noise steps where the image barely moves."""
    if space is not None:
        return math.atan(sigma / space.sigma_data)
    return math.log(sigma)


class _Outputs:
    """The forecast: the outputs of the last two steps that ran, at their positions s, the measured
    rate kappa of the forecast error, and skips in a row."""

    __slots__ = ("points", "kappa", "skips", "like")

    def __init__(self):
        self.points: list = []   # [(s, output as stored)], oldest first, at most two
        self.kappa = None        # float, None until a forecast could be checked
        self.skips = 0
        self.like = None         # (dtype, device) of the real outputs

    def ready(self, order: int) -> bool:
        return len(self.points) > order

    def forecast(self, s: float, order: int) -> torch.Tensor:
        dtype, device = self.like
        s_b, b = self.points[-1]
        b = b.to(device=device, dtype=torch.float32)
        if order == 0:
            return b.to(dtype)
        s_a, a = self.points[-2]
        a = a.to(device=device, dtype=torch.float32)
        return torch.lerp(a, b, (s - s_a) / (s_b - s_a)).to(dtype)  # t > 1: extrapolation

    def span(self, s: float, order: int) -> float:
        """How far s is from the points a forecast of this order extrapolates from."""
        d = abs(s - self.points[-1][0])
        return d if order == 0 else d * abs(s - self.points[-2][0])

    def nbytes(self) -> int:
        return sum(nbytes(t) for _, t in self.points)


class StepSkip(StepAccelerator):
    name = NAME

    def __init__(self, config: Optional[StepSkipConfig] = None):
        super().__init__()
        self.config = StepSkipConfig.from_dict(config)
        self.store = TensorStore(self.config.storage)
        self.outputs = _Outputs()

    def reset(self) -> None:
        self.outputs = _Outputs()

    def cache_bytes(self) -> int:
        return self.outputs.nbytes()

    def gates_steps(self) -> bool:
        return self.config.step_threshold > 0

    def decide(self, step: StepInfo, space) -> Optional[StepDecision]:
        cfg, o = self.config, self.outputs
        if step.sigma <= 0:
            return None
        kappa = o.kappa if o.kappa is not None else (cfg.kappa_prior or None)
        if (cfg.start_percent <= step.percent <= cfg.end_percent and o.ready(cfg.forecast_order)
                and kappa is not None and o.skips < cfg.step_max_skips):
            estimate = kappa * o.span(_position(step.sigma, space), cfg.forecast_order)
            return StepDecision(estimate < cfg.step_threshold, SIGNAL, estimate, cfg.step_threshold)
        return StepDecision(False)

    def forecast(self, step: StepInfo, space) -> torch.Tensor:
        o = self.outputs
        o.skips += 1
        f = o.forecast(_position(step.sigma, space), self.config.forecast_order)
        return f if space is None else space.output(f).to(f.dtype)

    def learn(self, step: StepInfo, out: torch.Tensor, space, stats) -> None:
        cfg, o = self.config, self.outputs
        o.skips = 0
        if step.percent > cfg.end_percent:
            self.outputs = _Outputs()  # no skip can follow: free it now
            return
        s = _position(step.sigma, space)
        kept = out.detach() if space is None else space.denoised(out.detach())
        o.like = (out.dtype, out.device)
        if o.ready(cfg.forecast_order):
            # How far off the forecast for this step would have been: kappa for the next ones.
            err = (o.forecast(s, cfg.forecast_order).float() - kept.float()).abs().mean() / \
                kept.float().abs().mean().clamp_min(1e-12)
            o.kappa = float(err) / max(o.span(s, cfg.forecast_order), 1e-12)  # one host sync per step that runs
            if stats is not None:
                stats.kappas.append(o.kappa)
        o.points = (o.points + [(s, self.store.keep(kept.clone()))])[-2:]
