"""How one model call of a V x F grid is split over processes: plain data and index arithmetic, no
communication (`comm.py` moves the tensors).

The images of a call are stacked (batch, frame, view), frame-major (see `layout.py`); a plan cuts
that grid along one of its three axes into contiguous slices, one per rank:

- "cfg": the batch axis. ComfyUI batches the conditional and unconditional halves of a CFG step
  into one call (batch 2), so each rank holds one half; nothing is exchanged inside the network.
- "frames": each rank holds a slice of the frames (all views of them). Spatial and camera attention
  are local (camera attention needs all views of one frame, which the rank has); motion attention
  needs all frames of one view, so its input is re-sharded from frame slices to token slices with
  an all-to-all (Ulysses style, split by sequences: each rank then holds every frame of a slice of
  the token positions, runs the whole sub-attention on them, and a second all-to-all sends the
  outputs back).
- "views": the same with views and camera attention in the roles of frames and motion.

A call of a network without views (TrajectoryCrafter's joint-token DiT, `layout.JointLayout`: one
sequence per batch item over all its frames) splits by its CFG halves only; its grid is (batch,
frames, 1) and an "image" is a latent frame.

Slices are as even as the axis allows (the first ranks take one more where it does not divide).
Token slices are taken over the image's h*w token positions; a camera/motion sequence is one token
position, so any token slice holds whole sequences.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..layout import SCMLayout

MODES = ("auto", "cfg", "frames", "views")
# The grid axis each mode cuts, as a dimension of the (batch, frames, views) image grid.
_DIM = {"cfg": 0, "frames": 1, "views": 2}
# The sub-attention whose sequences cross a mode's slices: re-sharded by tokens for it.
_CROSSING = {"cfg": None, "frames": "motion", "views": "camera"}


def even_splits(total: int, parts: int) -> list[int]:
    """`total` items in `parts` contiguous slices as even as possible, larger slices first."""
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


@dataclass(frozen=True)
class ShardPlan:
    """One call's split: `mode` over `world` ranks of the whole call's `layout`."""

    mode: str
    layout: SCMLayout
    world: int

    def __post_init__(self):
        if self.mode not in _DIM:
            raise ValueError(f"unknown parallel mode {self.mode!r}; expected one of {tuple(_DIM)}")
        if self.mode != "cfg" and not isinstance(self.layout, SCMLayout):
            raise ValueError(f"a {type(self.layout).__name__} call splits only by its CFG halves (its attention "
                             f"runs over every frame of a batch item at once), not by {self.mode}")
        if self.axis_length < self.world:
            raise ValueError(f"cannot split {self.axis_length} along {self.mode} over {self.world} ranks")
        if self.crossing is not None and self.layout.tokens < self.world:
            raise ValueError(f"cannot split {self.layout.tokens} tokens per image over {self.world} ranks")

    @property
    def dim(self) -> int:
        return _DIM[self.mode]

    @property
    def crossing(self) -> Optional[str]:
        """The sub-attention re-sharded by tokens (None: every sub-attention is local)."""
        return _CROSSING[self.mode]

    @property
    def grid(self) -> tuple[int, int, int]:
        lay = self.layout
        return lay.batch, lay.frames, getattr(lay, "views", 1)

    @property
    def axis_length(self) -> int:
        return self.grid[self.dim]

    def sizes(self) -> list[int]:
        return even_splits(self.axis_length, self.world)

    def bounds(self, rank: int) -> tuple[int, int]:
        start = _offsets(self.sizes())[rank]
        return start, start + self.sizes()[rank]

    def local_grid(self, rank: int) -> tuple[int, int, int]:
        g = list(self.grid)
        g[self.dim] = self.sizes()[rank]
        return g[0], g[1], g[2]

    def local_layout(self, rank: int) -> SCMLayout:
        """The layout of the images rank `rank` holds: the call's, with the split axis narrowed."""
        b, f, v = self.local_grid(rank)
        lay = self.layout
        if self.mode == "cfg":
            return replace(lay, batch=b)
        return SCMLayout(b, v, f, lay.height, lay.width)

    def image_index(self, rank: int, device=None) -> torch.Tensor:
        """Positions in the call's stacked images of the images rank `rank` holds, in its own
        stacking order (still frame-major)."""
        b, f, v = self.grid
        start, stop = self.bounds(rank)
        grid = torch.arange(b * f * v, device=device).view(b, f, v)
        return grid.narrow(self.dim, start, stop - start).reshape(-1)

    def local_images(self, rank: int) -> int:
        b, f, v = self.local_grid(rank)
        return b * f * v

    # --- token slices of the crossing sub-attention -----------------------------------------
    def token_sizes(self) -> list[int]:
        return even_splits(self.layout.tokens, self.world)

    def token_bounds(self, rank: int) -> tuple[int, int]:
        start = _offsets(self.token_sizes())[rank]
        return start, start + self.token_sizes()[rank]

    def token_layout(self, rank: int) -> SCMLayout:
        """The layout of rank `rank`'s token slice after the all-to-all: every image of the call,
        a slice of its token positions (a 1 x n_r grid; camera and motion attention never look at
        where a token sits in the image)."""
        lay = self.layout
        return SCMLayout(lay.batch, lay.views, lay.frames, 1, self.token_sizes()[rank])


def choose_plan(layout: SCMLayout, world: int, mode: str = "auto") -> tuple[Optional[ShardPlan], str]:
    """(plan, why) for one call: None when the call runs on rank 0 alone (one rank, or a grid too
    small to split). "auto" prefers the batch (CFG halves: no exchange inside the network) when it
    divides evenly, else the longer of frames and views (the more even slices); an explicit mode
    that cannot split this call falls back to auto and says so in `why`."""
    if mode not in MODES:
        raise ValueError(f"parallel mode {mode!r} is not one of {MODES}")
    if world <= 1:
        return None, "one process"
    note = ""
    if mode != "auto":
        try:
            return ShardPlan(mode, layout, world), mode
        except ValueError as e:
            note = f"{mode} not possible ({e}); "
    b = layout.batch
    if b >= world and b % world == 0:
        return ShardPlan("cfg", layout, world), note + "cfg"
    if not isinstance(layout, SCMLayout):
        return None, note + (f"a {type(layout).__name__} call of batch {b} splits only by its CFG halves (cfg > 1 "
                             f"over 2 processes, or a multiple of them); runs on one")
    f, v = layout.frames, layout.views
    candidates = [(m, n) for m, n in (("frames", f), ("views", v)) if n >= world and layout.tokens >= world]
    if not candidates:
        return None, note + (f"a grid of batch {b} x {f} frames x {v} views cannot be split over {world} "
                             f"processes; runs on one")
    # The largest slice bounds the time of a call: pick the axis whose largest slice is smallest
    # relative to the axis (ties: frames, the longer axis of SV4D 2.0's 12 x 4 passes).
    best = min(candidates, key=lambda c: (-(-c[1] // world) / c[1], c[0] != "frames"))
    return ShardPlan(best[0], layout, world), note + best[0]
