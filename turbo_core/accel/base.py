"""The accelerator interface and the per-run object that holds the active accelerators.

An `Accelerator` sees every sub-attention and every block chain of a model call through the SCM
dispatch (`dispatch.py`) and may answer it from its cache, narrow it, or pass it on. Its state is
kept per stream (cond, uncond, or both batched), since ComfyUI may evaluate them in separate calls
whose activations must never mix.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..diffusion import DenoisedSpace
from ..dispatch import SCMDispatch
from ..layout import SCMLayout
from ..schedule import StepInfo, schedule_position
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

    def gates_steps(self) -> bool:
        """Whether this accelerator may stand in for a whole sampler step (see Turbo4DRun.step)."""
        return False

    def summary(self) -> dict:
        return {}


def outside_reuse_horizon(st, call_index: int, max_age: int) -> bool:
    """For accelerators that reuse activations across calls at most `max_age` calls old (the cache,
    the pruner): notes in their state `st` (fields last_ran, aside) that the network runs at this
    call, and whether it runs more than max_age calls after the previous call that ran. Then every
    cached part is past its age bound and must be recomputed, so the accelerator stands aside for
    the call: no change signals, no stores, the grid path's kernel instead of sequence copies.
    Whole-step skips (Chain Bypass) make such gaps; measured on the embedded model, the cache found
    nothing to reuse between calls 3 or more steps apart and only added its bookkeeping, and on SV4D
    its first-call stores held 7-16 GB that were never read. The price: a call after a gap stores
    nothing, so reuse resumes one call later when calls close up again."""
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
    they hold (their state's `drop_cached()`) and counting the call in `calls_aside`."""

    def __init__(self):
        super().__init__()
        self.calls_aside = 0

    def reset(self) -> None:
        super().reset()
        self.calls_aside = 0

    def call(self, dispatch, x, nxt, space=None):
        if dispatch.step is not None:
            st = self.state(dispatch)
            if outside_reuse_horizon(st, dispatch.step.index, self.config.max_age):
                st.drop_cached()  # all past max_age: free it now
                self.calls_aside += 1
        return nxt()

    def sees_sequences(self, dispatch) -> bool:
        return dispatch.step is None or not self.state(dispatch).aside


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
        self._clear_steps()

    def _clear_steps(self) -> None:
        self.steps_gated = False   # True once the adapter decides whole steps in step()
        self._steps = 0            # step() calls this run
        self._last_args: dict = {}  # stream -> the dispatch arguments of its latest call
        self._step_streams: list = []  # streams that called the network in the current step
        self._schedule = (None, None)  # (the sample_sigmas object, as floats): one host copy per run

    def begin(self) -> None:
        for a in self.accelerators:
            a.reset()
        self.stats = None
        self._calls.clear()
        self._signature.clear()
        self._clear_steps()

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
        step = self._step_info(index, sigma, sample_sigmas, stream)
        d = SCMDispatch(layout, step, self.accelerators, backend=self.backend, stats=self.stats)
        # Whole steps are decided either here, per call (Accelerator.call), or ahead of the host's
        # per-call work in step(); never both.
        d.whole_steps = not self.steps_gated
        self._last_args[stream] = (layout, dtype, device, blocks, cost, work)
        if stream not in self._step_streams:
            self._step_streams.append(stream)
        self.stats.begin_call(step, layout, work)
        for a in self.accelerators:
            a.begin_call(d)
        return d

    def _step_info(self, index: int, sigma: float, sample_sigmas, stream: str) -> StepInfo:
        if isinstance(sample_sigmas, torch.Tensor):
            if self._schedule[0] is not sample_sigmas:  # a device tensor: copy it to the host once
                self._schedule = (sample_sigmas, sample_sigmas.detach().flatten().double().cpu().tolist())
            sample_sigmas = self._schedule[1]
        percent, total = schedule_position(sigma, sample_sigmas)
        return StepInfo(index=index, sigma=float(sigma), percent=percent, total=total, stream=stream)

    def step(self, x: torch.Tensor, sigma: float, sample_sigmas, denoise: Callable[[], torch.Tensor],
             sigma_data: Optional[float] = None) -> torch.Tensor:
        """One sampler evaluation as a whole: `denoise()` runs every model call of it (cond and
        uncond, CFG combined) and returns the denoised image. An adapter calls this around its
        host's per-step work (ComfyUI: the PREDICT_NOISE wrapper), so that a step an accelerator
        stands in for (Chain Bypass's whole steps) skips the host's conditioning, batching and
        CFG bookkeeping too, not only the network: measured through ComfyUI on an H100 GPU with the
        skip inside the model call, that per-step work cost 1.8-2.6 ms per skipped step, more than
        half of a 20-step run at 2 model calls. The skipped step still appears in the stats as a call of every stream the
        last step ran, with every block bypassed. `sigma_data` (the model's) places steps by
        phase; None falls back to log(sigma)."""
        gates = [a for a in self.accelerators if a.gates_steps()]
        if not gates:
            return denoise()
        self.steps_gated = True
        index = self._steps
        self._steps += 1
        info = self._step_info(index, sigma, sample_sigmas, "step")
        d = SCMDispatch(None, info, (), backend=self.backend, stats=None)
        # The output already is the denoised image: the identity map, when the phase is known.
        space = None if sigma_data is None else DenoisedSpace.identity(x, float(sigma_data))
        ran = []
        streams, self._step_streams = self._step_streams, []

        def run_from(i: int):
            if i == len(gates):
                ran.append(True)
                return denoise()
            return gates[i].call(d, x, lambda: run_from(i + 1), space)

        out = run_from(0)
        if not ran:
            self._record_skipped_step(sigma, sample_sigmas, streams, gates)
            self._step_streams = streams  # the next skipped step replays the same streams
        else:
            self._note_step_signal(gates)
        return out

    def _record_skipped_step(self, sigma, sample_sigmas, streams, gates) -> None:
        for stream in streams:
            layout, dtype, device, blocks, cost, work = self._last_args[stream]
            d = self.dispatch(layout, sigma, sample_sigmas, stream, dtype, device, blocks, cost, work)
            for block in range(self.stats.blocks):
                self.stats.chain_bypassed(d.step, block, layout.images)
            self._note_step_signal(gates)
            self.end_call(d)

    def _note_step_signal(self, gates) -> None:
        if self.stats is None or not self.stats.timeline:
            return
        for g in gates:
            est = getattr(g, "last_step_estimate", None)
            if est is not None:
                self.stats.signal(f"{g.name}.step", *est)

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
        self._clear_steps()
        self.stats = stats
        for listener in self.listeners:
            listener(stats, None)
        return stats
