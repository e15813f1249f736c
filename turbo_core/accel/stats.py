"""What happened in one sampling run, for the log, the nodes' outputs and the GUI.

RunStats is the one account of a run: the dispatch, the plug-ins, the run and the memory planning
record into it, and nothing else keeps a count. Counts are taken where the work happens, so the
figures a user sees are the work that was really done, not a prediction.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from ..layout import AXES
from ..words import count

# Cell states of the steps x blocks map. A block both cached (one sub-attention from the cache) and
# pruned (another on fewer tokens) is CACHED_PRUNED.
RAN, PRUNED, CACHED, BYPASSED = "ran", "pruned", "cached", "bypassed"
CACHED_PRUNED = "cached+pruned"


def cell_state(parts: set) -> str:
    """The map state of a block from every state it had in one call: bypassed (none of it ran), else
    what was skipped in it (cached, pruned, or both), else ran."""
    if BYPASSED in parts:
        return BYPASSED
    if CACHED in parts and PRUNED in parts:
        return CACHED_PRUNED
    for s in (CACHED, PRUNED):
        if s in parts:
            return s
    return RAN


@dataclass
class MemoryReport:
    """Where a run's cached activations were and its out-of-memory retries (the SV4D sampler's
    memory planning, turbo_core.memory): the cache's GPU budget and peaks in MB (None without a
    budget)."""

    retries: int = 0
    gpu_limit_mb: Optional[float] = None
    gpu_peak_mb: Optional[float] = None
    cpu_peak_mb: Optional[float] = None

    def merge(self, other: "MemoryReport") -> "MemoryReport":
        def peak(a, b):
            return a if b is None else b if a is None else max(a, b)

        return MemoryReport(self.retries + other.retries, peak(self.gpu_limit_mb, other.gpu_limit_mb),
                            peak(self.gpu_peak_mb, other.gpu_peak_mb), peak(self.cpu_peak_mb, other.cpu_peak_mb))

    def line(self) -> str:
        out = ""
        if self.gpu_limit_mb is not None:
            out += (f"; cache on GPU {self.gpu_peak_mb / 1024:.1f} of {self.gpu_limit_mb / 1024:.1f} GB allowed, "
                    f"in CPU memory {self.cpu_peak_mb / 1024:.1f} GB")
        if self.retries:
            out += f"; {self.retries} out-of-memory retries in smaller pieces"
        return out


@dataclass
class RunStats:
    """Counters of one run. `cost` maps "spatial"/"camera"/"motion" to FLOPs per sequence and
    "mlp" to FLOPs per image chain, from the network's cost model; it turns counts into a
    compute fraction."""

    blocks: int = 0
    cost: dict = field(default_factory=dict)
    calls: int = 0
    chains_ran: int = 0
    chains_bypassed: int = 0
    sequences_total: dict = field(default_factory=lambda: defaultdict(int))
    sequences_computed: dict = field(default_factory=lambda: defaultdict(int))
    sequences_reused: dict = field(default_factory=lambda: defaultdict(int))
    reused_by: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    cache_hits: int = 0
    cache_misses: int = 0
    cache_bytes_peak: int = 0
    # The per-call levels (block_reuse.py, token_reuse.py): image tokens whose blocks ran on the
    # token-level path, of how many; blocks answered by a reused span residual, spans of blocks
    # reused and run; the largest cache bound a mechanism of the run held itself to (bytes).
    tokens_computed: int = 0
    tokens_offered: int = 0
    blocks_reused: int = 0
    spans_reused: int = 0
    spans_run: int = 0
    cache_bound_bytes: Optional[int] = None
    # per model call: {"step", "sigma", "stream", "cells": {block: state}, "signal": {...}}
    timeline: list = field(default_factory=list)
    flops_full: float = 0.0
    flops_done: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    peak_memory_bytes: Optional[int] = None
    # What the user should know about the run beyond the counters (e.g. the input was resized to
    # the model's size); the log line, the stats text and the canvas figures show them.
    notes: list = field(default_factory=list)
    # (block, axis) -> [sequences computed, sequences total, FLOPs done, FLOPs full] over the run.
    # A model whose blocks sit on different token grids (SV4D's four levels) hands begin_call the
    # call's work per (block, axis); otherwise every block counts the call's layout at `cost`.
    per_block: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0.0, 0.0]))
    # What the plug-ins report beyond the work: the settings of the run's mechanisms (by name), the
    # calls a cross-call reuse stood aside on (by mechanism, see base.outside_reuse_horizon), whole
    # steps the step skip skipped and ran, and the forecast-error rates it measured.
    configs: dict = field(default_factory=dict)
    calls_aside: dict = field(default_factory=dict)
    steps_skipped: int = 0
    steps_ran: int = 0
    kappas: list = field(default_factory=list)
    memory: Optional[MemoryReport] = None
    _call_work: dict = field(default_factory=dict, repr=False)
    _call_computed: dict = field(default_factory=dict, repr=False)

    # --- recording --------------------------------------------------------------------------
    def begin_call(self, step, layout, work: Optional[dict] = None) -> None:
        """`work`: {(block, axis): (sequences, FLOPs per sequence)} of this call at full compute,
        for a model whose blocks are not all on `layout`'s grid; None = every block on `layout`,
        at `cost`."""
        self.calls += 1
        self.timeline.append({"step": step.index, "sigma": step.sigma, "percent": step.percent,
                              "stream": step.stream, "cells": {}, "parts": {}, "signal": {}})
        if work is None:
            work = {(b, a): (layout.axis_shape(a)[0], self.cost.get(a, 0.0))
                    for b in range(self.blocks) for a in AXES}
        self._call_work = work
        self._call_computed = {}
        for (block, axis), (n, per_seq) in work.items():
            self.sequences_total[axis] += n
            self.flops_full += n * per_seq
            cell = self.per_block[(block, axis)]
            cell[1] += n
            cell[3] += n * per_seq
        self.flops_full += layout.images * self.blocks * self.cost.get("mlp", 0.0)

    def _cell(self, block: int, state: str) -> None:
        if not self.timeline:
            return
        # Every state a block had in this call, and the map's cell from them.
        parts = self.timeline[-1]["parts"].setdefault(block, set())
        parts.add(state)
        self.timeline[-1]["cells"][block] = cell_state(parts)

    def chain_ran(self, block: int, images: int) -> None:
        """A block's whole chain ran on `images` images: its per-image work (`cost["mlp"]`: the MLP
        and the time projection) counts; its attentions report through attention_ran."""
        self.chains_ran += 1
        self.flops_done += images * self.cost.get("mlp", 0.0)

    def block_reused(self, block: int, first: bool) -> None:
        """Block `block` did not run: its span's cached residual stands in for it (block reuse);
        `first`: the span's first block, where the residual is added (one span reused)."""
        self.blocks_reused += 1
        self.spans_reused += int(first)
        self._cell(block, CACHED)

    def span_ran(self) -> None:
        """A span of blocks ran and its residual was stored for reuse (block reuse)."""
        self.spans_run += 1

    def cache_bound(self, nbytes: int) -> None:
        """The bound a mechanism holds its cache to (the largest of the run's)."""
        self.cache_bound_bytes = max(self.cache_bound_bytes or 0, int(nbytes))

    def chain_bypassed(self, block: int) -> None:
        self.chains_bypassed += 1
        self._cell(block, BYPASSED)

    def attention_ran(self, block: int, axis: str, computed: int, total: int) -> None:
        """`computed` of the `total` sequences of (block, axis) at its own grid ran; one
        sub-attention may report in several pieces (memory chunks)."""
        self.sequences_computed[axis] += computed
        known = self._call_work.get((block, axis))
        per_seq = known[1] if known is not None else self.cost.get(axis, 0.0)
        self.flops_done += computed * per_seq
        cell = self.per_block[(block, axis)]
        cell[0] += computed
        cell[2] += computed * per_seq
        done = self._call_computed[(block, axis)] = self._call_computed.get((block, axis), 0) + computed
        # A partial computation was narrowed by an accelerator, which marks the cell itself
        # (cached or pruned) through attention_reused.
        if done == total:
            self._cell(block, RAN)

    def tokens_ran(self, block: int, layout, kept: int) -> None:
        """Block `block` computed its chain at `kept` of the `layout.tokens` positions of every image
        (token-level reuse, Accelerator.chain's `nxt.tokens`): camera and motion ran that share of
        their sequences, spatial attention that share of its queries, the MLP that share of its
        tokens; the rest came from a cache (counted as reused, source "tokens")."""
        share = kept / layout.tokens
        for axis in AXES:
            n = layout.axis_shape(axis)[0]
            done = n * share  # camera/motion: whole sequences; spatial: sequences' worth of queries
            known = self._call_work.get((block, axis))
            per_seq = known[1] if known is not None else self.cost.get(axis, 0.0)
            self.sequences_computed[axis] += done
            self.flops_done += done * per_seq
            cell = self.per_block[(block, axis)]
            cell[0] += done
            cell[2] += done * per_seq
            self.sequences_reused[axis] += n - done
            self.reused_by["tokens"][axis] += n - done
        self.flops_done += layout.images * share * self.cost.get("mlp", 0.0)
        self.tokens_computed += layout.images * kept
        self.tokens_offered += layout.images * layout.tokens
        self._cell(block, PRUNED if kept < layout.tokens else RAN)

    def attention_retried(self, block: int, axis: str, computed: int) -> None:
        """Takes back the count of a piece that ran out of memory before it finished; it is
        counted again when it runs (turbo_core.memory)."""
        known = self._call_work.get((block, axis))
        per_seq = known[1] if known is not None else self.cost.get(axis, 0.0)
        self.sequences_computed[axis] -= computed
        self.flops_done -= computed * per_seq
        cell = self.per_block[(block, axis)]
        cell[0] -= computed
        cell[2] -= computed * per_seq
        self._call_computed[(block, axis)] = self._call_computed.get((block, axis), 0) - computed

    def attention_reused(self, block: int, axis: str, sequences: int, source: str = "cache") -> None:
        """`sequences` of this sub-attention were answered from a cache instead of computed.
        source "cache": the block-level rolling cache (a cache hit); "prune": the token pruner."""
        self.sequences_reused[axis] += sequences
        self.reused_by[source][axis] += sequences
        if source == "cache":
            self.cache_hits += 1
            self._cell(block, CACHED)
        else:
            self._cell(block, PRUNED)

    def cache_miss(self) -> None:
        """A cached sub-attention was recomputed in full (change signal over its threshold, or no entry)."""
        self.cache_misses += 1

    def signal(self, name: str, value: float, threshold: Optional[float] = None) -> None:
        """A change signal and the threshold it was compared with, for the report's plot."""
        if self.timeline:
            self.timeline[-1]["signal"].setdefault(name, []).append(
                (float(value), None if threshold is None else float(threshold)))

    def cache_memory(self, nbytes: int) -> None:
        self.cache_bytes_peak = max(self.cache_bytes_peak, int(nbytes))

    # --- reading ----------------------------------------------------------------------------
    def finish(self, peak_memory_bytes: Optional[int] = None) -> "RunStats":
        self.seconds = time.perf_counter() - self.started
        self.peak_memory_bytes = peak_memory_bytes
        return self

    @property
    def kappa_measured(self) -> Optional[float]:
        """The median forecast-error rate the step skip measured (what its kappa_prior should be)."""
        return statistics.median_high(self.kappas) if self.kappas else None

    @classmethod
    def merge(cls, items) -> Optional["RunStats"]:
        """One RunStats for several runs (the SV4D sampler's passes): counts add up, peaks take the
        maximum, timelines follow one another; None when there is nothing to merge."""
        items = [s for s in items if s is not None]
        if not items:
            return None
        out = cls(blocks=items[0].blocks, cost=dict(items[0].cost))
        for s in items:
            for k in ("calls", "chains_ran", "chains_bypassed", "cache_hits", "cache_misses", "flops_full",
                      "flops_done", "seconds", "steps_skipped", "steps_ran", "tokens_computed", "tokens_offered",
                      "blocks_reused", "spans_reused", "spans_run"):
                setattr(out, k, getattr(out, k) + getattr(s, k))
            for k in ("sequences_total", "sequences_computed", "sequences_reused"):
                for a, v in getattr(s, k).items():
                    getattr(out, k)[a] += v
            for src, per in s.reused_by.items():
                for a, v in per.items():
                    out.reused_by[src][a] += v
            for key, cell in s.per_block.items():
                merged = out.per_block[key]
                for i, v in enumerate(cell):
                    merged[i] += v
            for name, n in s.calls_aside.items():
                out.calls_aside[name] = out.calls_aside.get(name, 0) + n
            out.configs.update(s.configs)
            out.kappas.extend(s.kappas)
            out.notes += [n for n in s.notes if n not in out.notes]
            out.timeline.extend(s.timeline)
            out.cache_bytes_peak = max(out.cache_bytes_peak, s.cache_bytes_peak)
            if s.cache_bound_bytes is not None:
                out.cache_bound(s.cache_bound_bytes)
            if s.peak_memory_bytes is not None:
                out.peak_memory_bytes = max(out.peak_memory_bytes or 0, s.peak_memory_bytes)
            if s.memory is not None:
                out.memory = s.memory if out.memory is None else out.memory.merge(s.memory)
        out.started = min(s.started for s in items)
        return out

    @property
    def compute_fraction(self) -> float:
        return self.flops_done / self.flops_full if self.flops_full else 1.0

    @property
    def compute_speedup(self) -> float:
        """Full-compute FLOPs of the SCM blocks over the FLOPs really spent on them."""
        return self.flops_full / self.flops_done if self.flops_done else float("inf") if self.flops_full else 1.0

    def summary(self) -> dict:
        tot = sum(self.sequences_total[a] for a in ("camera", "motion"))
        skipped = tot - sum(self.sequences_computed[a] for a in ("camera", "motion"))
        chains = self.chains_ran + self.chains_bypassed + self.blocks_reused
        whole = sum(1 for t in self.timeline if self.blocks and len(t["cells"]) == self.blocks
                    and all(c == BYPASSED for c in t["cells"].values()))
        return {
            "model_calls": self.calls,           # calls the sampler asked for (rows of the map)
            "model_calls_run": self.calls - whole,  # ... of which the network ran (not skipped whole)
            "blocks": self.blocks,
            "chains_bypassed": self.chains_bypassed,
            "chains_total": chains,
            "steps_fully_bypassed": whole,
            # pruned: answered by the token pruner; skipped: not computed for any reason (also
            # cached and bypassed)
            "tokens_pruned_camera_motion": sum(self.reused_by["prune"][a] for a in ("camera", "motion")),
            "sequences_skipped_camera_motion": skipped,
            "tokens_total_camera_motion": tot,
            "sequences_computed": dict(self.sequences_computed),
            "sequences_total": dict(self.sequences_total),
            "tokens_computed": self.tokens_computed,
            "tokens_offered": self.tokens_offered,
            "blocks_reused": self.blocks_reused,
            "spans_reused": self.spans_reused,
            "spans_run": self.spans_run,
            "cache_bound_mb": None if self.cache_bound_bytes is None else round(self.cache_bound_bytes / 2**20, 3),
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_memory_peak_mb": round(self.cache_bytes_peak / 2**20, 3),
            "compute_fraction": round(self.compute_fraction, 4),
            "compute_speedup": round(self.compute_speedup, 3) if self.flops_done else None,
            "seconds": round(self.seconds, 3),
            "peak_memory_mb": None if self.peak_memory_bytes is None else round(self.peak_memory_bytes / 2**20, 1),
            "notes": list(self.notes),
        }

    def block_counts(self) -> dict:
        """{axis: {block: {"computed", "total", "flops_done", "flops_full"}}} over the run."""
        out: dict = {}
        for (block, axis), (c, t, fd, ff) in sorted(self.per_block.items()):
            out.setdefault(axis, {})[block] = {"computed": c, "total": t, "flops_done": fd, "flops_full": ff}
        return out

    def timeline_grid(self) -> list[list[str]]:
        """steps x blocks of cell states, for the map."""
        return [[t["cells"].get(b, RAN) for b in range(self.blocks)] for t in self.timeline]

    def format_line(self, label: str = "Turbo4D") -> str:
        s = self.summary()
        sp = s["compute_speedup"]
        line = (f"{label}: {s['chains_bypassed']}/{s['chains_total']} block chains bypassed "
                f"({count(s['steps_fully_bypassed'], 'whole step')}), "
                f"{s['tokens_pruned_camera_motion']}/{s['tokens_total_camera_motion']} camera+motion sequences pruned "
                f"({s['sequences_skipped_camera_motion']} skipped in all), "
                f"{s['cache_hits']} cache hits, "
                + (f"{s['blocks_reused']}/{s['chains_total']} blocks reused "
                   f"({count(s['spans_reused'], 'span')} reused, {s['spans_run']} run), " if s["blocks_reused"] else "")
                + (f"tokens computed {s['tokens_computed']}/{s['tokens_offered']}, " if s["tokens_offered"] else "")
                + f"cache {s['cache_memory_peak_mb']:.1f} MB"
                + ("" if s["cache_bound_mb"] is None else f" of {s['cache_bound_mb']:.1f} MB bound")
                + f", compute {s['compute_fraction'] * 100:.1f}% of full ({sp if sp is None else f'{sp:.2f}'}x), "
                f"{s['seconds']:.2f}s")
        if any(self.calls_aside.values()):  # where they had nothing valid to reuse
            line += ", stood aside on " + ", ".join(f"{count(v, 'call')} ({n})" for n, v in self.calls_aside.items())
        kappa = self.kappa_measured
        if kappa is not None:  # what a Chain Bypass kappa_prior for this model should be
            line += f", kappa_measured {kappa:.3g}"
        if self.memory is not None:
            line += self.memory.line()
        if self.notes:
            line += "; " + "; ".join(self.notes)
        return line
