"""Block reuse (block level): the residual of whole spans of blocks reused across model calls,
a rotating share of the spans recomputed at every call, within a memory bound.

Why spans: the cost of a call is in its blocks, and what a block adds to the stream (its residual
r = y - x) drifts slowly from one call to the next (DeepCache's and FBCache's observation). One
residual covers a span of consecutive blocks: reusing it skips every block of the span, and it is
one cached tensor of the stream's size however long the span is. So the memory bound (bound.py)
sets the number of spans: the blocks between `head` and `tail` are cut into as many spans as the
bound holds (each span's residual in 16 bits; two tensors with the forecast), at most `spans`.

Which spans run at a call is decided on the host before the call, from figures read after the
previous one, so nothing inside a call waits for the device:
- a span with no residual, or whose residual would be older than `max_age` calls, runs;
- at least `refresh` spans run at every call, the oldest first (a rotating share: the refresh
  cost is spread over the calls, not paid in the periodic full recomputes of a fixed-interval
  cache; by default spans // (max_age + 1), which a single span cannot have);
- every other span is reused while its estimated error stays under `threshold`. The estimate is
  the span's own measured drift (the relative change of its residual between its last two
  computes, per unit of log(sigma), times the distance in log(sigma) it would be reused at), or
  with the forecast the measured error rate of the forecast itself; taken on the device whenever
  the span runs and read on the host once per call (`end_call`). Until a span has run twice,
  `drift_prior` stands in (0: run).
  The estimate is weighed by how much the call's output moves the denoised image
  (`output_weight`): at the last steps of a schedule the network's output barely reaches it, and
  a reused span costs almost nothing there.

Reuse either as-is (r_t ~ r_t0) or forecast to first order from the last two computes, as
TaylorSeer and FoCa do: r_t ~ r_t0 + (r_t0 - r_t1) * (t - t0) / (t0 - t1), t = log(sigma).

Every span runs and stores on the first call of a stream, and after calls skipped whole (Chain
Bypass's step skip) beyond `max_skipped`: a skipped call's output is already a forecast, and a
residual reused across it compounds two approximations (measured on the embedded model at 6 steps
with one skipped call between: 29.0 dB against the step skip's own 47.2 dB). Past end_percent the
residuals are freed and every block runs.

On a call split over processes (turbo_core.parallel) every rank holds the residuals of its own
images and takes rank 0's decisions (sent with the call): the same spans planned (their count the
least any rank's bound holds), the same spans reused at the same calls, so the ranks' collectives
(a frame/view split's all-to-all inside a span) stay in step. Each span's drift is the whole
call's: the ranks' sums go through one all-reduce per call (`end_share`), so every rank, and rank 0
deciding, reads what one process would.
"""
from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import torch

from .bound import half_dtype
from .signals import means
from .spans import SpanReuse, SpanReuseConfig, SpanState, is_split, least, position
from ..memory import nbytes

NAME = "block_reuse"
NO_STREAM = ("block reuse (Turbo4D Cache's default method) found no block stream in this model and reused nothing: choose method 'sub-attention cache'")

# A span being computed: its index, the 16-bit tensor its new residual accumulates in, and the old
# residual's samples for the drift (None for a new entry).
_Open = namedtuple("_Open", "span acc old")


@dataclass(frozen=True)
class BlockReuseConfig(SpanReuseConfig):
    # threshold: the estimated relative error of a reused span under which it is reused
    refresh: int = -1           # spans recomputed at every call (oldest first); -1: spans // (max_age + 1)
    forecast: int = 1           # 1: first-order forecast from the last two computes; 0: reuse as-is
    signal_stride: int = 8      # every n-th token enters the drift measure

    def validate(self) -> None:
        super().validate()
        if int(self.refresh) < -1:
            raise ValueError(f"BlockReuseConfig.refresh must be >= 0, or -1 for spans // (max_age + 1), got {self.refresh}")
        if self.forecast not in (0, 1):
            raise ValueError(f"BlockReuseConfig.forecast must be 0 (as-is) or 1 (first order), got {self.forecast}")


class _Entry:
    """One span: its residual as last computed (16 bits), the difference to the compute before
    (forecast only), the call indices of those two computes, and the measured drift."""

    __slots__ = ("r", "d", "at", "pos", "prev_pos", "drift", "pending")

    def __init__(self):
        self.r = self.d = None
        self.at = None                   # call index of the last compute (for max_age)
        self.pos = self.prev_pos = None  # log(sigma) of the last two computes
        self.drift = None    # host float: relative change per unit of log(sigma) (as-is), or the
                             # forecast's error rate
        self.pending = None  # device scalar measured at this call, read in end_call; on a split
                             # call first (error sum, scale sum, distance) of this rank's share,
                             # reduced over the ranks in end_share


class BlockReuseState(SpanState):
    """SpanState with plan: span -> True (run) / False (reuse); open: an _Open."""

    def __init__(self):
        super().__init__()
        self.shapes: list = []        # declared spans: the input shape of each cached one
        self.forecast = False         # the forecast is on (asked for, and two tensors a span fit)

    def nbytes(self) -> int:
        return sum(nbytes(e.r) + nbytes(e.d) for e in self.entries.values())


class BlockReuse(SpanReuse):
    name = NAME
    state_class = BlockReuseState
    config_class = BlockReuseConfig
    composes_with_splits = True

    def _plan(self, st, call: int, pos: float, weight: float) -> dict:
        """span -> run (True) or reuse (False) at this call, from host figures only."""
        cfg = self.config
        plan, reusable = {}, []
        for i in range(len(st.spans)):
            e = st.entries.get(i)
            if e is None or e.r is None or call - e.at > cfg.max_age:
                plan[i] = True
                continue
            drift = e.drift if e.drift is not None else (cfg.drift_prior or None)
            if drift is None:
                plan[i] = True
                continue
            if st.forecast and e.d is not None and e.prev_pos is not None:
                estimate = drift * abs(pos - e.pos) * abs(pos - e.prev_pos)
            else:
                estimate = drift * abs(pos - e.pos)
            plan[i] = not estimate * weight < cfg.threshold
            if not plan[i]:
                reusable.append((e.at, i))
        # The rotating share: the oldest reusable spans run anyway (ties in span order).
        share = cfg.refresh if cfg.refresh >= 0 else len(st.spans) // (cfg.max_age + 1)
        owed = share - sum(plan.values())
        for _, i in sorted(reusable)[:max(owed, 0)]:
            plan[i] = True
        return plan

    def _fits(self, dispatch, st, x: torch.Tensor, bound: int) -> int:
        one = x.numel() * half_dtype(x.dtype).itemsize
        # Under a split each rank's share and bound are its own: the least over the ranks, which
        # every rank's bound holds, so that every rank plans the same spans.
        two, single = least(dispatch, [bound // (2 * one), bound // one])
        # The forecast holds two tensors a span; where the bound cannot hold even one span so,
        # the spans reuse as-is (one tensor each) rather than not at all.
        st.forecast = bool(self.config.forecast) and two >= 1
        return two if st.forecast else single

    # --- the blocks ---------------------------------------------------------------------------
    def chain(self, dispatch, block, x, nxt):
        step = dispatch.step
        if step is None or dispatch.spans:  # a network with its own spans: they are the units (span)
            return nxt(x)
        if not getattr(nxt, "stream", False):  # not a stream of blocks (e.g. a UNet's attention layers)
            if dispatch.stats is not None and NO_STREAM not in dispatch.stats.notes:
                dispatch.stats.notes.append(NO_STREAM)
            return nxt(x)
        st = self.state(dispatch)
        if st.spans is None and not self._settle(dispatch, st, block, x):
            return nxt(x)
        span = st.inner.get(block)
        if span is None or st.mode == "off":
            return nxt(x)
        first, last = st.spans[span]
        if st.mode == "plan" and not st.plan.get(span, True):
            if dispatch.stats is not None:
                dispatch.stats.block_reused(block, block == first)
            if block != first:
                return x  # the span's residual was added at its first block
            return self._reused(st, span, x, step)
        if block == first:
            if st.open is not None:  # an earlier span whose last block never ran: half-written
                st.entries.pop(st.open.span, None)
            st.open = self._start(st, span, x)
        y = nxt(x)
        if block == last and st.open is not None and st.open.span == span:
            if y is x:
                raise RuntimeError("block reuse: a block handed back its own input tensor (updated in place); "
                                   "the span's residual cannot be taken")
            opened, st.open = st.open, None
            self._finish(st, span, opened, y, step.index, position(step.sigma), is_split(dispatch))
            if dispatch.stats is not None:
                dispatch.stats.span_ran()
        return y

    def _reused(self, st, span: int, x: torch.Tensor, step) -> torch.Tensor:
        """x plus the span's cached residual (forecast to this call where on)."""
        e = st.entries[span]
        out = x + e.r  # in x's dtype: no copy of the residual is made
        if st.forecast and e.d is not None and e.prev_pos is not None:
            out.add_(e.d, alpha=(position(step.sigma) - e.pos) / (e.pos - e.prev_pos))
        return out

    # --- the network's own spans (dispatch.spans, e.g. a UNet's levels) -------------------------
    def span(self, dispatch, key, x, nxt):
        """A declared span: reused from its residual when the call's plan says so, else run with its
        new residual taken. The spans may nest; one inside a reused span is never reached."""
        step = dispatch.step
        if step is None:
            return nxt(x)
        st = self.state(dispatch)
        if st.spans is None:
            self._settle_declared(dispatch, st, x)
        i = st.inner.get(key)
        if i is None or st.mode == "off":
            return nxt(x)
        if tuple(x.shape) != st.shapes[i]:
            raise ValueError(f"block reuse: span {key!r} got a stream of shape {tuple(x.shape)}, declared "
                             f"{st.shapes[i]}; a network must declare its spans' input shapes (dispatch.Span.shape)")
        if st.mode == "plan" and not st.plan.get(i, True):
            if dispatch.stats is not None:
                for n, b in enumerate(dispatch.span_of(key).blocks):
                    dispatch.stats.block_reused(b, n == 0)
            return self._reused(st, i, x, step)
        opened = self._start(st, i, x)
        try:
            y = nxt(x)
        except BaseException:
            st.entries.pop(i, None)  # half-written: never reused
            raise
        if y is x:
            raise RuntimeError("block reuse: a span handed back its own input tensor (updated in place); "
                               "its residual cannot be taken")
        self._finish(st, i, opened, y, step.index, position(step.sigma), is_split(dispatch))
        if dispatch.stats is not None:
            dispatch.stats.span_ran()
        return y

    def _settle_declared(self, dispatch, st, x: torch.Tensor) -> None:
        """Which declared spans are cached, at the first one of the run's first call: outermost
        first while they fit the bound (an outer span's reuse skips everything inside it, so it saves
        the most), at most `spans` of them; the forecast (two tensors a span) where the bound holds
        it for the outermost, else every span as-is."""
        cfg = self.config
        declared = [s for s in dispatch.spans if s.shape and s.form == "residual"]
        if not declared:
            st.spans, st.inner, st.shapes = [], {}, []
            return
        # x is the outermost span's input: the bound is measured (or estimated) from it, as the
        # chains' first cached block's stream is.
        bound = st.bound.settle(cfg, x)
        sizes = [math.prod(s.shape) * half_dtype(x.dtype).itemsize for s in declared]
        forecast = bool(cfg.forecast) and bound >= 2 * sizes[0]
        per = 2 if forecast else 1
        chosen, used = [], 0
        for s, size in zip(declared, sizes):
            if cfg.spans and len(chosen) >= cfg.spans:
                break
            if used + per * size <= bound:
                chosen.append(s)
                used += per * size
        # Under a split: the spans every rank chose, with the forecast where every rank holds it
        # (as-is takes less, so each rank's bound still holds its choice).
        flags = least(dispatch, [int(forecast)] + [int(s in chosen) for s in declared])
        st.forecast = bool(flags[0])
        chosen = [s for s, keep in zip(declared, flags[1:]) if keep]
        st.spans = [s.key for s in chosen]
        st.inner = {s.key: i for i, s in enumerate(chosen)}
        st.shapes = [tuple(s.shape) for s in chosen]
        if dispatch.stats is not None:
            dispatch.stats.cache_bound(bound)

    def _start(self, st, span: int, x: torch.Tensor) -> _Open:
        """Starts a span's new residual as -x in one of its 16-bit tensors, so that neither the span
        input nor a full-precision residual is held while the span runs: the tensor that becomes
        free is the accumulator (the forecast's old difference, or with as-is reuse the residual
        itself, whose strided sample the drift measure keeps). Returned rather than held in st.open:
        a network's own spans nest, so several are open at once."""
        cfg = self.config
        e = st.entries.get(span)
        if e is None or e.r is None or e.r.shape != x.shape:
            e = st.entries[span] = _Entry()
            e.r = torch.empty(x.shape, dtype=half_dtype(x.dtype), device=x.device)
            acc, old = e.r, None
        else:
            s = cfg.signal_stride
            old = (e.r[:, ::s].float(), None if e.d is None or e.prev_pos is None else e.d[:, ::s].float())
            if st.forecast:
                if e.d is None:
                    e.d = torch.empty_like(e.r)
                acc = e.d
            else:
                acc = e.r
        acc.copy_(x.detach()).neg_()
        return _Open(span, acc, old)

    def _finish(self, st, span: int, opened: _Open, y: torch.Tensor, call: int, pos: float,
                split: bool = False) -> None:
        """The span's new residual y - x into its tensors, in place, with its drift measure left on
        the device for end_call (on a split call, this rank's sums, for end_share)."""
        cfg = self.config
        _, acc, old = opened
        e = st.entries[span]
        acc.add_(y.detach())                                  # acc = the new residual, in 16 bits
        if old is None:  # a new entry
            e.d, e.at, e.pos, e.prev_pos, e.drift = None, call, pos, None, None
            return
        old_r, old_d = old
        new_s = acc[:, ::cfg.signal_stride].float()
        if pos != e.pos:  # (a second call at the same noise level, e.g. Heun's, measures nothing)
            if st.forecast and old_d is not None:
                # The forecast this call would have made, against what it computed: the error rate.
                guess = old_r + old_d * ((pos - e.pos) / (e.pos - e.prev_pos))
                err, dist = (new_s - guess).abs(), abs((pos - e.pos) * (pos - e.prev_pos))
            else:
                err, dist = (new_s - old_r).abs(), abs(pos - e.pos)
            if split:
                # mean|err| / mean|new| over the whole call is the ratio of the sums over every
                # rank's share (the same count of samples in both): end_share reduces them.
                e.pending = (err.sum(), new_s.abs().sum(), dist)
            else:
                e.pending = err.mean() / new_s.abs().mean().clamp_min(1e-12) / dist
        if acc is e.d:
            e.d.sub_(e.r)          # the difference to the residual before
            e.r.add_(e.d)          # the new residual
        e.at = call
        if pos != e.pos:
            e.prev_pos, e.pos = e.pos, pos
        else:
            e.prev_pos = None      # no difference over a step: no forecast until the next compute

    def end_share(self, dispatch) -> None:
        """Every span's drift of this split call from the sums of every rank, in one all-reduce
        (signals.means, inside the split's reduction: the mean of each rank's sum is the sum over
        the ranks over their number, the same factor in both sums of a ratio). Every rank reaches
        this with the same spans measured (the same decisions on the same entries), so every rank
        makes the collective or none does."""
        if dispatch.step is None:
            return
        st = self.state(dispatch)
        waiting = [e for _, e in sorted(st.entries.items()) if isinstance(e.pending, tuple)]
        if not waiting:
            return
        sums = means(*[t for e in waiting for t in e.pending[:2]])
        for k, e in enumerate(waiting):
            e.pending = sums[2 * k] / sums[2 * k + 1].clamp_min(1e-12) / e.pending[2]

    def _read(self, dispatch, st) -> None:
        waiting = [(i, e) for i, e in st.entries.items() if e.pending is not None]
        if not waiting:
            return
        values = torch.stack([e.pending.float() for _, e in waiting]).tolist()  # one host read per call
        for (i, e), v in zip(waiting, values):
            # With the forecast, a span's second compute measures the as-is drift (no forecast yet):
            # the forecast's estimate from it errs large, which only runs the span sooner.
            e.pending, e.drift = None, v
            if dispatch.stats is not None:
                dispatch.stats.signal(f"block_reuse.s{i}", v, self.config.threshold)



# Measured on an H200 GPU (BENCHMARKS.md, "Per-call levels"): t0.25 was the most accurate setting
# measured on every schedule (6 and 50 steps, the large configuration), so quality and balanced
# are the same; at 6 steps t0.12 and t0.25 with max_age 1 lost 9-10 dB against it (the first on
# the GPU, both on a 2-core CPU). fast reuses further and longer: for long schedules (2.5x at
# 44.5 dB at 50 steps, 22.4 dB at 6).
PRESETS = {
    "off": None,
    "quality": BlockReuseConfig(threshold=0.25),
    "balanced": BlockReuseConfig(threshold=0.25),
    "fast": BlockReuseConfig(threshold=0.4, max_age=3),
}

# Per model family (presets.model_family): on the SV4D UNets the balanced and fast presets keep
# their reuse across the calls the step skip skips (max_skipped), up to max_age calls apart.
# Measured on an H200 GPU (BENCHMARKS.md, "Block reuse on the UNet's spans": SV4D 2.0 12 x 4, full
# size, 50 steps, CFG), the step skip fast with this fast setting ran in 2.23 s at 33.3 dB against
# 3.21 s without reuse across skips; on the embedded model the same reuse across a skipped call cost
# 18 dB at 6 steps, so every other model keeps PRESETS.
FAMILY_PRESETS = {
    "sv4d": {
        "balanced": BlockReuseConfig(threshold=0.25, max_age=6, max_skipped=5),
        "fast": BlockReuseConfig(threshold=0.4, max_age=6, max_skipped=5),
    },
}
