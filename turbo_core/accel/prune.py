"""Dynamic semantic-aware token pruning (token level): on the camera and motion axes, compute
attention only for the sequences (token positions) that matter at this step and reuse the cached
output of the rest.

A camera sequence is one token position of one frame across the V views; a motion sequence is one
token position of one view across the F frames. Each step every sequence gets a score

    score = change / mean(change) + saliency * variation / mean(variation)

- change: relative L1 change of the sequence's input since it was last computed. It grows while a
  sequence is skipped, so nothing is starved: a skipped sequence climbs the ranking until it is
  recomputed. `max_age` caps the wait outright: rows that would be reused past it get a score no
  other row can reach, and k is raised to cover them (counted from last call's age histogram).
- variation: how much the sequence's own elements differ, the mean over channels of the standard
  deviation across its views (camera) or frames (motion). This is the semantic term. On a
  multi-view video of objects on a static set the motion sequences of moving objects vary across
  frames and those of the floor and sky hardly at all; camera sequences vary where the views see
  different surfaces, and least on the sky and floor, which look alike from every side. Attention
  over near-identical elements returns nearly their mean value, which the cache holds well; the
  varied sequences are the ones whose mixing the camera and motion attention exists for. It is
  measured on the features the block sees, so it needs no image-space foreground mask and applies
  to any SCM model (a mask from the reference frame would say nothing about views it cannot see).

Both terms are normalised by their mean over the sequences, so the weight `saliency` is
scale-free. The top `keep` share is gathered, attended (`nxt(seqs[idx], idx)`) and scattered into
the reused output. The keep share follows a schedule from keep_start to keep_end over
[start_percent, end_percent] and adapts to the measured change: keep *= (change / trend) ** adapt,
where trend is a running mean of the change of this (block, axis). The change is read on the host
once per model call (end_call) and applied at the next call, so pruning adds no host sync per
sub-attention. Full compute on the first call, outside the window, and wherever no cache exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .base import CrossCallReuse, ReuseEntry, ReuseState
from .config import MechanismConfig
from .signals import means
from .storage import TensorStore

NAME = "prune"
PRUNABLE = ("camera", "motion")
_FORCED = 1e6  # added to the score of a sequence older than max_age: always in the top k


@dataclass(frozen=True)
class TokenPrunerConfig(MechanismConfig):
    keep_start: float = 0.5     # share of sequences computed at start_percent
    keep_end: float = 0.3       # ... and at end_percent, linear in between
    start_percent: float = 0.1
    end_percent: float = 0.95
    axes: tuple = PRUNABLE
    saliency: float = 0.5       # weight of the within-sequence variation against the change
    adapt: float = 0.5          # exponent of the change/trend ratio applied to the keep share
    keep_min: float = 0.05      # floor of the adapted keep share
    max_age: int = 6            # calls a sequence may be reused after it was computed
    storage: str = "native"
    channel_stride: int = 4     # every n-th channel enters the scores
    size_buckets: int = 16      # distinct subset sizes per axis (0 = exact k); see _bucket

    def validate(self) -> None:
        for name in ("keep_start", "keep_end", "keep_min"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"TokenPrunerConfig.{name} must be within (0, 1], got {v}")
        if self.saliency < 0 or self.adapt < 0:
            raise ValueError("TokenPrunerConfig.saliency and .adapt must be >= 0")
        if int(self.size_buckets) < 0:
            raise ValueError(f"TokenPrunerConfig.size_buckets must be >= 0 (0 = exact), got {self.size_buckets}")
        if int(self.max_age) < 1:
            raise ValueError(f"TokenPrunerConfig.max_age must be >= 1 call, got {self.max_age}")
        bad = [a for a in self.axes if a not in PRUNABLE]
        if bad:
            raise ValueError(f"TokenPrunerConfig.axes: {bad} cannot be pruned; pick from {PRUNABLE} "
                             f"(spatial attention is cached by the rolling cache instead)")

    def scheduled_keep(self, percent: float) -> float:
        span = self.end_percent - self.start_percent
        t = 1.0 if span <= 0 else min(max((percent - self.start_percent) / span, 0.0), 1.0)
        return self.keep_start + (self.keep_end - self.keep_start) * t


# Measured on the embedded model: BENCHMARKS.md ("Accelerators on the embedded model").
PRESETS = {
    "off": None,
    "quality": TokenPrunerConfig(keep_start=0.75, keep_end=0.5, start_percent=0.1),
    "balanced": TokenPrunerConfig(keep_start=0.45, keep_end=0.3, start_percent=0.1),
    "fast": TokenPrunerConfig(keep_start=0.3, keep_end=0.15, start_percent=0.1),
}


class TokenPrunerState(ReuseState):
    """Entries per (block, axis) hold per-sequence outputs, channel-subsampled inputs and call
    indices; besides them, what the keep share adapts by."""

    def __init__(self):
        super().__init__()
        self.pending: dict = {}   # (block, axis) -> this call's measured change (device scalar)
        self.ages: dict = {}      # (block, axis) -> this call's age histogram (device, max_age + 2)
        self.trend: dict = {}     # (block, axis) -> running mean of the change (host float)
        self.ratio: dict = {}     # (block, axis) -> last change / trend, applied at the next call
        self.age_hist: dict = {}  # (block, axis) -> (call index, rows per age 0..max_age+1) on the host

    def reset(self) -> None:
        super().reset()
        for d in (self.pending, self.ages, self.trend, self.ratio, self.age_hist):
            d.clear()

    def drop_cached(self) -> None:
        super().drop_cached()
        self.age_hist.clear()


class TokenPruner(CrossCallReuse):
    name = NAME
    state_class = TokenPrunerState

    def __init__(self, config: Optional[TokenPrunerConfig] = None):
        super().__init__()
        self.config = TokenPrunerConfig.from_dict(config)
        self.store = TensorStore(self.config.storage)

    def keep_share(self, st: TokenPrunerState, key, percent: float) -> float:
        cfg = self.config
        keep = cfg.scheduled_keep(percent)
        ratio = st.ratio.get(key)
        if ratio is not None and cfg.adapt > 0:
            # Bounded, so one noisy measurement can neither stop pruning nor prune everything.
            keep *= min(max(ratio, 0.5), 2.0) ** cfg.adapt
        return min(max(keep, cfg.keep_min), 1.0)

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        cfg = self.config
        step = dispatch.step
        if axis not in cfg.axes or step is None:
            return nxt(seqs, index)
        st = self.state(dispatch)
        if st.aside:
            return nxt(seqs, index)
        key = (block, axis)
        entry = st.entries.get(key)
        total = dispatch.layout.axis_shape(axis)[0]
        if entry is not None and entry.out.shape != (total, *seqs.shape[1:]):
            del st.entries[key]
            entry = None
        if step.percent > cfg.end_percent:
            st.entries.pop(key, None)  # never pruned again in this run: free it now
            return nxt(seqs, index)
        xs = seqs.detach()[..., :: cfg.channel_stride]
        if entry is None:
            out = nxt(seqs, index)
            if index is None:  # only a full view can start an entry; a subset passes through
                entry = st.entries[key] = ReuseEntry(self.store.put(out), xs.clone(),
                                                     torch.full((total,), step.index, dtype=torch.long,
                                                                device=seqs.device))
                self._record_ages(st, key, entry, step.index)
            return out
        s = seqs.shape[0]
        k = s if step.percent < cfg.start_percent else math.ceil(self.keep_share(st, key, step.percent) * s)
        k = max(k, min(self._overdue(st, key, step.index), s))
        k = _bucket(k, s, cfg.size_buckets)
        ref = entry.ref if index is None else entry.ref.index_select(0, index)
        diff = (xs.float() - ref.float()).abs().mean(dim=(1, 2))              # (s,)
        changed, scale = means(diff, ref.float().abs())
        st.pending[key] = changed / scale.clamp_min(1e-12)  # relative change of this axis, read at end_call
        if k >= s:
            out = nxt(seqs, index)
            self._write(entry, index, None, out, xs, step)
            self._record_ages(st, key, entry, step.index)
            return out
        score = diff / diff.mean().clamp_min(1e-12)
        if cfg.saliency > 0 and xs.shape[1] > 1:  # one token (one frame / one view) has no spread: saliency 0
            var = xs.float().std(dim=1).mean(dim=-1)                          # (s,)
            score = score + cfg.saliency * var / var.mean().clamp_min(1e-12)
        age = step.index - (entry.computed_at if index is None else entry.computed_at.index_select(0, index))
        score = score + (age > cfg.max_age).to(score.dtype) * _FORCED
        top = score.topk(k, sorted=False).indices.sort().values             # local rows, in order
        gidx = top if index is None else index.index_select(0, top)         # rows of the whole axis
        new = nxt(seqs.index_select(0, top), gidx)
        out = (self.store.get(entry.out, seqs) if index is None
               else self.store.gather(entry.out, index, seqs))
        out.index_copy_(0, top, new.to(out.dtype))
        self._write(entry, gidx, top, new, xs, step)
        self._record_ages(st, key, entry, step.index)
        if dispatch.stats is not None:
            dispatch.stats.attention_reused(block, axis, s - k, source="prune")
        return out

    def _overdue(self, st: TokenPrunerState, key, call: int) -> int:
        """Rows that would be reused past max_age at this call, from last call's age histogram
        (an upper bound for a subset): k is raised to cover them, so the forced rows always fit
        in the top k and the max_age guarantee holds even when nothing changes."""
        h = st.age_hist.get(key)
        if h is None:
            return 0
        seen_at, hist = h
        gap = call - seen_at  # > 1 where an outer accelerator (the bypass) skipped this block
        return int(sum(n for age, n in enumerate(hist) if age + gap > self.config.max_age))

    def _write(self, entry, gidx, top, new, xs, step) -> None:
        """Store computed rows: gidx are their rows in the axis (None = all), top their rows in xs."""
        rows = xs if top is None else xs.index_select(0, top)
        if gidx is None:
            entry.out = self.store.put(new)
            entry.ref = rows.clone()
            entry.computed_at.fill_(step.index)
        else:
            self.store.update(entry.out, gidx, new)
            entry.ref.index_copy_(0, gidx, rows.to(entry.ref.dtype))
            entry.computed_at.index_fill_(0, gidx, step.index)

    def _record_ages(self, st: TokenPrunerState, key, entry, call: int) -> None:
        age = (call - entry.computed_at).clamp(max=self.config.max_age + 1)
        # index_add_ rather than bincount: CUDA's bincount reads the maximum on the host (a sync).
        hist = torch.zeros(self.config.max_age + 2, device=age.device).index_add_(
            0, age, torch.ones(age.shape, device=age.device))
        st.ages[key] = (call, hist)

    def end_call(self, dispatch) -> None:
        if dispatch.step is None:
            return
        st = self.state(dispatch)
        if not st.pending and not st.ages:
            return
        keys, age_keys = list(st.pending), list(st.ages)
        width = self.config.max_age + 2
        parts = [st.pending[k].float().reshape(1) for k in keys] + [st.ages[k][1].float() for k in age_keys]
        flat = torch.cat(parts).tolist()  # the one host sync of the pruner per call
        values = flat[:len(keys)]
        for i, k in enumerate(age_keys):
            st.age_hist[k] = (st.ages[k][0], flat[len(keys) + i * width: len(keys) + (i + 1) * width])
        st.pending.clear()
        st.ages.clear()
        for k, v in zip(keys, values):
            trend = st.trend.get(k)
            st.ratio[k] = 1.0 if not trend else v / trend
            st.trend[k] = v if trend is None else 0.7 * trend + 0.3 * v
            if dispatch.stats is not None:
                dispatch.stats.signal(f"prune.{k[1]}.b{k[0]}", v, None)


def _bucket(k: int, s: int, buckets: int) -> int:
    """k rounded up to one of `buckets` evenly spaced sizes of s. An adaptive k takes a new value
    almost every call, and every new gather size is a new shape for the attention and linear
    kernels; on a GPU each can cost a kernel plan (cuDNN attention in bf16/fp16) or an autotuning pass, so a bounded set of
    sizes keeps those caches warm. Rounding up only ever computes more, never less."""
    if buckets <= 0 or k >= s:
        return k
    step = -(-s // buckets)
    return min(s, -(-k // step) * step)

