"""The collectives a split call uses, over torch.distributed's default process group (NCCL between
GPUs, gloo on the CPU), each timed so a run can say what share of its time went to communication.

Every rank calls the same collectives in the same order: the plan and every accelerator decision
are the same on all ranks (decisions read signals through `mean`, all-reduced here), so the
sequence of collectives is too.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from .plan import ShardPlan


class Comm:
    """Collectives of one rank, with the time spent in them.

    `sync_timing`: on CUDA, synchronise the device before and after each collective so the time
    is the collective's own (including waiting for the slowest rank), not its launch; costs a
    host sync per collective, so only benchmarks ask for it. Without it CUDA collectives are not
    timed (`seconds` stays 0); gloo collectives are synchronous and always timed."""

    def __init__(self, rank: int, world: int, device: torch.device, sync_timing: bool = False):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.sync_timing = sync_timing
        self.seconds = 0.0
        self.bytes = 0
        self.count = 0

    def reset_counters(self) -> None:
        self.seconds, self.bytes, self.count = 0.0, 0, 0

    @property
    def timed(self) -> bool:
        return self.device.type != "cuda" or self.sync_timing

    def _timed(self, fn, nbytes: int):
        cuda = self.device.type == "cuda"
        if cuda and self.sync_timing:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn()
        if cuda and self.sync_timing:
            torch.cuda.synchronize(self.device)
        if self.timed:
            self.seconds += time.perf_counter() - t0
        self.bytes += int(nbytes)
        self.count += 1
        return out

    # --- control --------------------------------------------------------------------------
    def broadcast_object(self, obj=None, timed: bool = True):
        """rank 0's `obj` on every rank (commands and their small arguments). A worker waiting for
        its next command passes timed=False: that wait is idle time, not communication."""
        box = [obj]
        send = lambda: dist.broadcast_object_list(box, src=0, device=self._object_device())  # noqa: E731
        if timed:
            self._timed(send, 0)
        else:
            send()
        return box[0]

    def _object_device(self):
        return self.device if self.device.type == "cuda" else None

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """rank 0's tensor `t` on every rank (in place on `t`, which the others allocate)."""
        self._timed(lambda: dist.broadcast(t, src=0), t.numel() * t.element_size())
        return t

    def gather_objects(self, obj) -> Optional[list]:
        """Every rank's `obj` on rank 0 (None on the others)."""
        box = [None] * self.world if self.rank == 0 else None
        if self.device.type == "cuda":  # gather_object needs NCCL's device set: it is
            torch.cuda.set_device(self.device)
        self._timed(lambda: dist.gather_object(obj, box, dst=0), 0)
        return box

    def barrier(self) -> None:
        self._timed(lambda: dist.barrier(), 0)

    # --- the split call -------------------------------------------------------------------
    def means(self, xs) -> list:
        """[x.mean() over the union of every rank's x for x in xs], in one all-reduce: the signal
        reduction of `turbo_core.accel.signals.means` while a call is split (float64 sums and
        counts, so each value is the one-process mean to float32 rounding, and the same bits on
        every rank)."""
        # Both halves made on the device: a tensor built from host numbers is a copy the host
        # waits for, behind every kernel queued so far (a host sync per signal, which a single
        # process never pays for the pruner's signals); the float64 sums cast as they reduce.
        part = torch.stack([x.detach().sum(dtype=torch.float64) for x in xs]
                           + [torch.full((), float(x.numel()), dtype=torch.float64, device=x.device) for x in xs])
        self._timed(lambda: dist.all_reduce(part), part.numel() * 8)
        n = len(xs)
        return list((part[:n] / part[n:]).to(torch.float32).unbind())

    def least(self, values: list) -> list:
        """The per-element minimum of every rank's `values` (ints), in one all-reduce: figures a
        rank measured on its own share (an accelerator's memory bound) made one for every rank.
        Read on the host (a sync), so only once per run, not per call."""
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        self._timed(lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN), t.numel() * 8)
        return t.tolist()

    def to_tokens(self, x: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
        """The crossing sub-attention's input: this rank's images (local layout, image-major
        (images, tokens, c)) -> every image of the call at this rank's token slice (token layout)."""
        b, f, v = plan.grid
        d = plan.dim
        c = x.shape[-1]
        lg = plan.local_grid(self.rank)
        g = x.reshape(*lg, plan.layout.tokens, c)
        sends = [g.narrow(3, s, e - s).reshape(-1) for s, e in (plan.token_bounds(q) for q in range(self.world))]
        n_r = plan.token_sizes()[self.rank]
        recv_shapes = []
        for q in range(self.world):
            shape = [b, f, v]
            shape[d] = plan.sizes()[q]
            recv_shapes.append((*shape, n_r, c))
        out = self._all_to_all(sends, recv_shapes, x)
        return torch.cat(out, dim=d).reshape(b * f * v, n_r, c)

    def from_tokens(self, y: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
        """Inverse of `to_tokens`: this rank's token slice of every image -> its own images, every
        token."""
        b, f, v = plan.grid
        d = plan.dim
        c = y.shape[-1]
        n_r = plan.token_sizes()[self.rank]
        g = y.reshape(b, f, v, n_r, c)
        sends = [g.narrow(d, s, e - s).reshape(-1) for s, e in (plan.bounds(q) for q in range(self.world))]
        lg = plan.local_grid(self.rank)
        recv_shapes = [(*lg, n_q, c) for n_q in plan.token_sizes()]
        out = self._all_to_all(sends, recv_shapes, y)
        return torch.cat(out, dim=3).reshape(-1, plan.layout.tokens, c)

    def _all_to_all(self, sends: list, recv_shapes: list, like: torch.Tensor) -> list:
        inp = torch.cat(sends)
        in_splits = [s.numel() for s in sends]
        out_splits = [int(torch.Size(s).numel()) for s in recv_shapes]
        out = torch.empty(sum(out_splits), dtype=like.dtype, device=like.device)
        self._timed(lambda: dist.all_to_all_single(out, inp, out_splits, in_splits),
                    (inp.numel() + out.numel()) * like.element_size())
        return [p.view(s) for p, s in zip(out.split(out_splits), recv_shapes)]

    def gather_images(self, out: torch.Tensor, plan: ShardPlan) -> Optional[torch.Tensor]:
        """Each rank's output images -> the whole call's on rank 0, in the call's image order (None
        on the other ranks). Slices differ by at most one row of the split axis, so they are padded
        to the largest for one gather."""
        rows = max(plan.local_images(q) for q in range(self.world))
        pad = out.new_zeros((rows, *out.shape[1:]))
        pad[:out.shape[0]] = out
        bufs = [torch.empty_like(pad) for _ in range(self.world)] if self.rank == 0 else None
        self._timed(lambda: dist.gather(pad, bufs, dst=0), pad.numel() * pad.element_size() * (self.world - 1))
        if self.rank != 0:
            return None
        full = out.new_empty((plan.layout.images, *out.shape[1:]))
        for q in range(self.world):
            idx = plan.image_index(q, device=out.device)
            full.index_copy_(0, idx, bufs[q][:idx.numel()])
        return full
