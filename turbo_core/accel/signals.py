"""Cheap change signals the accelerators decide by.

A decision needs an estimate of how much an activation changed, not the exact figure, so it is
measured on a strided subsample (every `stride`-th token of an image, or every `stride`-th
sequence of the camera and motion axes, which are ordered token-innermost, so the subsample covers
every frame and view). The result stays on the device; the caller reads it on the host only where
a decision needs it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Optional, Sequence

import torch

# While one model call is split over processes (turbo_core.parallel) each holds a share of the
# activations; the mean a decision reads must then be over all of them, or the processes would
# decide differently (and their collectives fall out of step). The split installs the reduction:
# a list of tensors -> the list of their means over every process, in one collective.
Reduce = Callable[[Sequence[torch.Tensor]], list]
_REDUCE: ContextVar[Optional[Reduce]] = ContextVar("turbo4d_signal_mean", default=None)


def means(*xs: torch.Tensor) -> list:
    """[x.mean() for x in xs] as float32 0-dim tensors: over this process's xs, or inside
    `reduced` over every process's share of the call (the one place accelerator signals are
    averaged). The means one decision needs are taken together: one all-reduce, not one each."""
    reduce = _REDUCE.get()
    return [x.float().mean() for x in xs] if reduce is None else reduce([x.float() for x in xs])


def mean(x: torch.Tensor) -> torch.Tensor:
    """x.mean() as a float32 0-dim tensor (see `means`)."""
    return means(x)[0]


@contextmanager
def reduced(reduce: Reduce):
    """Signal means inside this context go through `reduce` (the parallel engine's all-reduce)."""
    token = _REDUCE.set(reduce)
    try:
        yield
    finally:
        _REDUCE.reset(token)


def subsample_tokens(x: torch.Tensor, axis: str, stride: int) -> torch.Tensor:
    """A strided view of axis sequences (S, L, C): spatial sequences are images (subsample their
    tokens), camera/motion sequences are token positions (subsample the sequences). A view: clone
    it before keeping it."""
    if stride <= 1:
        return x
    if axis == "spatial":
        return x[:, ::stride]
    return x[::stride]


def relative_l1(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """mean|x - ref| / mean|ref|, a 0-dim float32 tensor on x's device."""
    x32, r32 = x.float(), ref.float()
    num, den = means((x32 - r32).abs(), r32.abs())
    return num / den.clamp_min(1e-12)
