"""Turbo4D Multi-GPU: a MODEL whose sampling runs split every model call over several GPUs
(turbo_core.parallel: CFG halves, frame slices or view slices, one worker process per further GPU,
torch.distributed with NCCL). The ComfyUI server's process is rank 0 and drives the workers.

The node only records where and how to split (`transformer_options[CONFIG_KEY]`) and adds an
OUTER_SAMPLE wrapper; the wrapper runs inside the Turbo4D one (wrappers run in the order they were
added, and the loader adds Turbo4D's first), so it finds the run's accelerators, starts or reuses
the worker processes, puts the split network where the model's forward looks for a stand-in
(model.NET_KEY), and gathers the workers' statistics into the run's before the run reports.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.model_management
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from turbo_core import parallel
from turbo_core.models.scm_net import SCMNet
from turbo_core.models.trajectorycrafter import TrajectoryCrafterTransformer

from . import model as m

log = logging.getLogger("turbo4d")

NODE = "Turbo4D Multi-GPU"
CONFIG_KEY = "turbo4d_parallel"   # transformer_options[CONFIG_KEY] = {"devices": [...], "mode": ...}
WRAPPER_KEY = "turbo4d_parallel"


def resolve_devices(devices: str, comfy_device=None) -> tuple[Optional[list], str]:
    """(devices of the group, rank 0 first; or None to run on one) and a line for the log, with rank 0
    the device ComfyUI runs the model on (turbo_core.parallel.choose_devices)."""
    comfy_device = torch.device(comfy_device if comfy_device is not None else comfy.model_management.get_torch_device())
    return parallel.choose_devices(devices, comfy_device, NODE)


def parallel_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE, inside Turbo4D's: one sampling run split over the node's processes."""
    guider = executor.class_obj
    to = guider.model_options.get("transformer_options", {})
    conf, run = to.get(CONFIG_KEY), to.get(m.RUN_KEY)
    if conf is None or run is None:
        return executor(*args, **kwargs)
    net = m.get_scm_net(guider.model_patcher, NODE)
    try:
        group = parallel.acquire(conf["devices"])
    except (parallel.ParallelError, ValueError, RuntimeError) as e:
        raise RuntimeError(f"{NODE}: could not start the worker processes on {', '.join(conf['devices'])}: {e}") from e
    specs = list((to.get(m.OPTIONS_KEY) or {}).get("accelerators", []))
    parallel.begin_run(group, specs, run.backend)
    to[m.NET_KEY] = parallel.ParallelNet(net, group, conf["mode"])
    try:
        return executor(*args, **kwargs)
    finally:
        to.pop(m.NET_KEY, None)
        if group.alive:
            try:
                summary = parallel.end_run(group, run.stats)
                if summary is not None:
                    log.info("%s", parallel.summary_line(summary, NODE))
            except parallel.ParallelError as e:  # the run's own outcome stands; the group restarts next run
                log.error("%s: gathering the workers' statistics failed: %s", NODE, e)


class Turbo4DMultiGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DMultiGPU",
            display_name=NODE,
            category="Turbo4D/accelerate",
            description="Splits every model call of the sampling run over several GPUs, one worker process per "
                        "further GPU (torch.distributed, NCCL): the CFG halves on different GPUs, or each GPU a "
                        "slice of the frames or views (motion or camera attention exchanged with an all-to-all). "
                        "The result is the one-GPU result; the accelerator nodes compose (every GPU takes the "
                        "same decisions). MultiView Sampler, MultiView Sampler (SV4D) and TrajectoryCrafter Sampler "
                        "honour it (SV4D and TrajectoryCrafter: the CFG halves only, so cfg > 1); with one GPU or "
                        "none it runs on one and says so in the log.",
            inputs=[
                io.Model.Input("model", tooltip="A Turbo4D model (Turbo4D Model Loader, SV4D or TrajectoryCrafter "
                                                "Loader, optionally through the accelerator nodes, in any order)."),
                io.String.Input("devices", default="all",
                                tooltip="Which GPUs: 'all' (every visible GPU), or indices such as '0,1'. The GPU "
                                        "ComfyUI runs the model on is always one of them and drives the others. "
                                        "'cpu:N' runs N CPU processes (gloo) when ComfyUI runs on the CPU: for "
                                        "tests, it is not faster."),
                io.Combo.Input("mode", options=list(parallel.MODES), default="auto",
                               tooltip="How a call is split. auto: the CFG halves when cfg > 1 batches them (no "
                                       "exchange inside the network), else the frames or views, whichever splits "
                                       "more evenly. cfg / frames / views force one; a call it cannot split falls "
                                       "back to auto (the log says so). SV4D and TrajectoryCrafter models split the "
                                       "CFG halves only."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The same model, sampled over the chosen processes.")],
        )

    @classmethod
    def execute(cls, model, devices: str, mode: str) -> io.NodeOutput:
        net = m.get_scm_net(model, NODE)
        if mode not in parallel.MODES:
            raise ValueError(f"{NODE}: mode={mode!r}; pick one of {list(parallel.MODES)}.")
        if not isinstance(net, SCMNet) and mode in ("frames", "views"):
            log.info("%s: %s models split only the CFG halves; mode %s runs as cfg.", NODE,
                     "TrajectoryCrafter" if isinstance(net, TrajectoryCrafterTransformer) else "SV4D", mode)
        devs, line = resolve_devices(devices)
        if devs is None:
            log.info("%s", line)
            return io.NodeOutput(model)
        log.info("%s, mode %s: %s", line, mode, ", ".join(str(d) for d in devs))
        mp = model.clone()
        to = mp.model_options.setdefault("transformer_options", {})
        to[CONFIG_KEY] = {"devices": [str(d) for d in devs], "mode": mode}
        if not mp.get_wrappers(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
            mp.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, parallel_sample_wrapper)
        return io.NodeOutput(mp)


NODES = [Turbo4DMultiGPU]
