"""The memory bound of the per-call reuse mechanisms (block reuse, token reuse): what they cache
is bounded by a share of a full model call's peak memory, or by an explicit size.

The full call's peak is taken where it can be measured without a host sync: on CUDA the
allocator's statistics (host-side counters), read when the run's first call reaches its first
cached block, as the peak since the call began less what was allocated when it began. The blocks
before it (at least one) ran in full, and every block of these networks has the same working set,
so that reading is the call's working set or below it (the weights and whatever else the process
holds are left out): the bound only errs small. Where the statistics cannot say (CPU, or an
earlier, larger peak that this call did not raise), an estimate stands in: ESTIMATE_ACTIVATIONS
tensors of the stream's size, counted.

The Turbo4D Memory node's bound (a `memory.CacheBudget` active around the run) caps it further:
each per-call cache reserves its bound in the budget when it fixes it, so the run's caches together
never take more of the GPU than the node allows.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..memory import active_budget

# A transformer block's working set in stream-sized tensors: the stream and the block input, q, k,
# v and the attention output, the MLP's hidden layer (4 wide) and its activation. Measured on an
# H100 GPU the full calls of the embedded model and the large configuration peaked at about 14.
ESTIMATE_ACTIVATIONS = 12


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype a cached activation of `dtype` is kept in: bf16 stays bf16, everything else
    fp16 (residuals are far inside fp16's range, and fp16 keeps three more mantissa bits)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def check_bound(cfg) -> None:
    owner = type(cfg).__name__
    if not 0.0 < cfg.memory_fraction <= 1.0:
        raise ValueError(f"{owner}.memory_fraction must be within (0, 1], got {cfg.memory_fraction}")
    if cfg.max_cache_mb < 0:
        raise ValueError(f"{owner}.max_cache_mb must be >= 0 (0 = from memory_fraction), got {cfg.max_cache_mb}")


class CallBound:
    """The bound of one stream, measured on its first call."""

    def __init__(self):
        self.peak_before: Optional[int] = None
        self.allocated_before: Optional[int] = None
        self.bytes: Optional[int] = None
        self.measured = False  # True: from the allocator's peak; False: from the estimate

    def begin(self, x: torch.Tensor) -> None:
        """At the start of the run's first call (before any block)."""
        if x.is_cuda:
            self.peak_before = int(torch.cuda.max_memory_allocated(x.device))
            self.allocated_before = int(torch.cuda.memory_allocated(x.device))

    def settle(self, cfg, stream: torch.Tensor) -> int:
        """The bound in bytes, fixed at the first cached block of the first call."""
        if self.bytes is None:
            if cfg.max_cache_mb > 0:
                self.bytes = int(cfg.max_cache_mb * 2**20)
            else:
                ref = None
                if stream.is_cuda and self.peak_before is not None:
                    now = int(torch.cuda.max_memory_allocated(stream.device))
                    if now > self.peak_before:
                        ref, self.measured = now - self.allocated_before, True
                if ref is None:
                    ref = ESTIMATE_ACTIVATIONS * stream.numel() * stream.element_size()
                self.bytes = int(cfg.memory_fraction * ref)
            budget = active_budget()
            if budget is not None:  # the Turbo4D Memory node's bound, shared by every cache of the run
                self.bytes = budget.reserve(self.bytes)
        return self.bytes
