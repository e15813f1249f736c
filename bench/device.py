"""What every benchmark does around a timed run on a device: wait for it, reset and read the
allocator's peak, time its parts. On a CPU the peak is None (the benchmarks report no CPU memory
figure)."""
from __future__ import annotations

import gc
import time
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


def allocated_gb(device) -> Optional[float]:
    """What is allocated now (at a row's start: the weights and whatever an earlier row still holds)."""
    return round(torch.cuda.memory_allocated(device) / 2**30, 2) if is_cuda(device) else None


def call_ms(fn, calls: int, device) -> list:
    """ms of each of `calls` calls of fn, in call order: CUDA events around each (one synchronise
    at the end) on a GPU, the wall clock elsewhere."""
    if not is_cuda(device):
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in ev]


class EventTimer:
    """Intervals per category on `device`: CUDA events on a GPU (read after one synchronise per
    step), the wall clock elsewhere. A benchmark's subclass marks the intervals (forward hooks on
    modules, a timed dispatch's sub-attentions); `categories` are its kinds, "rest" among them:
    the step's time the others do not cover."""

    categories: tuple = ("rest",)

    def __init__(self, device):
        self.device = device
        self.cuda = is_cuda(device)
        self.marks, self.handles, self._open_at = [], [], {}
        self.classes = {}  # dispatch class -> its timed subclass (bench_sv4d.timed_dispatch)

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def span(self, category, start, end):
        self.marks.append((category, start, end))

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def collect(self, total_start, total_end) -> dict:
        """ms per category since the last collect; "rest" = the step's time minus the others."""
        sync(self.device)
        out = dict.fromkeys(self.categories, 0.0)
        for cat, a, b in self.marks:
            out[cat] += self.elapsed_ms(a, b)
        out["total"] = self.elapsed_ms(total_start, total_end)
        out["rest"] = out["total"] - sum(out[c] for c in self.categories if c != "rest")
        self.marks.clear()
        return out

    def close(self):
        for h in self.handles:
            h.remove()
