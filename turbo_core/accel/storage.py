"""Where the accelerators keep their cached activations: same dtype and device as the model
("native"), in 16 bits on the same device ("fp16"), or in 16 bits in CPU memory ("cpu", for GPUs
that are short of memory; every reuse then pays a host-to-device copy).

Every tensor handed out is a new tensor, never the stored one: a host network that updates an
attention output in place (ComfyUI blocks do such things) must not be able to corrupt the cache.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Optional

import torch

STORAGE_MODES = ("native", "fp16", "cpu")


class CacheBudget:
    """Where stored tensors go while a budget is active (`cache_budget`), whatever a store's mode
    but "cpu": the tensor's own device ("gpu") while the stored bytes there stay within
    `gpu_bytes`, then CPU memory (pinned for GPU tensors, so reuses copy back asynchronously).
    `half` stores float32 tensors in that 16-bit dtype (bf16 keeps fp32's range; None keeps the
    mode's dtype). It counts the bytes each place
    holds now and at most: a tensor leaves the count when its accelerator drops it."""

    def __init__(self, gpu_bytes: int, half: Optional[torch.dtype] = None):
        if int(gpu_bytes) < 0:
            raise ValueError(f"CacheBudget.gpu_bytes must be >= 0, got {gpu_bytes}")
        if half not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"CacheBudget.half must be None, torch.float16 or torch.bfloat16, got {half}")
        self.gpu_bytes, self.half = int(gpu_bytes), half
        self.live = {"gpu": 0, "cpu": 0}
        self.peak = {"gpu": 0, "cpu": 0}

    def _track(self, t: torch.Tensor, place: str) -> torch.Tensor:
        n = nbytes(t)
        self.live[place] += n
        self.peak[place] = max(self.peak[place], self.live[place])
        weakref.finalize(t, self._release, place, n)
        return t

    def _release(self, place: str, n: int) -> None:
        self.live[place] -= n

    def fits_gpu(self, n: int) -> bool:
        return self.live["gpu"] + n <= self.gpu_bytes

    def summary(self) -> dict:
        return {"gpu_limit_mb": round(self.gpu_bytes / 2**20, 1),
                "gpu_peak_mb": round(self.peak["gpu"] / 2**20, 1), "cpu_peak_mb": round(self.peak["cpu"] / 2**20, 1),
                "half": None if self.half is None else str(self.half).replace("torch.", "")}


_BUDGET: contextvars.ContextVar = contextvars.ContextVar("turbo4d_cache_budget", default=None)


@contextlib.contextmanager
def cache_budget(budget: Optional[CacheBudget]):
    """Stores placed by `budget` inside the block (None: as their modes say)."""
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def check_storage(mode: str, owner: str) -> None:
    if mode not in STORAGE_MODES:
        raise ValueError(f"{owner}.storage must be one of {STORAGE_MODES}, got {mode!r}")


def nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class TensorStore:
    def __init__(self, mode: str = "native"):
        check_storage(mode, "TensorStore")
        self.mode = mode

    def _dtype(self, t: torch.Tensor) -> torch.dtype:
        # bf16 stays bf16: it already takes 16 bits, and fp16 could overflow where bf16 does not.
        if self.mode != "native" and t.dtype in (torch.float32, torch.float64):
            return torch.float16
        return t.dtype

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A stored copy of `t`, detached: a cache that held autograd graphs across steps would
        keep every step's activations alive."""
        t = t.detach()
        budget = _BUDGET.get()
        if budget is not None:
            dtype = budget.half if budget.half is not None and t.dtype == torch.float32 else self._dtype(t)
            if self.mode != "cpu" and budget.fits_gpu(t.numel() * dtype.itemsize):
                return budget._track(t.to(dtype, copy=True), "gpu")
            out = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=t.is_cuda)
            out.copy_(t)
            return budget._track(out, "cpu")
        if self.mode == "cpu":
            out = torch.empty(t.shape, dtype=self._dtype(t), device="cpu",
                              pin_memory=t.is_cuda)
            out.copy_(t)  # a blocking device-to-host copy: the result is complete when we return
            return out
        return t.to(self._dtype(t), copy=True)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Stores a tensor the caller has just made and hands over (no one else holds it): kept
        as it is where the mode allows, saving the copy `put` makes."""
        budget = _BUDGET.get()
        if self.mode == "native":
            if budget is None:
                return t.detach()
            if (budget.half is None or t.dtype != torch.float32) and budget.fits_gpu(nbytes(t)):
                return budget._track(t.detach(), "gpu")
        return self.put(t)

    def get(self, stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A new tensor with the stored values in `like`'s dtype and device."""
        if stored.device == like.device and stored.dtype == like.dtype:
            return stored.clone()
        return stored.to(device=like.device, dtype=like.dtype, non_blocking=stored.is_pinned())

    def gather(self, stored: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the stored tensor, as a new tensor like `like`."""
        rows = stored.index_select(0, index.to(stored.device))
        return rows.to(device=like.device, dtype=like.dtype, non_blocking=rows.is_pinned())

    def update(self, stored: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        """stored[index] = values. On the CPU store the device-to-host copy blocks, which also
        orders it after any pending host-to-device read of the same tensor."""
        stored.index_copy_(0, index.to(stored.device), values.detach().to(device=stored.device, dtype=stored.dtype))
