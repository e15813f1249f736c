"""Adaptive SCM chain bypass (chain level): per model call and per block, run the block's whole
chain (spatial -> camera -> motion -> MLP) or add back its cached residual.

Reusing the residual r = y - x computed at call t0 at a later call t, the block outputs
x_t + r_t0 instead of x_t + r_t: the error is exactly r_t - r_t0. It is estimated from what can be
measured without running the block, the input drift since t0,

    error_t ~= k * |x_t - x_t0| / |x_t0|        (means of absolute values, on a token subsample)

with k the block's own ratio of residual change (relative to the output) to input change,
refitted online at every pair of consecutive full computes of that block:

    k = (|r_t1 - r_t0| / |y_t1|) / (|x_t1 - x_t0| / |x_t0|).

This is the estimate TeaCache and EasyCache make for the whole model, made per block: a block
whose residual is small or barely moves is bypassed often, a block that still reshapes its input
is run. The drift is taken against the input at the last full compute, not summed over calls, since
the error of the reuse depends on the net displacement; max_consecutive bounds how far a
mis-estimated k can go.

The residual is taken from a clone of the block input made before the chain runs: a host whose
blocks update activations in place (ComfyUI's) would otherwise turn `y - x` into zero. Bypassing
every block of a call is the whole-model skip of step-level caches.

Whole steps (step_threshold > 0). Before any block runs, the bypass may skip the model call
outright and answer with a forecast denoised image: the last one held (forecast_order 0), or
extrapolated linearly from the last two (order 1, the extrapolation DPM-Solver++ 2M makes), in the
phase s = arctan(sigma / sigma_data) (log(sigma) when the adapter cannot give the output space).
With the output held, Euler over the skipped calls is exactly one longer Euler
step from the call that ran (a test checks this), so the skips choose, per run, which sigmas of
the schedule are computed. The forecast error is modelled as

    error(s) ~= kappa * |s - s_b|               (order 0; order 1: kappa * |s - s_b| * |s - s_a|)

from the points s_b (and s_a) it extrapolates from, and kappa is measured, not assumed: every
call that runs first checks the forecast it would have made against its real output, so a run
whose trajectory bends gets fewer skips, a straight one more. A skip is taken while the estimate
is under step_threshold and fewer than step_max_skips calls were skipped in a row. Adapters that
can (the ComfyUI PREDICT_NOISE wrapper, the script and SV4D samplers) make this decision once per
sampler step through `Turbo4DRun.step`, on the CFG-combined denoised image, ahead of their per-call
work; holding that is the same as holding each stream's, since CFG is linear in them. Until a second
call has run there is nothing to measure kappa from; `kappa_prior` (the median a run reports as
`kappa_measured`, so a model's own) stands in for it, which lets the very first jump be long, as a
short schedule's is, instead of spending the second call at almost the first call's noise level.

Measured on the embedded model (BENCHMARKS.md): holding beats extrapolating at equal calls;
without a prior the adaptive choice beats a plain shorter Karras schedule at 12 of 20 calls and
falls about 1 dB behind it at 4-7 calls; with kappa_prior it is 2-7 dB ahead at 4-12 calls.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .base import Accelerator
from .cache import _check_common, _from_dict
from .registry import merge_spec, register
from .signals import mean
from .storage import TensorStore, nbytes

NAME = "bypass"


@dataclass(frozen=True)
class ChainBypassConfig:
    threshold: float = 0.08     # estimated relative output error under which a block is bypassed
    start_percent: float = 0.2
    end_percent: float = 0.95
    max_consecutive: int = 2    # bypasses in a row per block before it must run again
    storage: str = "native"
    signal_stride: int = 8      # every n-th token enters the estimate
    step_threshold: float = 0.0  # estimated relative error of a forecast model output under which a
                                 # whole model call is skipped (0 = never skip whole calls)
    step_max_skips: int = 3     # whole calls skipped in a row before one must run again
    forecast_order: int = 0     # 0: hold the last denoised image; 1: extrapolate linearly (see _position)
    kappa_prior: float = 0.0    # forecast-error rate to assume until one is measured (0 = measure first;
                                # from a calibration run: lets the second call be skipped too)

    def __post_init__(self):
        _check_common(self, "ChainBypassConfig")
        if self.threshold < 0:
            raise ValueError(f"ChainBypassConfig.threshold must be >= 0 (0 = never bypass), got {self.threshold}")
        if int(self.max_consecutive) < 0:
            raise ValueError(f"ChainBypassConfig.max_consecutive must be >= 0, got {self.max_consecutive}")
        if self.step_threshold < 0:
            raise ValueError(f"ChainBypassConfig.step_threshold must be >= 0 (0 = never skip a whole step), "
                             f"got {self.step_threshold}")
        if int(self.step_max_skips) < 0:
            raise ValueError(f"ChainBypassConfig.step_max_skips must be >= 0, got {self.step_max_skips}")
        if self.kappa_prior < 0:
            raise ValueError(f"ChainBypassConfig.kappa_prior must be >= 0 (0 = measure it first), got {self.kappa_prior}")
        if self.forecast_order not in (0, 1):
            raise ValueError(f"ChainBypassConfig.forecast_order must be 0 (hold) or 1 (linear), got {self.forecast_order}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ChainBypassConfig":
        return _from_dict(cls, d)


class _Entry:
    """One block: the stored residual, input and residual subsamples and output scale of its last
    full compute, the fitted ratio k (device scalar, None until two computes), bypasses in a row."""

    __slots__ = ("residual", "x_ref", "r_ref", "y_scale", "k", "consecutive")

    def __init__(self):
        self.residual = self.x_ref = self.r_ref = self.y_scale = self.k = None
        self.consecutive = 0


def _position(sigma: float, space) -> float:
    """Where a call is on the path from noise to image, in the variable the denoised image moves
    most evenly in: the phase theta = arccos(sqrt(c_skip)) = arctan(sigma / sigma_data) when the
    adapter gives the output space (EDM and v parameterisations alike), else log(sigma). Measured on
    the embedded model: 1-2.5 dB closer to full compute than log(sigma) at equal calls, since
    log(sigma) spends the error budget on the high-noise calls where the image barely moves."""
    if space is not None:
        return math.atan(sigma / space.sigma_data)
    return math.log(sigma)


class _Outputs:
    """The whole-call forecast: the outputs of the last two calls that ran, at their positions s,
    the measured curvature kappa of the forecast error, and skips in a row."""

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


class ChainBypassState:
    def __init__(self):
        self.blocks: dict = {}
        self.outputs = _Outputs()

    def reset(self) -> None:
        self.blocks.clear()
        self.outputs = _Outputs()

    def nbytes(self) -> int:
        return (sum(nbytes(e.residual) + nbytes(e.x_ref) + nbytes(e.r_ref) for e in self.blocks.values())
                + sum(nbytes(t) for _, t in self.outputs.points))


class ChainBypass(Accelerator):
    name = NAME
    state_class = ChainBypassState

    def __init__(self, config: Optional[ChainBypassConfig] = None):
        super().__init__()
        self.config = ChainBypassConfig.from_dict(config)
        self.store = TensorStore(self.config.storage)
        self.bypassed = self.ran = 0
        self.steps_skipped = self.steps_ran = 0
        self.kappas: list = []  # forecast-error rates measured this run (for kappa_prior)
        self.last_step_estimate = None  # (estimate, threshold) of the latest whole-step decision

    def reset(self) -> None:
        super().reset()
        self.bypassed = self.ran = 0
        self.steps_skipped = self.steps_ran = 0
        self.kappas = []
        self.last_step_estimate = None

    def gates_steps(self) -> bool:
        return self.config.step_threshold > 0

    def call(self, dispatch, x, nxt, space=None):
        """The whole model call: skip it with a forecast output, or run it and learn from it.
        Outputs are kept and forecast as denoised images when the adapter gives their `space`."""
        cfg = self.config
        step = dispatch.step
        if not dispatch.whole_steps:  # decided ahead, in Turbo4DRun.step
            return nxt()
        self.last_step_estimate = None
        if step is None or cfg.step_threshold <= 0 or step.sigma <= 0:
            return nxt()
        st = self.state(dispatch)
        o = st.outputs
        s = _position(step.sigma, space)
        kappa = o.kappa if o.kappa is not None else (cfg.kappa_prior or None)
        if (cfg.start_percent <= step.percent <= cfg.end_percent and o.ready(cfg.forecast_order)
                and kappa is not None and o.skips < cfg.step_max_skips):
            estimate = kappa * o.span(s, cfg.forecast_order)
            self.last_step_estimate = (estimate, cfg.step_threshold)
            if dispatch.stats is not None:
                dispatch.stats.signal("bypass.step", estimate, cfg.step_threshold)
            if estimate < cfg.step_threshold:
                o.skips += 1
                self.steps_skipped += 1
                if dispatch.stats is not None:
                    for block in range(dispatch.stats.blocks):
                        dispatch.stats.chain_bypassed(step, block, x.shape[0])
                f = o.forecast(s, cfg.forecast_order)
                return f if space is None else space.output(f).to(f.dtype)
        out = nxt()
        self.steps_ran += 1
        o.skips = 0
        if step.percent > cfg.end_percent:
            st.outputs = _Outputs()  # no skip can follow: free it now
            return out
        kept = out.detach() if space is None else space.denoised(out.detach())
        o.like = (out.dtype, out.device)
        if o.ready(cfg.forecast_order):
            # How far off the forecast for this call would have been: kappa for the next ones.
            err = (o.forecast(s, cfg.forecast_order).float() - kept.float()).abs().mean() / \
                kept.float().abs().mean().clamp_min(1e-12)
            o.kappa = float(err) / max(o.span(s, cfg.forecast_order), 1e-12)  # one host sync per call that runs
            self.kappas.append(o.kappa)
        o.points = (o.points + [(s, self.store.keep(kept.clone()))])[-2:]
        return out

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.signal_stride
        x = x.detach()
        return x[:, ::s] if s > 1 else x

    def chain(self, dispatch, block, x, nxt):
        cfg = self.config
        step = dispatch.step
        if step is None or cfg.threshold <= 0:
            return nxt(x)
        st = self.state(dispatch)
        e = st.blocks.get(block)
        if e is not None and e.residual is not None and e.residual.shape != x.shape:
            e = st.blocks[block] = _Entry()
        if step.percent > cfg.end_percent:
            st.blocks.pop(block, None)  # never bypassed again in this run: free it now
            self.ran += 1
            return nxt(x)
        if e is None:
            e = st.blocks[block] = _Entry()
        if (step.percent >= cfg.start_percent and e.k is not None and e.residual is not None
                and e.consecutive < cfg.max_consecutive):
            drift = mean((self._sample(x).float() - e.x_ref).abs()) / mean(e.x_ref.abs()).clamp_min(1e-12)
            estimate = float(e.k * drift)  # the one host sync of this block
            if dispatch.stats is not None:
                dispatch.stats.signal(f"bypass.b{block}", estimate, cfg.threshold)
            if estimate < cfg.threshold:
                e.consecutive += 1
                self.bypassed += 1
                if dispatch.stats is not None:
                    dispatch.stats.chain_bypassed(step, block, x.shape[0])
                return x + self.store.get(e.residual, x)
        # Run the block. The clone is what makes the residual real under in-place hosts.
        x_in = x.clone()
        y = nxt(x)
        self.ran += 1
        e.consecutive = 0
        residual = y - x_in
        xs, rs = self._sample(x_in).float(), self._sample(residual).float()
        y_scale = mean((xs + rs).abs()).clamp_min(1e-12)
        if e.x_ref is not None:
            dx = mean((xs - e.x_ref).abs()) / mean(e.x_ref.abs()).clamp_min(1e-12)
            dr = mean((rs - e.r_ref).abs()) / y_scale
            e.k = dr / dx.clamp_min(1e-12)
        e.residual = self.store.keep(residual)  # a fresh tensor: nobody else holds it
        e.x_ref, e.r_ref, e.y_scale = xs.clone(), rs.clone(), y_scale
        return y

    def summary(self) -> dict:
        return {"config": self.config.to_dict(), "bypassed": self.bypassed, "ran": self.ran,
                "steps_skipped": self.steps_skipped, "steps_ran": self.steps_ran,
                "kappa_measured": statistics.median_high(self.kappas) if self.kappas else None}


def apply_chain_bypass(specs, config: Optional[ChainBypassConfig] = None) -> list:
    """The spec list with chain bypass set to `config` (defaults if None)."""
    return merge_spec(specs, NAME, ChainBypassConfig.from_dict(config))


register(NAME, 0, ChainBypass)
