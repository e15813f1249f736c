"""The two kinds of plug-in a mechanism is, and what they share.

An `Accelerator` acts inside model calls: it sees every sub-attention and every block chain of a
call through the SCM dispatch (`dispatch.py`) and may answer it from its cache, narrow it, or pass
it on. Its state is kept per stream (cond, uncond, or both batched), since ComfyUI may evaluate them
in separate calls whose activations must never mix.

A `StepAccelerator` acts on whole sampler steps, ahead of their model calls (`Turbo4DRun.step`): it
decides whether to stand in for a step, answers with its own output when it does, and learns from
the real output when the step runs.

Neither counts anything of its own: what they do is recorded in the run's RunStats (the dispatch's
`stats`), the one account of a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..dispatch import SCMDispatch
from ..memory import nbytes
from ..schedule import StepInfo


class Accelerator:
    """Pass-through behaviour; subclasses override what they accelerate."""

    name = "accelerator"
    config = None  # its MechanismConfig, for the run's report
    state_class: Callable = None  # a class with reset() and nbytes(); one instance per stream

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

    def call_decision(self, dispatch: SCMDispatch):
        """What rank 0 decided for this call, sent to the workers of a split call (picklable host
        values: the workers' `dispatch.decided[name]`); None: nothing to send."""
        return None

    def end_share(self, dispatch: SCMDispatch) -> None:
        """A split call's share ran on this rank (turbo_core.parallel): called on every rank at the
        same point, before the outputs are gathered and inside the signal reduction, so that a
        level may reduce what it measured over the ranks here, in step with the other ranks."""

    def cache_bytes(self) -> int:
        return sum(st.nbytes() for st in self.streams.values())

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

    def span(self, dispatch: SCMDispatch, key, x: torch.Tensor, nxt) -> torch.Tensor:
        """A span the network declared (dispatch.spans): nxt(x) runs it."""
        return nxt(x)

    def call(self, dispatch: SCMDispatch, x: torch.Tensor, nxt: Callable[[], torch.Tensor],
             space=None) -> torch.Tensor:
        """The whole model call: x is the network's input, nxt() runs the network and returns its
        output, `space` (a turbo_core.diffusion.DenoisedSpace, or None when the adapter cannot say)
        maps that output to the denoised image."""
        return nxt()


@dataclass(frozen=True)
class StepDecision:
    """A StepAccelerator's decision on one step: skip it or not, and the change signal it decided by
    (`signal` names it in the run's stats; None when there was nothing to estimate from yet)."""

    skip: bool
    signal: Optional[str] = None
    estimate: Optional[float] = None
    threshold: Optional[float] = None


class StepAccelerator:
    """Acts on whole sampler steps (see Turbo4DRun.step): pass-through behaviour."""

    name = "step accelerator"
    config = None

    def reset(self) -> None:
        """Forget everything: called at the start and end of every run."""

    def cache_bytes(self) -> int:
        return 0

    def gates_steps(self) -> bool:
        """Whether this step accelerator may stand in for a step at all with its settings."""
        return False

    def decide(self, step: StepInfo, space) -> Optional[StepDecision]:
        """Whether to skip the step at `step` (StepInfo of the step, stream "step"); `space` (a
        DenoisedSpace, or None) places it by phase. None: not this accelerator's step to decide
        (it neither skips nor learns from it)."""
        return None

    def forecast(self, step: StepInfo, space) -> torch.Tensor:
        """The step's output when the decision was to skip it."""
        raise NotImplementedError

    def learn(self, step: StepInfo, out: torch.Tensor, space, stats) -> None:
        """The step ran and gave `out` (its denoised image); `stats` (RunStats) records what it measured."""


def outside_reuse_horizon(st, call_index: int, max_age: int) -> bool:
    """For accelerators that reuse activations across calls at most `max_age` calls old (the cache,
    the pruner): notes in their state `st` (fields last_ran, aside) that the network runs at this
    call, and whether it runs more than max_age calls after the previous call that ran. Then every
    cached part is past its age bound and must be recomputed, so the accelerator stands aside for
    the call: no change signals, no stores, the grid path's kernel instead of sequence copies.
    Whole-step skips make such gaps: on the embedded model the cache found nothing to reuse between
    calls 3 or more steps apart and only added its bookkeeping, and on SV4D its first-call stores
    held gigabytes that were never read. The price: a call after a gap stores nothing, so reuse
    resumes one call later when calls close up again."""
    gap = None if st.last_ran is None else call_index - st.last_ran
    st.last_ran = call_index
    # The first call stands aside too: nothing is cached yet, and whether the next call comes
    # within max_age is unknown; entries start at the first call that follows one closely
    # (every accelerator's start_percent leaves the first calls in full compute anyway).
    st.aside = gap is None or gap > max_age
    return st.aside


class CrossCallReuse(Accelerator):
    """Base of the accelerators that reuse activations at most `config.max_age` calls old (the
    cache, the pruner): they stand aside on the calls `outside_reuse_horizon` names, freeing what
    they hold (their state's `drop_cached()`), and the run's stats count those calls
    (`calls_aside`, by mechanism)."""

    def begin_call(self, dispatch) -> None:
        if dispatch.stats is not None:
            dispatch.stats.calls_aside.setdefault(self.name, 0)

    def call(self, dispatch, x, nxt, space=None):
        if dispatch.step is not None:
            st = self.state(dispatch)
            if outside_reuse_horizon(st, dispatch.step.index, self.config.max_age):
                st.drop_cached()  # all past max_age: free it now
                if dispatch.stats is not None:
                    aside = dispatch.stats.calls_aside
                    aside[self.name] = aside.get(self.name, 0) + 1
        return nxt()

    def sees_sequences(self, dispatch) -> bool:
        return dispatch.step is None or not self.state(dispatch).aside


class ReuseEntry:
    """One (block, axis) of a cross-call reuse: the cached output, the input subsample each part
    was computed from, and the call index at which each part was last computed."""

    __slots__ = ("out", "ref", "computed_at")

    def __init__(self, out, ref, computed_at):
        self.out, self.ref, self.computed_at = out, ref, computed_at

    def nbytes(self) -> int:
        return sum(nbytes(t) for t in (self.out, self.ref, self.computed_at) if isinstance(t, torch.Tensor))


class ReuseState:
    """A cross-call reuse's state of one stream: its entries by (block, axis), and the index of the
    last call the network ran and whether this call stands aside (see outside_reuse_horizon)."""

    def __init__(self):
        self.entries: dict = {}
        self.last_ran = None
        self.aside = False

    def reset(self) -> None:
        self.entries.clear()
        self.last_ran, self.aside = None, False

    def drop_cached(self) -> None:
        self.entries.clear()

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries.values())
