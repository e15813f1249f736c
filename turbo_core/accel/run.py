"""The per-run object an adapter drives: the active plug-ins, the run's RunStats, and the dispatch of
every model call."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..diffusion import DenoisedSpace
from ..dispatch import SCMDispatch
from ..layout import SCMLayout
from ..schedule import StepInfo, next_sigma, schedule_position
from .base import Accelerator, StepAccelerator, StepDecision
from .stats import RunStats


class Turbo4DRun:
    """One sampling run: the plug-ins in order, the run's stats, and the per-call dispatch.

    `begin()` and `end()` bracket a run (the ComfyUI adapter calls them from an OUTER_SAMPLE
    wrapper, inside try/finally, so an interrupted run leaves no cache behind). Per sampler step the
    adapter calls `step()`, and inside it, per model call, `dispatch()`, `model_call()` and
    `end_call()`.

    `listeners` (e.g. the GUI's live map) are called as `listener(stats, entry)` after every model
    call with the latest timeline entry, and as `listener(stats, None)` when the run ends."""

    def __init__(self, accelerators: Sequence = (), backend: str = "short-axis",
                 listeners: Sequence[Callable] = ()):
        self.accelerators = list(accelerators)
        self.per_step = [a for a in self.accelerators if isinstance(a, StepAccelerator)]
        self.per_call: list[Accelerator] = [a for a in self.accelerators if not isinstance(a, StepAccelerator)]
        self.backend = backend
        self.listeners = list(listeners)
        self.stats: Optional[RunStats] = None
        self._calls: dict = {}
        self._signature: dict = {}
        self._clear_steps()

    def _clear_steps(self) -> None:
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
            for a in self.per_call:
                st = a.streams.pop(stream, None)
                if st is not None:
                    st.reset()
            self._calls[stream] = 0
        self._signature[stream] = sig
        index = self._calls.get(stream, 0)
        self._calls[stream] = index + 1
        step = self._step_info(index, sigma, sample_sigmas, stream)
        d = SCMDispatch(layout, step, self.per_call, backend=self.backend, stats=self.stats)
        self._last_args[stream] = (layout, dtype, device, blocks, cost, work)
        if stream not in self._step_streams:
            self._step_streams.append(stream)
        self.stats.begin_call(step, layout, work)
        for a in self.per_call:
            a.begin_call(d)
        return d

    def _step_info(self, index: int, sigma: float, sample_sigmas, stream: str) -> StepInfo:
        if isinstance(sample_sigmas, torch.Tensor):
            if self._schedule[0] is not sample_sigmas:  # a device tensor: copy it to the host once
                self._schedule = (sample_sigmas, sample_sigmas.detach().flatten().double().cpu().tolist())
            sample_sigmas = self._schedule[1]
        percent, total = schedule_position(sigma, sample_sigmas)
        return StepInfo(index=index, sigma=float(sigma), percent=percent, total=total, stream=stream,
                        sigma_next=next_sigma(sigma, sample_sigmas))

    def step(self, x: torch.Tensor, sigma: float, sample_sigmas, denoise: Callable[[], torch.Tensor],
             sigma_data: Optional[float] = None) -> torch.Tensor:
        """One sampler evaluation as a whole: `denoise()` runs every model call of it (cond and
        uncond, CFG combined) and returns the denoised image. An adapter calls this around its
        host's per-step work (ComfyUI: the PREDICT_NOISE wrapper), so that a step a step accelerator
        stands in for skips the host's conditioning, batching and CFG bookkeeping too, not only the
        network. The first step accelerator that decides to skip answers for the step; otherwise
        the step runs and every one that decided learns from its output. `sigma_data` (the model's)
        places steps by phase; None falls back to log(sigma)."""
        gates = [a for a in self.per_step if a.gates_steps()]
        if not gates:
            return denoise()
        info = self._step_info(self._steps, sigma, sample_sigmas, "step")
        self._steps += 1
        # The output already is the denoised image: the identity map, when the phase is known.
        space = None if sigma_data is None else DenoisedSpace.identity(x, float(sigma_data))
        streams, self._step_streams = self._step_streams, []
        decisions = [(g, g.decide(info, space)) for g in gates]
        for g, d in decisions:
            if d is not None and d.skip:
                out = g.forecast(info, space)
                self._record_skipped_step(sigma, sample_sigmas, streams, [d for _, d in decisions])
                self._step_streams = streams  # the next skipped step replays the same streams
                return out
        out = denoise()
        decided = [(g, d) for g, d in decisions if d is not None]
        for g, _ in decided:
            g.learn(info, out, space, self.stats)
        if self.stats is not None and decided:
            self.stats.steps_ran += 1
            self._note_step_signals([d for _, d in decided])
        return out

    def _record_skipped_step(self, sigma, sample_sigmas, streams, decisions) -> None:
        """The one place a skipped step is recorded: a call of every stream the last step ran, with
        every block bypassed and the decision's signal."""
        for stream in streams:
            layout, dtype, device, blocks, cost, work = self._last_args[stream]
            d = self.dispatch(layout, sigma, sample_sigmas, stream, dtype, device, blocks, cost, work)
            for block in range(self.stats.blocks):
                self.stats.chain_bypassed(block)
            self._note_step_signals(decisions)
            self.end_call(d)
        if self.stats is not None:
            self.stats.steps_skipped += 1

    def _note_step_signals(self, decisions: Sequence[Optional[StepDecision]]) -> None:
        if self.stats is None or not self.stats.timeline:
            return
        for d in decisions:
            if d is not None and d.estimate is not None:
                self.stats.signal(d.signal, d.estimate, d.threshold)

    def model_call(self, dispatch: SCMDispatch, x: torch.Tensor, network: Callable[[], torch.Tensor],
                   space=None) -> torch.Tensor:
        """Runs `network()` (one model call on input x, through `dispatch`) via the accelerators'
        call hooks, in order; the adapter calls this instead of the network itself. `space`: see
        Accelerator.call."""
        def run_from(i: int):
            if i == len(self.per_call):
                return network()
            return self.per_call[i].call(dispatch, x, lambda: run_from(i + 1), space)

        try:
            return run_from(0)
        finally:
            # run_from refers to itself (a reference cycle): unlinked here, the call's input and
            # network are freed when the call returns, not at the next garbage collection.
            run_from = None

    def end_call(self, dispatch: SCMDispatch) -> None:
        for a in self.per_call:
            a.end_call(dispatch)
        if self.stats is not None:
            self.stats.cache_memory(sum(a.cache_bytes() for a in self.accelerators),
                                    sum(a.cache_bytes() for a in self.accelerators if getattr(a, "bounded", False)))
            for listener in self.listeners:
                listener(self.stats, self.stats.timeline[-1])

    def end(self, peak_memory_bytes: Optional[int] = None) -> RunStats:
        stats = self.stats or RunStats()
        stats.finish(peak_memory_bytes)
        for a in self.accelerators:
            stats.configs[a.name] = a.config.to_dict() if a.config is not None else None
            a.reset()  # free the cache memory now, not at the next run
        self._calls.clear()
        self._signature.clear()
        self._clear_steps()
        self.stats = stats
        for listener in self.listeners:
            listener(stats, None)
        return stats
