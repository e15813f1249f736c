"""What every benchmark does around a timed run on a device: wait for it, reset and read the
allocator's peak. On a CPU the peak is None (the benchmarks report no CPU memory figure)."""
from __future__ import annotations

import gc
from typing import Optional

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    """Waits for the device's queued work, so that a wall-clock reading covers it."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    """Frees what the last row left and starts the allocator's peak afresh for the next."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


def peak_gb(device) -> Optional[float]:
    b = peak_bytes(device)
    return None if b is None else round(b / 2**30, 2)
