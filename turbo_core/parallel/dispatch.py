"""The SCM dispatch of one rank's share of a split call: THE hook of the parallel engine.

The network runs unchanged on each rank's images (the plan's local layout). Spatial attention, the
MLP and every sub-attention whose sequences stay inside the rank's slice need nothing. The one
sub-attention whose sequences cross the slices (motion for frame slices, camera for view slices)
reaches the dispatch through `attend_grid`, and there this dispatch re-shards its input from the
rank's images to every image at the rank's token positions (`Comm.to_tokens`, an all-to-all),
lets the sub-attention run on that (the grid path with the short-axis kernel, or the accelerators'
sequence path, exactly as in one process, on the token layout), and sends the output back
(`Comm.from_tokens`). The accelerators see this dispatch like any other: its `layout` is the
local one, or the token layout while the crossing sub-attention runs, so their caches are sharded
like the activations.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from ..dispatch import SCMDispatch
from .comm import Comm
from .plan import ShardPlan


class ShardedDispatch(SCMDispatch):
    """An SCMDispatch over rank `comm.rank`'s images of `plan`."""

    def __init__(self, plan: ShardPlan, comm: Comm, step=None, accelerators=(), backend="sdpa",
                 stats=None, grid: bool = True):
        super().__init__(plan.local_layout(comm.rank), step, accelerators, backend=backend, stats=stats, grid=grid)
        self.plan, self.comm = plan, comm
        self._crossing: Optional[str] = None  # the axis being computed on the token layout
        # On a worker: rank 0's per-call decisions for this call ({accelerator name: decision}, see
        # Accelerator.call_decision), which its accelerators take instead of their own.
        self.decided: Optional[dict] = None

    def least(self, values: list) -> list:
        """The per-element minimum over every rank (the accelerators' agreement on figures that
        depend on a rank's share, see turbo_core.accel.spans.least)."""
        return self.comm.least(values)

    @classmethod
    def like(cls, d: SCMDispatch, plan: ShardPlan, comm: Comm) -> "ShardedDispatch":
        """Rank 0's share of a call whose dispatch the adapter built for the whole call."""
        sd = cls(plan, comm, d.step, d.accelerators, backend=d.attention, stats=d.stats, grid=d.grid)
        sd.pieces = d.pieces
        return sd

    def attend_grid(self, block, axis, x, compute, grid=None, to_axis=None, from_axis=None):
        if axis != self.plan.crossing:
            return super().attend_grid(block, axis, x, compute, grid, to_axis, from_axis)
        if to_axis is not None or from_axis is not None:
            raise ValueError(f"the {axis} sub-attention brings its own sequence order (to_axis/from_axis), "
                             f"which a {self.plan.mode}-parallel split cannot re-shard; use mode 'cfg' for this model")
        y = self.comm.to_tokens(x, self.plan)
        with self._on_tokens(axis):
            out = super().attend_grid(block, axis, y, compute, grid)
        return self.comm.from_tokens(out, self.plan)

    @contextmanager
    def _on_tokens(self, axis: str):
        local = self.layout
        self.layout, self._crossing = self.plan.token_layout(self.comm.rank), axis
        try:
            yield
        finally:
            self.layout, self._crossing = local, None

    def grid_attention(self, view):
        # The block lays the sequences over its tokens with its own (local) layout; on the token
        # slice the sequences are the token layout's.
        if self._crossing is not None:
            axis, layout = self._crossing, self.layout
            view = lambda t: layout.axis_view(t, axis)  # noqa: E731
        return super().grid_attention(view)


def call_decisions(dispatch) -> Optional[dict]:
    """Rank 0's per-call decisions for the call `dispatch` makes (sent with the call's header):
    {accelerator name: decision}, None without a dispatch."""
    if dispatch is None:
        return None
    out = {}
    for a in dispatch.accelerators:
        d = a.call_decision(dispatch)
        if d is not None:
            out[a.name] = d
    return out


def end_share(sd: "ShardedDispatch") -> None:
    """This rank's share of the call ran: its accelerators reduce what they measured over the ranks
    (Accelerator.end_share). Every rank calls it at the same point, inside `reduced_signals`,
    before the outputs are gathered, so its collectives are in step with the other ranks'."""
    for a in sd.accelerators:
        a.end_share(sd)


def reduced_signals(comm: Comm):
    """The context in which the accelerators' signal means are taken over every rank
    (turbo_core.accel.signals.mean): each rank then takes the same decision."""
    from ..accel.signals import reduced

    return reduced(comm.means)


def slice_inputs(plan: ShardPlan, rank: int, *tensors: Optional[torch.Tensor]) -> list:
    """Rank `rank`'s rows of per-image tensors (None passes through)."""
    out = []
    idx = None
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if idx is None or idx.device != t.device:
            idx = plan.image_index(rank, device=t.device)
        out.append(t.index_select(0, idx))
    return out


def item_rows(plan: ShardPlan, rank: int, *tensors: torch.Tensor) -> list:
    """Rank `rank`'s rows of tensors that hold whole batch items, contiguous (a "cfg" plan): each
    tensor's rows split evenly over the call's batch items, per image or per item alike."""
    if plan.mode != "cfg":
        raise ValueError(f"item_rows splits batch items; a {plan.mode} plan splits inside them")
    b = plan.layout.batch
    start, stop = plan.bounds(rank)
    out = []
    for t in tensors:
        if t.shape[0] % b:
            raise ValueError(f"a tensor of {t.shape[0]} rows does not hold {b} whole batch items")
        k = t.shape[0] // b
        out.append(t[start * k:stop * k])
    return out
