"""What the per-call levels (block_reuse.py, token_reuse.py) share: how a model's blocks are cut
into spans, where a call is in the schedule, how much a call's output reaches the image, and the
call-level logic around the spans (`SpanReuse`: when a call may reuse at all, the spans' planning
within the memory bound, the half-written span dropped at the end of a call).

A model hands the accelerators its blocks one by one through `SCMDispatch.chain(block, x, chain)`
(x the stream entering block `block`, the run's stats giving the depth); a span is a run of
consecutive blocks whose summed residual one cached tensor of the stream's shape holds. Any
network that routes its blocks so gets both levels; the token level also needs the block's
token-level form (`chain(..., tokens)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .base import Accelerator
from .bound import CallBound, check_bound
from .config import MechanismConfig


def output_weight(sigma: float, space) -> float:
    """How strongly an error of this call's network output reaches the denoised image, relative to
    the high-noise calls: |c_out| / sigma_data = sigma / sqrt(sigma^2 + sigma_data^2) (EDM and
    v-prediction alike), from 1 at high noise to 0 at the last steps, where the denoised image is
    almost the input and the network's output barely moves it (a 6-step Karras schedule: 1.0, 1.0,
    1.0, 0.89, 0.17, 0.004). 1 where the adapter does not give the output space."""
    if space is None or not sigma > 0:
        return 1.0
    return float(sigma) / math.sqrt(float(sigma) ** 2 + float(space.sigma_data) ** 2)


def final_weight(sigma: float, sigma_next, space) -> float:
    """How strongly an error of this call's network output reaches the final image: output_weight
    (how much it moves this call's denoised image) times how much of an error the Euler step puts
    into the noisy images at sigma_next still stands in the result, sigma_data / sqrt(sigma_next^2 +
    sigma_data^2) (what the probability-flow ODE from sigma_next to 0 keeps of a perturbation, exact
    for Gaussian data: the later calls denoise most of an early error away; BENCHMARKS.md, "Token
    reuse weighed by what reaches the final image", has the per-call errors that showed it).
    output_weight where the schedule's next sigma or the output space is not known."""
    w = output_weight(sigma, space)
    if space is None or sigma_next is None:
        return w
    return w * float(space.sigma_data) / math.sqrt(float(sigma_next) ** 2 + float(space.sigma_data) ** 2)


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


def is_split(dispatch) -> bool:
    """Whether this call is split over processes (turbo_core.parallel's ShardedDispatch has a plan);
    read by duck typing: the core never imports the parallel engine."""
    return getattr(dispatch, "plan", None) is not None


def least(dispatch, values: list) -> list:
    """The per-element minimum of `values` (ints) over every rank of a split call, in one
    collective (dispatch.least); `values` as they are otherwise. A rank's figures that depend on
    its share (the memory bound it measured, the share's size) become one figure every rank holds,
    so the spans planned from them are the same on every rank."""
    agree = getattr(dispatch, "least", None) if is_split(dispatch) else None
    return list(values) if agree is None else agree(list(values))


def split_call(dispatch, note: str) -> bool:
    """A call split over processes: a level whose per-rank decisions are not made to agree (token
    reuse: each rank would pick its top-k tokens from its own share) stands aside there, on every
    rank alike, so no rank skips work (a span holding another rank's all-to-all) that another rank
    runs. Noted once in the run's statistics."""
    if not is_split(dispatch):
        return False
    if dispatch.stats is not None and note not in dispatch.stats.notes:
        dispatch.stats.notes.append(note)
    return True


# A bound that holds no span at all: one from the memory fraction (an estimate, a share of the working
# set measured before the call's peak, see bound.py) may be exceeded by SPAN_SLACK for one span,
# rather than the level caching nothing at a bound that sits at the edge of one span. Never a bound
# the user set (max_cache_mb) nor the Turbo4D Memory node's budget.
SPAN_SLACK = 0.05


def slack_fit(cfg, st, bound: int, sizes: list) -> Optional[int]:
    """The index of the first of `sizes` (one span's bytes, in order of preference) within
    SPAN_SLACK over `bound`, where the bound comes from the memory fraction alone; None where none
    is, or the bound is hard (max_cache_mb, or reserved in the Memory node's budget). Call it only
    where no size fits the bound itself."""
    if cfg.max_cache_mb > 0 or st.bound.reserved is not None:
        return None
    for i, size in enumerate(sizes):
        if size <= bound * (1.0 + SPAN_SLACK):
            return i
    return None


def hold_one(dispatch, st, cfg, bound: int, size: int, level: str) -> None:
    """Raises the stream's bound to one span of `size` bytes (slack_fit found it within the slack),
    so that the run's statistics show the bound held, and notes why."""
    st.bound.bytes = int(size)
    if dispatch.stats is not None:
        how = "measured" if st.bound.measured else "estimated"
        dispatch.stats.notes.append(
            f"{level}: the memory bound ({bound / 2**20:.1f} MB, {cfg.memory_fraction:.0%} of the {how} working set) "
            f"was {size / max(bound, 1) - 1:.1%} short of one span; it holds one ({size / 2**20:.1f} MB)")


@dataclass(frozen=True)
class SpanReuseConfig(MechanismConfig):
    """The settings both per-call levels have (each level's module says how it reads threshold)."""
    threshold: float = 0.25     # estimated relative error of a span's reuse (0 = never reuse)
    drift_prior: float = 0.08   # drift assumed until a span has been measured (0 = run it first)
    weigh_output: bool = True   # weigh the estimate by how much the call's output moves the image
    max_age: int = 2            # calls a cached residual may be reused after it was computed
    max_skipped: int = 0        # calls skipped whole (the step skip) between two that run, still reused across
    skip_weight: float = 0.0    # the estimate times (1 + skip_weight * calls skipped whole just before): reuse across short gaps
    head: int = 1               # first blocks, always computed
    tail: int = 0               # last blocks, always computed
    spans: int = 0              # cached spans at most (0 = as many as the memory bound holds)
    start_percent: float = 0.0
    end_percent: float = 1.0
    memory_fraction: float = 0.1  # cache bound, as a share of a full call's working memory (bound.py)
    max_cache_mb: float = 0.0   # explicit cache bound in MiB (0 = from memory_fraction)

    def validate(self) -> None:
        owner = type(self).__name__
        check_bound(self)
        if self.threshold < 0:
            raise ValueError(f"{owner}.threshold must be >= 0 (0 = never reuse), got {self.threshold}")
        if self.skip_weight < 0:
            raise ValueError(f"{owner}.skip_weight must be >= 0 (0 = the gap the step skip left does not count), got {self.skip_weight}")
        if self.drift_prior < 0:
            raise ValueError(f"{owner}.drift_prior must be >= 0 (0 = measure first), got {self.drift_prior}")
        if int(self.max_age) < 1:
            raise ValueError(f"{owner}.max_age must be >= 1 call, got {self.max_age}")
        if not 0 <= int(self.max_skipped) < int(self.max_age):
            raise ValueError(f"{owner}.max_skipped must be within [0, max_age), got {self.max_skipped}")
        for name in ("head", "tail", "spans"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{owner}.{name} must be >= 0, got {getattr(self, name)}")


class SpanState:
    """One stream's state of a per-call level: its cached spans and this call's decisions."""

    def __init__(self):
        self.entries: dict = {}       # span -> the level's cache entry
        self.spans: Optional[list] = None  # the cached spans, once planned
        self.inner: dict = {}         # block (or a declared span's key) -> its span's index
        self.mode = "store"           # this call: "store" (every span runs, kept), "plan", "off"
        self.plan: dict = {}          # span -> the level's decision for this call, in "plan" mode
        self.open = None              # the span being computed (.span its index): half-written until it closes
        self.depth = 0                # blocks seen (where the run did not say)
        self.bound = CallBound()
        self.last_ran = None          # call index of the stream's last call that ran

    def reset(self) -> None:
        self.bound.release()
        self.__init__()

    def drop_cached(self) -> None:
        self.entries.clear()
        self.open = None


class SpanReuse(Accelerator):
    """The call-level logic of a per-call level; a subclass decides per span (`_plan`), sizes a span
    (`_fits`), runs the blocks (`chain`) and reads its figures once per call (`_read`)."""

    bounded = True  # its cache within the bound of bound.py (RunStats.cache_bound)
    config_class = SpanReuseConfig
    # Whether the level runs on split calls with every rank taking rank 0's decisions (block reuse);
    # False: it stands aside there (split_call).
    composes_with_splits = False

    def __init__(self, config=None):
        super().__init__()
        self.config = self.config_class.from_dict(config)

    def begin_call(self, dispatch) -> None:
        if dispatch.stats is not None:
            dispatch.stats.calls_aside.setdefault(self.name, 0)

    def call(self, dispatch, x, nxt, space=None):
        """Decided before any block runs, from figures the host read after the previous call."""
        cfg = self.config
        step = dispatch.step
        if step is None:
            return nxt()
        st = self.state(dispatch)
        gap = None if st.last_ran is None else step.index - st.last_ran
        st.last_ran = step.index
        st.open = None
        if gap is None:
            st.bound.begin(x)
        if step.percent > cfg.end_percent:
            st.entries.clear()  # never reused again in this run: free it now
            st.mode = "off"
        elif gap is None or gap > cfg.max_age or gap - 1 > cfg.max_skipped:
            st.entries.clear()
            st.mode = "store"
            if gap is not None and dispatch.stats is not None:  # after a long jump: nothing reusable
                dispatch.stats.calls_aside[self.name] = dispatch.stats.calls_aside.get(self.name, 0) + 1
        elif step.percent < cfg.start_percent or cfg.threshold <= 0 or not st.spans:
            st.mode = "store"
        else:
            st.mode = "plan"
            weight = self._weight(step, space) if cfg.weigh_output else 1.0
            # The calls the step skip skipped just before this one held a forecast output: a span
            # reused across them compounds the two approximations, so a longer gap asks a smaller
            # estimated error (skip_weight; 0: the gap does not count).
            weight *= 1.0 + cfg.skip_weight * (gap - 1)
            st.plan = self._plan(st, step.index, position(step.sigma), weight)
        shared = (getattr(dispatch, "decided", None) or {}).get(self.name)
        if shared is not None:
            # A worker's share of a split call takes rank 0's decision, which rank 0 sent with the
            # call: a worker is not handed the call's output space (its weight would be 1 where rank
            # 0's is below, and the ranks would reuse different spans: a span run on one rank only
            # waits forever in its drift's all-reduce), and every other input of the decision (the
            # step, the spans, the all-reduced drifts) is the same on every rank anyway.
            st.mode, st.plan = shared
        return nxt()

    def _weight(self, step, space) -> float:
        """How much an error of this call's output counts (spans.output_weight; token reuse may
        weigh by what reaches the final image, spans.final_weight)."""
        return output_weight(step.sigma, space)

    def call_decision(self, dispatch):
        """This call's decision (mode, plan), as rank 0 sends it to the workers of a split call
        (picklable host values); None where the level does not compose with splits."""
        if not self.composes_with_splits or dispatch.step is None:
            return None
        st = self.state(dispatch)
        return st.mode, dict(st.plan) if st.mode == "plan" else {}

    def _plan(self, st, call: int, pos: float, weight: float) -> dict:
        """span -> this call's decision, from host figures only."""
        raise NotImplementedError

    def _fits(self, dispatch, st, x, bound: int) -> int:
        """How many spans the bound holds for a stream like x."""
        raise NotImplementedError

    def _settle(self, dispatch, st, block: int, x) -> bool:
        """Plans the spans at the first cached block of the first call that knows the depth (the
        run's stats say it; else it is counted over the first call). False until then."""
        cfg = self.config
        depth = dispatch.stats.blocks if dispatch.stats is not None and dispatch.stats.blocks else st.depth
        if not depth:
            st.depth = max(st.depth, block + 1)  # counted this call, planned at the next
            return False
        if block < cfg.head:
            return False
        bound = st.bound.settle(cfg, x)
        count = self._fits(dispatch, st, x, bound)
        count = min(count, cfg.spans) if cfg.spans else count
        st.spans = plan_spans(depth, cfg.head, cfg.tail, count)
        st.inner = {blk: i for i, (a, b) in enumerate(st.spans) for blk in range(a, b + 1)}
        if dispatch.stats is not None:  # as _fits left it (token reuse may raise it to one span)
            dispatch.stats.cache_bound(st.bound.bytes if st.bound.bytes is not None else bound)
        return True

    def end_call(self, dispatch) -> None:
        if dispatch.step is None:
            return
        st = self.state(dispatch)
        if st.open is not None:  # a span whose last block never ran (an outer accelerator skipped it)
            st.entries.pop(st.open.span, None)
            st.open = None
        self._read(dispatch, st)

    def _read(self, dispatch, st) -> None:
        """The figures this call measured on the device, read in one host read."""
