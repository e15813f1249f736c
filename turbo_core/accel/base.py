"""The accelerator interface and the per-run object that holds the active accelerators.

An `Accelerator` sees every sub-attention and every block chain of a model call through the SCM
dispatch (`dispatch.py`) and may answer it from its cache, narrow it, or pass it on. Its state is
kept per stream (cond, uncond, or both batched), since ComfyUI may evaluate them in separate calls
whose activations must never mix.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..dispatch import SCMDispatch
from ..layout import SCMLayout
from ..run import StepInfo, schedule_position
from .stats import RunStats


class Accelerator:
    """Pass-through behaviour; subclasses override what they accelerate."""

    name = "accelerator"
    state_class: Callable = None  # a class with reset(); one instance per stream

    def __init__(self):
        self.streams: dict = {}

    # --- lifecycle ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: called at the start and end of every run, on interrupt, and when
        a stream's shape, dtype or device changes."""
        for st in self.streams.values():
            st.reset()
        self.streams.clear()

    def state(self, dispatch: SCMDispatch):
        key = dispatch.step.stream if dispatch.step is not None else "default"
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = self.state_class()
        return st

    def begin_call(self, dispatch: SCMDispatch) -> None:
        pass

    def end_call(self, dispatch: SCMDispatch) -> None:
        pass

    def cache_bytes(self) -> int:
        return sum(getattr(st, "nbytes", lambda: 0)() for st in self.streams.values())

    # --- behaviour ------------------------------------------------------------------------
    def sees_sequences(self, dispatch: SCMDispatch) -> bool:
        """Whether this call's camera/motion sub-attentions must reach `attend` as sequences; when
        no accelerator needs them the dispatch runs them where they lie (the short-axis kernel)."""
        return type(self).attend is not Accelerator.attend

    def attend(self, dispatch: SCMDispatch, block: int, axis: str, seqs: torch.Tensor,
               index: Optional[torch.Tensor], nxt) -> torch.Tensor:
        return nxt(seqs, index)

    def chain(self, dispatch: SCMDispatch, block: int, x: torch.Tensor, nxt) -> torch.Tensor:
        return nxt(x)

    def call(self, dispatch: SCMDispatch, x: torch.Tensor, nxt: Callable[[], torch.Tensor],
             space=None) -> torch.Tensor:
        """The whole model call: x is the network's input, nxt() runs the network and returns its
        output, `space` (a turbo_core.diffusion.DenoisedSpace, or None when the adapter cannot say)
        maps that output to the denoised image. An accelerator may answer without calling nxt."""
        return nxt()

    def summary(self) -> dict:
        return {}


def outside_reuse_horizon(st, call_index: int, max_age: int) -> bool:
    """For accelerators that reuse activations across calls at most `max_age` calls old (the cache,
    the pruner): notes in their state `st` (fields last_ran, aside) that the network runs at this
    call, and whether it runs more than max_age calls after the previous call that ran. Then every
    cached part is past its age bound and must be recomputed, so the accelerator stands aside for
    the call: no change signals, no stores, the grid path's kernel instead of sequence copies.
    Whole-step skips (Chain Bypass) make such gaps; measured on the embedded model, the cache found
    nothing to reuse between calls 3 or more steps apart and only added its bookkeeping. The price:
    a call after a gap stores nothing, so reuse resumes one call later when calls close up again."""
    gap = None if st.last_ran is None else call_index - st.last_ran
    st.last_ran = call_index
    st.aside = gap is not None and gap > max_age
    return st.aside


class Turbo4DRun:
    """One sampling run: the accelerators in order, their counters, and the per-call dispatch.

    `begin()` and `end()` bracket a run (the ComfyUI adapter calls them from an OUTER_SAMPLE
    wrapper, inside try/finally, so an interrupted run leaves no cache behind).

    `listeners` (e.g. the GUI's live map) are called as `listener(stats, entry)` after every model
    call with the latest timeline entry, and as `listener(stats, None)` when the run ends."""

    def __init__(self, accelerators: Sequence[Accelerator] = (), backend: str = "short-axis",
                 listeners: Sequence[Callable] = ()):
        self.accelerators = list(accelerators)
        self.backend = backend
        self.listeners = list(listeners)
        self.stats: Optional[RunStats] = None
        self._calls: dict = {}
        self._signature: dict = {}

    def begin(self) -> None:
        for a in self.accelerators:
            a.reset()
        self.stats = None
        self._calls.clear()
        self._signature.clear()

    def dispatch(self, layout: SCMLayout, sigma: float, sample_sigmas=None, stream: str = "default",
                 dtype=None, device=None, blocks: int = 0, cost: Optional[dict] = None,
                 work: Optional[dict] = None) -> SCMDispatch:
        """`work` (optional): this call's {(block, axis): (sequences, FLOPs per sequence)}, for
        networks whose blocks are on different token grids (see RunStats.begin_call)."""
        if self.stats is None:
            self.stats = RunStats(blocks=blocks, cost=dict(cost or {}))
        sig = (layout, dtype, str(device))
        if self._signature.get(stream, sig) != sig:
            # A new shape, dtype or device makes every cached activation of this stream invalid.
            for a in self.accelerators:
                st = a.streams.pop(stream, None)
                if st is not None:
                    st.reset()
            self._calls[stream] = 0
        self._signature[stream] = sig
        index = self._calls.get(stream, 0)
        self._calls[stream] = index + 1
        percent, total = schedule_position(sigma, sample_sigmas)
        step = StepInfo(index=index, sigma=float(sigma), percent=percent, total=total, stream=stream)
        d = SCMDispatch(layout, step, self.accelerators, backend=self.backend, stats=self.stats)
        self.stats.begin_call(step, layout, work)
        for a in self.accelerators:
            a.begin_call(d)
        return d

    def model_call(self, dispatch: SCMDispatch, x: torch.Tensor, network: Callable[[], torch.Tensor],
                   space=None) -> torch.Tensor:
        """Runs `network()` (one model call on input x, through `dispatch`) via the accelerators'
        call hooks, in order; the adapter calls this instead of the network itself. `space`: see
        Accelerator.call."""
        def run_from(i: int):
            if i == len(self.accelerators):
                return network()
            return self.accelerators[i].call(dispatch, x, lambda: run_from(i + 1), space)

        return run_from(0)

    def end_call(self, dispatch: SCMDispatch) -> None:
        for a in self.accelerators:
            a.end_call(dispatch)
        if self.stats is not None:
            self.stats.cache_memory(sum(a.cache_bytes() for a in self.accelerators))
            for listener in self.listeners:
                listener(self.stats, self.stats.timeline[-1])

    def end(self, peak_memory_bytes: Optional[int] = None) -> RunStats:
        stats = self.stats or RunStats()
        stats.finish(peak_memory_bytes)
        for a in self.accelerators:
            stats.__dict__.setdefault("accelerators", {})[a.name] = a.summary()
            a.reset()  # free the cache memory now, not at the next run
        self._calls.clear()
        self._signature.clear()
        self.stats = stats
        for listener in self.listeners:
            listener(stats, None)
        return stats
