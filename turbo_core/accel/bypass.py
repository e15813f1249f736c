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

Whole steps are the step skip's (step_skip.py), a mechanism of its own that the Chain Bypass node
sets as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Accelerator
from .config import MechanismConfig
from .signals import means
from .storage import TensorStore, nbytes

NAME = "bypass"


@dataclass(frozen=True)
class ChainBypassConfig(MechanismConfig):
    threshold: float = 0.08     # estimated relative output error under which a block is bypassed
    start_percent: float = 0.2
    end_percent: float = 0.95
    max_consecutive: int = 2    # bypasses in a row per block before it must run again
    storage: str = "native"
    signal_stride: int = 8      # every n-th token enters the estimate

    def validate(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"ChainBypassConfig.threshold must be >= 0 (0 = never bypass), got {self.threshold}")
        if int(self.max_consecutive) < 0:
            raise ValueError(f"ChainBypassConfig.max_consecutive must be >= 0, got {self.max_consecutive}")


# Per block, a threshold cost more fidelity than it saved on the embedded model (BENCHMARKS.md), so
# the presets leave it at 0 and the step skip carries the saving; the Chain Bypass node's settings
# show these values beside the step skip's.
_OFF = ChainBypassConfig(threshold=0.0, start_percent=0.0, end_percent=1.0)
PRESETS = {"off": None, "quality": _OFF, "balanced": _OFF, "fast": _OFF}


class _Entry:
    """One block: the stored residual, input and residual subsamples of its last full compute, the
    fitted ratio k (device scalar, None until two computes), bypasses in a row."""

    __slots__ = ("residual", "x_ref", "r_ref", "k", "consecutive")

    def __init__(self):
        self.residual = self.x_ref = self.r_ref = self.k = None
        self.consecutive = 0


class ChainBypassState:
    def __init__(self):
        self.blocks: dict = {}

    def reset(self) -> None:
        self.blocks.clear()

    def nbytes(self) -> int:
        return sum(nbytes(e.residual) + nbytes(e.x_ref) + nbytes(e.r_ref) for e in self.blocks.values())


class ChainBypass(Accelerator):
    name = NAME
    state_class = ChainBypassState

    def __init__(self, config: Optional[ChainBypassConfig] = None):
        super().__init__()
        self.config = ChainBypassConfig.from_dict(config)
        self.store = TensorStore(self.config.storage)

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
            return nxt(x)
        if e is None:
            e = st.blocks[block] = _Entry()
        if (step.percent >= cfg.start_percent and e.k is not None and e.residual is not None
                and e.consecutive < cfg.max_consecutive):
            moved, scale = means((self._sample(x).float() - e.x_ref).abs(), e.x_ref.abs())
            drift = moved / scale.clamp_min(1e-12)
            estimate = float(e.k * drift)  # the one host sync of this block
            if dispatch.stats is not None:
                dispatch.stats.signal(f"bypass.b{block}", estimate, cfg.threshold)
            if estimate < cfg.threshold:
                e.consecutive += 1
                if dispatch.stats is not None:
                    dispatch.stats.chain_bypassed(block)
                return x + self.store.get(e.residual, x)
        # Run the block. The clone is what makes the residual real under in-place hosts.
        x_in = x.clone()
        y = nxt(x)
        e.consecutive = 0
        residual = y - x_in
        xs, rs = self._sample(x_in).float(), self._sample(residual).float()
        if e.x_ref is not None:
            y_scale, moved, scale, changed = means((xs + rs).abs(), (xs - e.x_ref).abs(), e.x_ref.abs(),
                                                   (rs - e.r_ref).abs())
            dx = moved / scale.clamp_min(1e-12)
            dr = changed / y_scale.clamp_min(1e-12)
            e.k = dr / dx.clamp_min(1e-12)
        e.residual = self.store.keep(residual)  # a fresh tensor: nobody else holds it
        e.x_ref, e.r_ref = xs.clone(), rs.clone()
        return y
