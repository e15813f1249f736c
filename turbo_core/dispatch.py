"""The one door every SCM sub-attention goes through.

The network never calls attention directly. Each block hands the dispatch its sub-attention as a
`compute(seqs, index)` function over axis sequences (see `layout.py`) and its whole chain as a
`chain(x)` function; the dispatch passes them through the active accelerators in order, and each
accelerator may answer from its cache, narrow the work to a subset of sequences, or let it run.
`compute` must accept any subset: `seqs` are the selected sequences and `index` their positions
among all sequences of the axis (None = all of them, in order).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .layout import AXES, SCMLayout
from .run import StepInfo

Compute = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
Chain = Callable[[torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(S, heads, L, d) -> (S, heads, L, d) with PyTorch's fused kernels (CPU and CUDA)."""
    return F.scaled_dot_product_attention(q, k, v)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(d)) v, computed in fp32; for tests."""
    scale = q.shape[-1] ** -0.5
    w = torch.einsum("shld,shmd->shlm", q.float(), k.float()) * scale
    return torch.einsum("shlm,shmd->shld", w.softmax(-1), v.float()).to(q.dtype)


BACKENDS = {"sdpa": sdpa, "naive": naive_attention}


class SCMDispatch:
    """Routes one model call's sub-attentions and chains through the accelerators."""

    def __init__(self, layout: SCMLayout, step: Optional[StepInfo] = None,
                 accelerators: Sequence = (), backend: str = "sdpa", stats=None):
        # A backend is a name from BACKENDS or an attention function itself (q, k, v) -> o, e.g. a
        # counting wrapper in tests or a fused kernel a host provides.
        if callable(backend):
            attention = backend
        elif backend in BACKENDS:
            attention = BACKENDS[backend]
        else:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {sorted(BACKENDS)} "
                             f"or a function (q, k, v) -> o")
        self.layout = layout
        self.step = step
        self.accelerators = list(accelerators)
        self.attention = attention
        self.stats = stats

    def attend(self, block: int, axis: str, seqs: torch.Tensor, compute: Compute) -> torch.Tensor:
        if axis not in AXES:
            raise ValueError(f"unknown SCM axis {axis!r}")
        counted = self._counted(block, axis, compute)

        def run_from(i: int, s: torch.Tensor, index):
            if i == len(self.accelerators):
                return counted(s, index)
            acc = self.accelerators[i]
            return acc.attend(self, block, axis, s, index, lambda s2, idx2: run_from(i + 1, s2, idx2))

        return run_from(0, seqs, None)

    def chain(self, block: int, x: torch.Tensor, chain: Chain) -> torch.Tensor:
        def run_from(i: int, h: torch.Tensor):
            if i == len(self.accelerators):
                if self.stats is not None:
                    self.stats.chain_ran(self.step, block)
                return chain(h)
            return self.accelerators[i].chain(self, block, h, lambda h2: run_from(i + 1, h2))

        return run_from(0, x)

    def _counted(self, block: int, axis: str, compute: Compute) -> Compute:
        if self.stats is None:
            return compute
        total = self.layout.axis_shape(axis)[0]

        def wrapped(s, index):
            self.stats.attention_ran(self.step, block, axis, computed=s.shape[0], total=total)
            return compute(s, index)

        return wrapped


class FullCompute(SCMDispatch):
    """A dispatch with no accelerators and no counters: the plain full-compute forward."""

    def __init__(self, layout: SCMLayout, backend: str = "sdpa"):
        super().__init__(layout, None, (), backend=backend, stats=None)
