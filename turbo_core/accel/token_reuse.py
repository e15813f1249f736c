"""Token reuse (token level): each call runs spans of blocks on a share of the token positions only
(the positions whose input changed most), and takes the rest from the span's cached residual.

A kept position is kept in every image of its batch item, so its camera sequence (all views) and
motion sequence (all frames) are whole: camera and motion attention, their projections and the
MLP run on the kept tokens alone, and spatial attention runs the kept queries against the keys and
values of every token (the block's `tokens(x, pos)`, reached through the dispatch as
`nxt.tokens`). The unkept tokens' outputs are the span input plus its cached residual. Inside a
span of several blocks the unkept tokens' state at an inner block, which the kept queries read as
keys and values, is the span input plus the share of the cached residual the blocks before it
added (linear in the blocks): the only approximation beyond the reuse itself.

How many: the share of positions a span computes is its estimated error over `threshold`, at
least `keep_min`: the estimate is, as in block reuse, the span's measured drift (the relative
change of its residual at the positions it computed, per unit of log(sigma) since the span last
ran, read on the host once per call) times the distance in log(sigma) to the span's last run,
weighed by how much of an error of the call's output reaches the final image (spans.final_weight:
how much it moves the call's denoised image, times what the later calls leave of an error the
Euler step puts in at the schedule's next sigma). So a call where the residuals move runs every
position, and the first (high-noise) and the last steps of a schedule few. The share
is rounded up to one of `buckets` fixed sizes (a bounded set of shapes for the kernels' plans and
caches), on the host, from figures of the previous call.

Which positions: the top k by the change of the span's input since each position was last
computed (a channel subsample, normalised per batch item), on the device (top-k, no host sync).
Positions whose reuse would make them older than `max_age` calls are forced into the top k, and k
is raised to cover them from the age histogram read after the previous call.

Like block reuse it recomputes everything on a stream's first call and after calls skipped whole
beyond `max_skipped`.

Memory: one residual per span in 16 bits plus a channel subsample of its input and the call each
position was computed at; the blocks between `head` and `tail` are cut into as many spans as the
bound of bound.py holds, at most `spans`; where it holds the residual but not the sample, a coarser
sample, and a bound from the memory fraction may be exceeded by SPAN_SLACK for one span (`_fits`).
On a GPU the norms and the scatter of a token-level call run fused (kernels/token_fuse.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels import token_fuse
from ..memory import nbytes
from .bound import half_dtype
from .spans import SPAN_SLACK, SpanReuse, SpanReuseConfig, SpanState, final_weight, hold_one, output_weight, position, slack_fit, split_call  # noqa: F401 (SPAN_SLACK: re-exported)

NAME = "token_reuse"
SPLIT_ASIDE = ("token reuse stood aside: the call was split over processes (Turbo4D Multi-GPU), whose ranks "
               "would pick different tokens; every token was computed")
NO_STREAM = ("token reuse (Semantic Prune's default method) found no block stream in this model and reused nothing: choose method 'sequence prune'")
_FORCED = 1e6  # added to the score of a position past max_age: always in the top k
# A span whose residual alone takes the whole bound: its input sample may be as coarse as every
# MAX_STRIDE-th channel (then spans.slack_fit: SPAN_SLACK over a bound from the memory fraction).
MAX_STRIDE = 64


@dataclass(frozen=True)
class TokenReuseConfig(SpanReuseConfig):
    # threshold: the estimated relative error at which a span computes every position
    keep_min: float = 0.25      # share of the positions a span computes at least
    buckets: int = 4            # subset sizes: T/buckets, 2T/buckets, ..., T
    channel_stride: int = 8     # every n-th channel enters the change score
    # weigh the estimate by what of an error reaches the final image (spans.final_weight): the
    # high-noise calls, whose errors the later ones denoise away, reuse more; False: by the call's
    # denoised image only (spans.output_weight), as block reuse does
    weigh_final: bool = True

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.keep_min <= 1.0:
            raise ValueError(f"TokenReuseConfig.keep_min must be within (0, 1], got {self.keep_min}")
        if int(self.buckets) < 1:
            raise ValueError(f"TokenReuseConfig.buckets must be >= 1, got {self.buckets}")


def bucket_size(k: int, tokens: int, buckets: int) -> int:
    """k rounded up to one of `buckets` evenly spaced sizes of `tokens` (the last is all of them)."""
    step = -(-tokens // buckets)
    return min(tokens, max(1, -(-k // step)) * step)


class _Entry:
    """One span: its residual (16 bits), the channel subsample of its input at each position's
    last compute, and that call's index per position ((batch, tokens) on the device)."""

    __slots__ = ("r", "ref", "at", "pos", "drift", "pending", "hist", "ages", "cs")

    def __init__(self, cs: int = 8):
        self.r = self.ref = self.at = None
        self.cs = cs          # every cs-th channel is in the input sample (ref)
        self.pos = None       # log(sigma) of the span's last run
        self.drift = None     # host float: relative residual change per unit of log(sigma)
        self.pending = None   # this call's measured drift (device scalar), read in end_call
        self.ages = None      # this call's age histogram per batch item (device), read in end_call
        self.hist = None      # (call, [[positions per age 0..max_age+1] per batch item]) on the host


class _Pass:
    """The span being computed at this call: the kept positions (None: all), their rows and their
    span inputs; for a pass of every position, the old residual's sample for the drift."""

    __slots__ = ("span", "pos", "rows", "k", "x_kept", "old", "inv")

    def __init__(self, span, pos, rows, k, x_kept, old, inv=None):
        self.span, self.pos, self.rows, self.k, self.x_kept, self.old = span, pos, rows, k, x_kept, old
        self.inv = inv  # row -> kept index (token_fuse.inverse_rows), where the fused scatter runs


class TokenReuseState(SpanState):
    """SpanState with plan: span -> k positions to compute at this call (None: all); open: a _Pass;
    stride: the input sample's channel stride the spans are held at (TokenReuse._fits)."""

    def __init__(self):
        super().__init__()
        self.stride = None
        self.shapes: list = []  # declared token spans: the stream shape of each cached one

    def nbytes(self) -> int:
        return sum(nbytes(e.r) + nbytes(e.ref) + nbytes(e.at) for e in self.entries.values())


class TokenReuse(SpanReuse):
    name = NAME
    state_class = TokenReuseState
    config_class = TokenReuseConfig

    def _weight(self, step, space) -> float:
        if self.config.weigh_final:
            return final_weight(step.sigma, step.sigma_next, space)
        return output_weight(step.sigma, space)

    def _plan(self, st, call: int, pos: float, weight: float) -> dict:
        return {i: self._k(st, i, call, pos, weight) for i in range(len(st.spans))}

    def _k(self, st, span: int, call: int, pos: float, weight: float) -> Optional[int]:
        """Positions the span computes at this call (None: all, through the plain chain)."""
        cfg = self.config
        e = st.entries.get(span)
        if e is None or e.r is None or e.hist is None:
            return None
        tokens = e.at.shape[1]
        drift = e.drift if e.drift is not None else (cfg.drift_prior or None)
        if drift is None:
            return None
        keep = max(drift * abs(pos - e.pos) * weight / cfg.threshold, cfg.keep_min)
        seen_at, hist = e.hist
        gap = call - seen_at
        overdue = max(sum(n for age, n in enumerate(h) if age + gap > cfg.max_age) for h in hist)
        k = bucket_size(max(math.ceil(min(keep, 1.0) * tokens), int(overdue)), tokens, cfg.buckets)
        return None if k >= tokens else k

    def _fits(self, dispatch, st, x: torch.Tensor, bound: int) -> int:
        """Spans the bound holds, with the input sample's channel stride they are held at (st.stride).
        Where the configured stride leaves no room for one span, a coarser sample (at most every
        MAX_STRIDE-th channel) that lets one in; where none does and the bound comes from the
        memory fraction (an estimate of a tenth of the working set, not max_cache_mb nor the Memory
        node's budget), one span within SPAN_SLACK over it, and the bound raised to that span (the
        run's statistics show the bound held)."""
        n, t, c = x.shape
        half = half_dtype(x.dtype).itemsize

        def per_span(cs: int) -> int:
            return n * t * (c + -(-c // cs)) * half + dispatch.layout.batch * t * 4

        cs = st.stride = self.config.channel_stride
        count = bound // per_span(cs)
        if count:
            return count
        strides = [cs]
        while strides[-1] * 2 <= MAX_STRIDE and strides[-1] < c:
            strides.append(strides[-1] * 2)
        for s in strides:
            if per_span(s) <= bound:
                st.stride = s
                return 1
        i = slack_fit(self.config, st, bound, [per_span(s) for s in strides])
        if i is None:
            return 0
        st.stride = strides[i]
        hold_one(dispatch, st, self.config, bound, per_span(strides[i]), "token reuse")
        return 1

    # --- the blocks ---------------------------------------------------------------------------
    def chain(self, dispatch, block, x, nxt):
        step = dispatch.step
        # A network with spans of its own (a UNet's levels, dispatch.spans) has blocks on several
        # grids and widths: no span of consecutive blocks shares one stream, so it runs whole.
        if step is None or split_call(dispatch, SPLIT_ASIDE):
            return nxt(x)
        st = self.state(dispatch)
        if dispatch.spans or not getattr(nxt, "stream", False):  # not a stream of blocks (a UNet's levels)
            if not self._declared(dispatch, st, block, x):  # nor a block the network declared a token span
                return nxt(x)
        elif st.spans is None and not self._settle(dispatch, st, block, x):
            return nxt(x)
        span = st.inner.get(block)
        if span is None or st.mode == "off":
            return nxt(x)
        first, last = st.spans[span]
        k = st.plan.get(span) if st.mode == "plan" else None
        if k is not None and nxt.tokens is None:  # a block without a token-level form runs whole
            k = None
        if block == first:
            if st.open is not None:  # an earlier span whose last block never ran: half-written
                st.entries.pop(st.open.span, None)
            st.open = (self._open_all(dispatch, st, span, x) if k is None
                       else self._select(dispatch, st, span, x, k, step.index))
        cur = st.open
        if cur is None or cur.span != span:  # an outer accelerator skipped this span's first block
            return nxt(x)
        e = st.entries[span]
        if cur.pos is None:  # every position, through the plain chain
            y = nxt(x)
            if block == last:
                self._close_all(e, cur, y, step.index, position(step.sigma), dispatch.layout.batch)
                st.open = None
            return y
        h = nxt.tokens(x, cur.pos)                                  # (images, k, c)
        # The unkept tokens' state after this block: its input plus the block's share of the cached
        # residual (x is the span input at the first block, this state at the later ones), so the
        # span input is never held. One pass on a GPU (token_fuse.fill_rows).
        out = token_fuse.fill_rows(x, e.r, 1.0 / (last - first + 1), h, cur.rows, cur.inv)
        if block == last:
            self._store_rows(e, cur, h, step.index, position(step.sigma))
            st.open = None
        return out

    def _select(self, dispatch, st, span: int, x: torch.Tensor, k: int, call: int) -> _Pass:
        """The k positions of each batch item whose input changed most (and those past max_age)."""
        cfg = self.config
        e = st.entries[span]
        lay = dispatch.layout
        b, t = lay.batch, lay.tokens
        xs = x.detach()[..., :: e.cs].float()
        ref = e.ref.float()
        diff = (xs - ref).abs().mean(dim=-1).view(b, -1, t).mean(dim=1)          # (batch, tokens)
        score = diff / diff.mean(dim=1, keepdim=True).clamp_min(1e-12)
        score = score + (call - e.at > cfg.max_age).to(score.dtype) * _FORCED
        pos = score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values    # (batch, k)
        rows = lay.token_rows(pos)
        x_kept = x.detach().reshape(-1, x.shape[-1]).index_select(0, rows)
        # The fused scatter's map of every row to its kept index, once for the span's blocks.
        inv = token_fuse.inverse_rows(rows, x.shape[0] * x.shape[1]) if token_fuse.fused(x) else None
        return _Pass(span, pos, rows, k, x_kept, None, inv)

    def _store_rows(self, e: _Entry, cur: _Pass, h: torch.Tensor, call: int, pos: float) -> None:
        """The kept positions' new residual, input subsample and compute call, and the drift measured
        on them (against their residuals of before; counted from the span's last run, so it errs
        high for positions older than that)."""
        c = h.shape[-1]
        r_new = h.reshape(-1, c) - cur.x_kept
        flat = e.r.view(-1, c)
        cs = e.cs
        self._measure(e, r_new[::cs, ::cs].float(), flat.index_select(0, cur.rows)[::cs, ::cs].float(), pos)
        flat.index_copy_(0, cur.rows, r_new.to(e.r.dtype))
        e.ref.view(flat.shape[0], -1).index_copy_(0, cur.rows, cur.x_kept[:, ::cs].to(e.ref.dtype))
        e.at.scatter_(1, cur.pos, call)
        self._ages(e, call)

    def _measure(self, e: _Entry, new: torch.Tensor, old: torch.Tensor, pos: float) -> None:
        """Relative change of the residual samples, per unit of log(sigma) since the span last ran."""
        if e.pos is not None and pos != e.pos:
            e.pending = (new - old).abs().mean() / new.abs().mean().clamp_min(1e-12) / abs(pos - e.pos)
        e.pos = pos

    def _open_all(self, dispatch, st, span: int, x: torch.Tensor) -> _Pass:
        """A pass of every position: the new residual starts as -x in the span's own 16-bit tensor
        (no full-precision copy, and the span input is not held); the old one leaves a sample."""
        cs = st.stride or self.config.channel_stride
        e = st.entries.get(span)
        n, t, c = x.shape
        x = x.detach()
        old = None
        if e is None or e.r is None or e.r.shape != x.shape or e.cs != cs:
            e = st.entries[span] = _Entry(cs)
            e.r = torch.empty(x.shape, dtype=half_dtype(x.dtype), device=x.device)
            e.ref = torch.empty((n, t, -(-c // cs)), dtype=e.r.dtype, device=x.device)
            e.at = torch.empty((dispatch.layout.batch, t), dtype=torch.int32, device=x.device)
        else:
            old = e.r.view(n * t, c)[::cs, ::cs].float()
        e.r.copy_(x).neg_()
        e.ref.copy_(x[..., ::cs])
        return _Pass(span, None, None, None, None, old)

    def _close_all(self, e: _Entry, cur: _Pass, y: torch.Tensor, call: int, pos: float, batch: int) -> None:
        e.r.add_(y.detach())
        n, t, c = e.r.shape
        cs = e.cs
        if cur.old is not None:
            self._measure(e, e.r.view(n * t, c)[::cs, ::cs].float(), cur.old, pos)
        else:
            e.pos = pos
        e.at.fill_(call)
        width = self.config.max_age + 2
        e.hist = (call, [[t] + [0] * (width - 1) for _ in range(batch)])
        e.ages = None

    def _ages(self, e: _Entry, call: int) -> None:
        age = (call - e.at).clamp(max=self.config.max_age + 1).long()
        # scatter_add_ rather than bincount: CUDA's bincount reads the maximum on the host (a sync).
        e.ages = (call, torch.zeros(age.shape[0], self.config.max_age + 2, device=age.device)
                  .scatter_add_(1, age, torch.ones(age.shape, device=age.device)))

    def _read(self, dispatch, st) -> None:
        parts, slots = [], []
        for i, e in st.entries.items():
            if e.pending is not None:
                slots.append((i, "change", 1))
                parts.append(e.pending.float().reshape(1))
            if e.ages is not None:
                slots.append((i, "ages", e.ages[1].numel()))
                parts.append(e.ages[1].reshape(-1))
        if not parts:
            return
        flat = torch.cat(parts).tolist()  # the one host read per call
        at = 0
        for i, kind, size in slots:
            e = st.entries[i]
            vals = flat[at:at + size]
            at += size
            if kind == "change":
                e.pending, e.drift = None, vals[0]
                if dispatch.stats is not None:
                    dispatch.stats.signal(f"token_reuse.s{i}", vals[0], self.config.threshold)
            else:
                call, _ = e.ages
                width = self.config.max_age + 2
                e.hist = (call, [vals[j:j + width] for j in range(0, size, width)])
                e.ages = None


    # --- the network's own token spans (dispatch.Span form "tokens", e.g. a UNet's attention layers) ---
    def _declared(self, dispatch, st, block: int, x: torch.Tensor) -> bool:
        """Whether `block` is a token span the network declared, each one block on a stream of its
        own (the spans planned at the first one reached); without any, notes NO_STREAM."""
        declared = dispatch.token_spans()
        if not declared:
            if dispatch.stats is not None and NO_STREAM not in dispatch.stats.notes:
                dispatch.stats.notes.append(NO_STREAM)
            return False
        if st.spans is None:
            # Planned where the network's first choice runs (for a UNet, its deepest level): the
            # bound is measured from the call's peak so far (bound.py), and the levels before it
            # hold far less of the call's working set than a stream of equal blocks would; the
            # blocks reached before it run whole once.
            if block != declared[0].blocks[0]:
                return False
            self._settle_declared(dispatch, st, declared, x)
        i = st.inner.get(block)
        if i is not None and tuple(x.shape) != st.shapes[i]:
            raise ValueError(f"token reuse: block {block} got a stream of shape {tuple(x.shape)}, declared "
                             f"{st.shapes[i]}; a network must declare its token spans' shapes (dispatch.Span.shape)")
        return i is not None

    def _settle_declared(self, dispatch, st, declared: list, x: torch.Tensor) -> None:
        """Which declared token spans are cached: in the network's order while they fit the bound
        (each a residual, its input's channel subsample and its positions' compute calls), at most
        `spans` of them. A span is one block, (block, block), so the blocks' path runs it."""
        cfg = self.config
        bound = st.bound.settle(cfg, x)
        half = half_dtype(x.dtype).itemsize
        chosen, used = [], 0
        for s in declared:
            if cfg.spans and len(chosen) >= cfg.spans:
                break
            n, t, c = s.shape
            size = n * t * (c + -(-c // cfg.channel_stride)) * half + dispatch.layout.batch * t * 4
            if used + size <= bound:
                chosen.append(s)
                used += size
        st.spans = [(s.blocks[0], s.blocks[0]) for s in chosen]
        st.inner = {s.blocks[0]: i for i, s in enumerate(chosen)}
        st.shapes = [tuple(s.shape) for s in chosen]
        if dispatch.stats is not None:
            dispatch.stats.cache_bound(bound)


# Measured on an H200 GPU (BENCHMARKS.md, "Per-call levels", "Token reuse weighed by what reaches
# the final image"): balanced (the default) and fast, with weigh_final; quality, reusing less, was
# not measured there.
PRESETS = {
    "off": None,
    "quality": TokenReuseConfig(threshold=0.15),
    "balanced": TokenReuseConfig(threshold=0.25),
    "fast": TokenReuseConfig(threshold=0.4),
}
