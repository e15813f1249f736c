"""Fitting a large V x F grid into GPU memory: the work of one model call in pieces sized from the
free memory, a smaller piece when one still runs out of memory, and the cache's share of the GPU.

Pieces never change the result. The dispatch's contract is that every sequence of a sub-attention
is independent of the others and `compute` accepts any subset of them, so a sub-attention can run
its sequences a piece at a time: spatial attention a few images at a time, camera and motion
attention a few pixels at a time, each sequence still seeing all of its views or frames. A
dispatch with a `MemoryConfig` as its execution policy (`SCMDispatch.in_pieces`) does that under
the accelerators (`attend_in_pieces`), so they see the same calls as without it. Work outside the
dispatch (a model's res blocks) uses `run_in_pieces` over whatever unit is independent there
(SV4D: batch items, i.e. the CFG halves).

A piece's size comes from an estimate of its transient memory (`TRANSFORMER_ELEMENTS` activation
elements per token and channel, the feed-forward's 8x-wide GEGLU projection dominating) and the
memory free when it starts, so pieces shrink as the accelerators' caches fill the GPU during a
call. The estimate can be wrong: a piece that runs out of memory is retried at half its size,
with a log message, down to `min_piece`; only then does the call fail, with a message that says
what to lower.

Where the accelerators' cached activations go is planned here too (`CacheBudget`, `plan`): on the
GPU up to what stays free beside the sampling, the rest in CPU memory.

Plain PyTorch, no ComfyUI import. On the CPU nothing is split unless `MemoryConfig.piece_bytes`
asks for it (tests do, to check that pieces give the same result).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

log = logging.getLogger("turbo4d")

# Transient activation elements per token and channel while one transformer block runs on a
# sequence: input + norm (2), GEGLU projection (8) + gelu(gate) (4) + product (4), attention
# q/k/v/out and their reshapes (~4), residual sums (2); rounded up.
TRANSFORMER_ELEMENTS = 24
GIB = 1 << 30


@dataclass
class MemoryConfig:
    """How one model call may split its work.

    piece_bytes: a cap on the transient memory of one piece (None = only what the free memory
        sets; a number forces pieces, on the CPU too);
    reserve_bytes: GPU memory left free beside a piece (the allocator's fragmentation, the
        accelerators' cache growing during the call);
    min_piece: the smallest piece an out-of-memory retry may go down to.
    `retries` and `messages` record the out-of-memory retries, for the run's report; `caps` the
    piece size that worked after a retry, per kind of work, so that later calls of the run start
    there instead of running out of memory again."""

    piece_bytes: Optional[int] = None
    reserve_bytes: int = GIB
    min_piece: int = 1
    retries: int = 0
    messages: list = field(default_factory=list)
    caps: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.piece_bytes is not None and int(self.piece_bytes) < 1:
            raise ValueError(f"MemoryConfig.piece_bytes must be >= 1 byte or None, got {self.piece_bytes}")
        if int(self.min_piece) < 1:
            raise ValueError(f"MemoryConfig.min_piece must be >= 1, got {self.min_piece}")


def nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def free_bytes(device) -> Optional[int]:
    """Memory a new allocation on `device` can take: the driver's free memory plus what PyTorch's
    caching allocator holds unused. None off the GPU (nothing to plan against)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def piece_budget(cfg: MemoryConfig, device) -> Optional[int]:
    """Bytes one piece may take now (None = no limit)."""
    free = free_bytes(device)
    budget = None if free is None else max(free - int(cfg.reserve_bytes), 0)
    if cfg.piece_bytes is not None:
        budget = int(cfg.piece_bytes) if budget is None else min(budget, int(cfg.piece_bytes))
    return budget


def units_per_piece(budget: Optional[int], bytes_per_unit: float, total: int, min_piece: int = 1) -> int:
    """How many units (sequences, images, batch items) of `bytes_per_unit` fit in `budget`."""
    if budget is None or bytes_per_unit <= 0:
        return total
    return max(min(total, int(budget // bytes_per_unit)), min(min_piece, total), 1)


def run_in_pieces(fn: Callable[[int, int], torch.Tensor], total: int, piece: int, what: str,
                  cfg: Optional[MemoryConfig] = None, out: Optional[torch.Tensor] = None,
                  on_retry: Optional[Callable[[int, int], None]] = None, key=None) -> torch.Tensor:
    """fn(start, stop) over [0, total) in pieces of at most `piece` units, concatenated along dim 0
    into `out` (allocated from the first piece's shape when None). A piece that raises
    torch.cuda.OutOfMemoryError is retried at half its size, with a log message; `on_retry(start,
    stop)` lets the caller undo what the failed piece recorded; `key` names the kind of work
    whose retried size later calls start from. Below `cfg.min_piece` units the error is raised
    again, with the advice to lower the grid."""
    cfg = cfg or MemoryConfig()
    piece = max(min(int(piece), cfg.caps.get(key, piece)), 1)
    start = 0
    rows = None  # output rows per unit
    while start < total:
        stop = min(total, start + piece)
        failed = False
        try:
            y = fn(start, stop)
        except torch.cuda.OutOfMemoryError:
            failed = True  # retried outside the handler: the traceback holds the piece's tensors
        if failed:
            if stop - start <= cfg.min_piece:
                raise torch.cuda.OutOfMemoryError(
                    f"Turbo4D: {what} ran out of GPU memory even {stop - start} at a time. Lower the frames, views "
                    f"or image size, set a smaller cache limit, or free GPU memory (other models, other programs).")
            if on_retry is not None:
                on_retry(start, stop)
            smaller = max((stop - start) // 2, cfg.min_piece)
            note_retry(cfg, f"Turbo4D: out of GPU memory in {what} ({stop - start} at a time, units "
                            f"{start}..{stop - 1} of {total}); retrying {smaller} at a time")
            piece = smaller
            if key is not None:
                cfg.caps[key] = smaller
            continue
        if rows is None:
            rows = y.shape[0] // (stop - start)
            if out is None:
                if stop - start == total:
                    return y
                out = y.new_empty((total * rows,) + tuple(y.shape[1:]))
        out[start * rows:stop * rows] = y
        del y
        start = stop
    return out


def note_retry(cfg: MemoryConfig, msg: str) -> None:
    """Records an out-of-memory retry (logged, counted and kept for the run's report) and frees
    the allocator's cached blocks before the retry."""
    log.warning(msg)
    cfg.retries += 1
    cfg.messages.append(msg)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attend_in_pieces(seqs: torch.Tensor, index: Optional[torch.Tensor], compute, cfg: MemoryConfig, block: int,
                     axis: str, on_retry: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """compute(seqs, index) over the sequences of one sub-attention (`axis` of `block`) a piece at a
    time, sized from the free memory (TRANSFORMER_ELEMENTS per token and channel); a piece that runs
    out of memory is retried at half its size (run_in_pieces). `index`: the rows of `seqs` in the
    axis (None = all)."""
    s, length, width = seqs.shape
    per_seq = length * width * seqs.element_size() * TRANSFORMER_ELEMENTS
    piece = units_per_piece(piece_budget(cfg, seqs.device), per_seq, s, cfg.min_piece)
    rows = [index]

    def part(a, b):
        if a == 0 and b == s:
            return compute(seqs, index)
        if rows[0] is None:
            rows[0] = torch.arange(s, device=seqs.device)
        return compute(seqs[a:b], rows[0][a:b])

    return run_in_pieces(part, s, piece, f"{axis} attention of block {block}", cfg, on_retry=on_retry,
                         key=("attention", axis, s, length, width))


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

    def reserve(self, n: int) -> int:
        """Sets aside up to `n` bytes of the GPU bound for a cache that allocates its own tensors
        (the per-call levels, accel/bound.py) for the rest of the run; returns what it got."""
        n = max(min(int(n), self.gpu_bytes - self.live["gpu"]), 0)
        self.live["gpu"] += n
        self.peak["gpu"] = max(self.peak["gpu"], self.live["gpu"])
        return n

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


def active_budget() -> Optional[CacheBudget]:
    """The budget of the enclosing `cache_budget` block, or None."""
    return _BUDGET.get()


def plan(device, forward_bytes: int, cache_limit: Optional[int] = None, model_dtype=None,
         weights_to_load: int = 0, reserve_bytes: int = 2 * GIB):
    """(MemoryConfig, CacheBudget or None) for a sampling run on `device`: pieces sized from the
    free memory at each step, and the accelerators' cache on the GPU up to what stays free beside
    the weights still to load, the forward's own activations (`forward_bytes`) and a reserve for
    its pieces, capped by `cache_limit` (the user's bound, bytes); beyond it the cache goes to CPU
    memory. A float32 model's cache is kept in bf16 (half the bytes, float32's range). Off the
    GPU: no budget (the cache stays where the model is)."""
    cfg = MemoryConfig()
    free = free_bytes(device)
    if free is None:
        return cfg, None
    room = max(free - int(weights_to_load) - int(forward_bytes) - int(reserve_bytes), 0)
    if cache_limit is not None:
        room = min(room, max(int(cache_limit), 0))
    return cfg, CacheBudget(room, half=torch.bfloat16 if model_dtype == torch.float32 else None)
