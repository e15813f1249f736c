"""Rolling spatiotemporal cache (block level): reuse each SCM sub-attention's output across
denoising steps while its input has barely moved, refreshing a rotating share of it every step.

Why per (block, axis): the three sub-attentions of a block change at different rates over the
schedule (PAB's observation: spatial attention drifts more than the temporal ones), so each keeps
its own entry and its own decision.

The decision: the relative L1 change of the sub-attention's input, now against when each part of
the cached output was computed, on a strided subsample of tokens. Under `threshold` the cached
output is reused; at or over it the whole sub-attention is recomputed. The input, not the
output, is what can be measured without doing the work.

Rolling: a reused entry is never reused whole. Every reuse step recomputes the oldest groups of
sequences (images for spatial, frames for camera, views for motion: `layout.sequence_groups`) and
scatters them into the reused output, ceil(G / (max_age + 1)) groups per step, so no part of an
entry is ever reused more than `max_age` calls after it was computed, and the change signal, which
compares each group with its own compute time, stays a measure of the entry's real staleness.
This spreads the refresh cost evenly over the steps instead of the periodic full recomputes of a
fixed-interval cache (PAB, DeepCache), which bench/bench_accel.py measures as the baseline.

Outside [start_percent, end_percent] of the schedule every sub-attention runs in full: the first
steps lay out the structure and change fast, and entries are freed once past the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import AXES
from .base import CrossCallReuse, ReuseEntry, ReuseState
from .config import MechanismConfig
from .signals import relative_l1, subsample_tokens
from .storage import TensorStore

NAME = "cache"


@dataclass(frozen=True)
class RollingCacheConfig(MechanismConfig):
    threshold: float = 0.15     # relative L1 input change at which an entry is recomputed in full
    max_age: int = 3            # calls a part of an entry may be reused after it was computed
    start_percent: float = 0.15
    end_percent: float = 0.95
    axes: tuple = AXES          # which sub-attentions are cached
    storage: str = "native"     # "native", "fp16" or "cpu" (see storage.py)
    signal_stride: int = 8      # every n-th token enters the change signal

    def validate(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"RollingCacheConfig.threshold must be >= 0 (0 = never reuse), got {self.threshold}")
        if int(self.max_age) < 1:
            raise ValueError(f"RollingCacheConfig.max_age must be >= 1 call, got {self.max_age}")
        bad = [a for a in self.axes if a not in AXES]
        if bad:
            raise ValueError(f"RollingCacheConfig.axes: unknown axes {bad}; pick from {AXES}")


# Measured on the embedded model: BENCHMARKS.md ("Accelerators on the embedded model").
PRESETS = {
    "off": None,
    "quality": RollingCacheConfig(threshold=0.1, max_age=3, start_percent=0.15),
    "balanced": RollingCacheConfig(threshold=0.2, max_age=3, start_percent=0.15),
    "fast": RollingCacheConfig(threshold=0.3, max_age=5, start_percent=0.1),
}


class RollingCache(CrossCallReuse):
    name = NAME
    state_class = ReuseState

    def __init__(self, config: Optional[RollingCacheConfig] = None):
        super().__init__()
        self.config = RollingCacheConfig.from_dict(config)
        self.store = TensorStore(self.config.storage)
        self._groups: dict = {}  # (layout, axis, device) -> group tables; shapes only, no activations

    def reset(self) -> None:
        super().reset()
        self._groups.clear()

    # --- group tables ---------------------------------------------------------------------
    def _tables(self, layout, axis: str, device) -> dict:
        key = (layout, axis, str(device))
        t = self._groups.get(key)
        if t is None:
            groups = layout.sequence_groups(axis, device=device)
            g = layout.group_count(axis)
            # members[g] = the sequences of group g (every group has as many).
            members = torch.argsort(groups, stable=True).view(g, -1)
            sample = groups if axis == "spatial" else groups[:: self.config.signal_stride]
            t = self._groups[key] = {"count": g, "members": members, "sample_groups": sample, "select": {}}
        return t

    def _selection(self, tables: dict, chosen: tuple, device):
        """Sequence index and sample mask of a set of groups, built once per set: the rotation
        repeats, so after the first cycle no index tensor is built or copied to the device."""
        sel = tables["select"].get(chosen)
        if sel is None:
            g = torch.tensor(chosen, device=device, dtype=torch.long)
            index = tables["members"].index_select(0, g).reshape(-1).sort().values
            mask = torch.isin(tables["sample_groups"], g)
            sel = tables["select"][chosen] = (index, mask)
        return sel

    # --- behaviour ------------------------------------------------------------------------
    def attend(self, dispatch, block, axis, seqs, index, nxt):
        cfg = self.config
        step = dispatch.step
        # A subset from an outer accelerator, or no step information: nothing to cache against.
        if axis not in cfg.axes or index is not None or step is None or cfg.threshold <= 0:
            return nxt(seqs, index)
        st = self.state(dispatch)
        if st.aside:
            return nxt(seqs, index)
        key = (block, axis)
        entry = st.entries.get(key)
        if entry is not None and entry.out.shape != seqs.shape:
            # The run resets a stream whose layout changes; this guards direct dispatch users.
            del st.entries[key]
            entry = None
        if step.percent > cfg.end_percent:
            st.entries.pop(key, None)  # never reused again in this run: free it now
            return nxt(seqs, None)
        cur = subsample_tokens(seqs.detach(), axis, cfg.signal_stride)
        stats = dispatch.stats
        if entry is None or step.percent < cfg.start_percent:
            return self._compute_all(st, key, seqs, cur, step, nxt, stats, dispatch.layout, miss=entry is not None)
        signal = float(relative_l1(cur, entry.ref))  # the one host sync of this sub-attention
        if stats is not None:
            stats.signal(f"cache.{axis}.b{block}", signal, cfg.threshold)
        if not signal < cfg.threshold:
            return self._compute_all(st, key, seqs, cur, step, nxt, stats, dispatch.layout, miss=True)

        tables = self._tables(dispatch.layout, axis, seqs.device)
        g = tables["count"]
        ages = [step.index - t for t in entry.computed_at]
        order = sorted(range(g), key=lambda i: (-ages[i], i))  # oldest first; ties in group order
        n = max(math.ceil(g / (cfg.max_age + 1)), sum(a > cfg.max_age for a in ages))
        if n >= g:
            return self._compute_all(st, key, seqs, cur, step, nxt, stats, dispatch.layout, miss=True)
        chosen = tuple(sorted(order[:n]))
        sel, mask = self._selection(tables, chosen, seqs.device)
        new = nxt(seqs.index_select(0, sel), sel)
        out = self.store.get(entry.out, seqs)
        out.index_copy_(0, sel, new.to(out.dtype))
        self.store.update(entry.out, sel, new)
        entry.ref = torch.where(mask.view(-1, *([1] * (cur.dim() - 1))), cur, entry.ref)
        for i in chosen:
            entry.computed_at[i] = step.index
        if stats is not None:
            stats.attention_reused(block, axis, seqs.shape[0] - sel.shape[0], source="cache")
        return out

    def _compute_all(self, st, key, seqs, cur, step, nxt, stats, layout, miss: bool):
        out = nxt(seqs, None)
        if miss and stats is not None:
            stats.cache_miss()
        st.entries[key] = ReuseEntry(self.store.put(out), cur.clone(),
                                 [step.index] * layout.group_count(key[1]))
        return out
