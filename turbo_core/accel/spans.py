"""What the per-call levels (block_reuse.py, token_reuse.py) share: how a model's blocks are cut
into spans, where a call is in the schedule, and how much a call's output reaches the image.

A model hands the accelerators its blocks one by one through `SCMDispatch.chain(block, x, chain)`
(x the stream entering block `block`, the run's stats giving the depth); a span is a run of
consecutive blocks whose summed residual one cached tensor of the stream's shape holds. Any
network that routes its blocks so gets both levels; the token level also needs the block's
token-level form (`chain(..., tokens)`).
"""
from __future__ import annotations

import math


def output_weight(sigma: float, space) -> float:
    """How strongly an error of this call's network output reaches the denoised image, relative to
    the high-noise calls: |c_out| / sigma_data = sigma / sqrt(sigma^2 + sigma_data^2) (EDM and
    v-prediction alike), from 1 at high noise to 0 at the last steps, where the denoised image is
    almost the input and the network's output barely moves it (a 6-step Karras schedule: 1.0, 1.0,
    1.0, 0.89, 0.17, 0.004). 1 where the adapter does not give the output space."""
    if space is None or not sigma > 0:
        return 1.0
    return float(sigma) / math.sqrt(float(sigma) ** 2 + float(space.sigma_data) ** 2)


def position(sigma: float) -> float:
    """Where a call is in the schedule for the drift and the forecast: log(sigma). Measured on the
    embedded model at 6 steps, a span residual's change per unit of log(sigma) varied 4-fold over
    the schedule, per call and per unit of the phase arctan(sigma / sigma_data) 8-fold."""
    return math.log(max(float(sigma), 1e-12))


def plan_spans(depth: int, head: int, tail: int, count: int) -> list[tuple[int, int]]:
    """The blocks head .. depth-tail-1 cut into `count` contiguous spans (first, last), as even as
    possible, the longer ones first; fewer when there are fewer blocks."""
    first, last = head, depth - tail - 1
    n = last - first + 1
    count = min(count, n)
    if count <= 0:
        return []
    out, start = [], first
    for i in range(count):
        size = n // count + (1 if i < n % count else 0)
        out.append((start, start + size - 1))
        start += size
    return out


def split_call(dispatch, note: str) -> bool:
    """A call split over processes (turbo_core.parallel's ShardedDispatch has a plan): the per-call
    levels stand aside there, on every rank alike, so no rank skips work (a span holding another
    rank's all-to-all) that another rank runs. Noted once in the run's statistics."""
    if getattr(dispatch, "plan", None) is None:
        return False
    if dispatch.stats is not None and note not in dispatch.stats.notes:
        dispatch.stats.notes.append(note)
    return True
