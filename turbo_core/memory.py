"""Fitting a large V x F grid into GPU memory: the work of one model call in pieces sized from the
free memory, a smaller piece when one still runs out of memory, and the cache's share of the GPU.

Pieces never change the result. The dispatch's contract is that every sequence of a sub-attention
is independent of the others and `compute` accepts any subset of them, so a sub-attention can run
its sequences a piece at a time: spatial attention a few images at a time, camera and motion
attention a few pixels at a time, each sequence still seeing all of its views or frames.
`SequencePieces` does that as the innermost middleware of the dispatch, under the accelerators, so
they see the same calls as without it. Work outside the dispatch (a model's res blocks) uses
`run_in_pieces` over whatever unit is independent there (SV4D: batch items, i.e. the CFG halves).

A piece's size comes from an estimate of its transient memory (`TRANSFORMER_ELEMENTS` activation
elements per token and channel, the feed-forward's 8x-wide GEGLU projection dominating) and the
memory free when it starts, so pieces shrink as the accelerators' caches fill the GPU during a
call. The estimate can be wrong: a piece that runs out of memory is retried at half its size,
with a log message, down to `min_piece`; only then does the call fail, with a message that says
what to lower.

Plain PyTorch, no ComfyUI import. On the CPU nothing is split unless `MemoryConfig.piece_bytes`
asks for it (tests do, to check that pieces give the same result).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .accel.base import Accelerator

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
            msg = (f"Turbo4D: out of GPU memory in {what} ({stop - start} at a time, units {start}..{stop - 1} "
                   f"of {total}); retrying {smaller} at a time")
            log.warning(msg)
            cfg.retries += 1
            cfg.messages.append(msg)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
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


class SequencePieces(Accelerator):
    """Innermost dispatch middleware: runs a sub-attention's sequences a piece at a time, sized
    from the free memory, retrying a piece that runs out of memory at half its size.

    `attend` is bound per instance, not overridden on the class: the dispatch keeps its grid path
    for camera and motion attention (no sequence copies) unless an accelerator's class acts on
    sequences, and pieces alone are no reason to lose it. `with_pieces` turns the grid path off
    when the camera and motion work itself has to run in pieces."""

    name = "memory"

    def __init__(self, config: MemoryConfig, elements: int = TRANSFORMER_ELEMENTS):
        super().__init__()
        self.config = config
        self.elements = elements
        self.attend = self._attend_in_pieces

    def _attend_in_pieces(self, dispatch, block, axis, seqs, index, nxt):
        s, length, width = seqs.shape
        per_seq = length * width * seqs.element_size() * self.elements
        piece = units_per_piece(piece_budget(self.config, seqs.device), per_seq, s, self.config.min_piece)
        rows = [index]

        def part(a, b):
            if a == 0 and b == s:
                return nxt(seqs, index)
            if rows[0] is None:
                rows[0] = torch.arange(s, device=seqs.device)
            return nxt(seqs[a:b], rows[0][a:b])

        def retract(a, b):
            # The dispatch counts a piece before it runs; a retried piece is counted again.
            if dispatch.stats is not None:
                dispatch.stats.attention_retried(block, axis, b - a)

        return run_in_pieces(part, s, piece, f"{axis} attention of block {block}", self.config, on_retry=retract,
                             key=("attention", axis, s, length, width))

    def chain(self, dispatch, block, x, nxt):
        return nxt(x)


class _GridFallback:
    """Mixed into a dispatch view by `with_pieces`: a camera/motion sub-attention whose grid path
    (run whole, no sequence copies) runs out of memory is run again on the sequence path, in
    pieces, and the run's later calls start on the sequence path."""

    pieces_config: MemoryConfig

    def attend_grid(self, block, axis, x, compute, grid=None, to_axis=None, from_axis=None):
        if grid is None:
            return super().attend_grid(block, axis, x, compute, None, to_axis, from_axis)
        ran = []

        def grid_once(t):
            ran.append(True)
            return grid(t)

        failed = False
        try:
            return super().attend_grid(block, axis, x, compute, grid_once, to_axis, from_axis)
        except torch.cuda.OutOfMemoryError:
            if not ran:
                raise  # the sequence path, already in pieces, failed at its smallest piece
            failed = True  # retried outside the handler: the traceback holds the grid path's tensors
        if failed:
            cfg = self.pieces_config
            if self.stats is not None:  # the grid path counted the whole sub-attention before it ran
                self.stats.attention_retried(block, axis, self.layout.axis_shape(axis)[0])
            msg = (f"Turbo4D: out of GPU memory in {axis} attention of block {block} run whole; running it "
                   f"in pieces of sequences from now on")
            log.warning(msg)
            cfg.retries += 1
            cfg.messages.append(msg)
            cfg.caps["grid"] = False
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return super().attend_grid(block, axis, x, compute, None, to_axis, from_axis)


_FALLBACK_CLASSES: dict = {}


def with_pieces(dispatch, config: MemoryConfig, device=None, largest_bytes: Optional[int] = None):
    """A view of `dispatch` (same step, accelerators, stats, backend) whose sub-attentions run in
    pieces, `SequencePieces` innermost. `largest_bytes`: the transient memory of the call's
    largest sub-attention in one piece; when it is over the budget now, camera and motion leave
    the dispatch's grid path (which runs them whole) for the sequence path, in pieces."""
    import copy

    view = copy.copy(dispatch)
    view.accelerators = list(dispatch.accelerators) + [SequencePieces(config)]
    if hasattr(view, "attend_grid"):
        cls = type(dispatch)
        if cls not in _FALLBACK_CLASSES:
            _FALLBACK_CLASSES[cls] = type(f"Pieces{cls.__name__}", (_GridFallback, cls), {})
        view.__class__ = _FALLBACK_CLASSES[cls]
        view.pieces_config = config
    if getattr(view, "grid", False):
        budget = piece_budget(config, device)
        if config.caps.get("grid") is False or (
                largest_bytes is not None and budget is not None and largest_bytes > budget):
            view.grid = False
    return view


def plan(device, forward_bytes: int, cache_limit: Optional[int] = None, model_dtype=None,
         weights_to_load: int = 0, reserve_bytes: int = 2 * GIB):
    """(MemoryConfig, CacheBudget or None) for a sampling run on `device`: pieces sized from the
    free memory at each step, and the accelerators' cache on the GPU up to what stays free beside
    the weights still to load, the forward's own activations (`forward_bytes`) and a reserve for
    its pieces, capped by `cache_limit` (the user's bound, bytes); beyond it the cache goes to CPU
    memory. A float32 model's cache is kept in bf16 (half the bytes, float32's range). Off the
    GPU: no budget (the cache stays where the model is)."""
    from .accel.storage import CacheBudget

    cfg = MemoryConfig()
    free = free_bytes(device)
    if free is None:
        return cfg, None
    room = max(free - int(weights_to_load) - int(forward_bytes) - int(reserve_bytes), 0)
    if cache_limit is not None:
        room = min(room, max(int(cache_limit), 0))
    return cfg, CacheBudget(room, half=torch.bfloat16 if model_dtype == torch.float32 else None)
