"""Where the accelerators keep their cached activations: same dtype and device as the model
("native"), in 16 bits on the same device ("fp16"), or in 16 bits in CPU memory ("cpu", for GPUs
that are short of memory; every reuse then pays a host-to-device copy).

Every tensor handed out is a new tensor, never the stored one: a host network that updates an
attention output in place (ComfyUI blocks do such things) must not be able to corrupt the cache.
"""
from __future__ import annotations

import torch

from ..memory import active_budget, nbytes

STORAGE_MODES = ("native", "fp16", "cpu")


def check_storage(mode: str, owner: str) -> None:
    if mode not in STORAGE_MODES:
        raise ValueError(f"{owner}.storage must be one of {STORAGE_MODES}, got {mode!r}")


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
        budget = active_budget()
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
        budget = active_budget()
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
