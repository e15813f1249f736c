"""Cheap change signals the accelerators decide by.

A decision needs an estimate of how much an activation changed, not the exact figure, so it is
measured on a strided subsample (every `stride`-th token of an image, or every `stride`-th
sequence of the camera and motion axes, which are ordered token-innermost, so the subsample covers
every frame and view). The result stays on the device; the caller reads it on the host only where
a decision needs it.
"""
from __future__ import annotations

import torch


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
    return (x32 - r32).abs().mean() / r32.abs().mean().clamp_min(1e-12)
