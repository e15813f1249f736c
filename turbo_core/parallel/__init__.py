"""Multi-process sampling: one model call of a V x F grid split over several GPUs (or CPU
processes), over torch.distributed (NCCL between GPUs, gloo on the CPU).

- `plan.py`: how a call is split (CFG halves, frame slices, view slices);
- `comm.py`: the collectives (broadcast, the all-to-all re-shard, gather, signal all-reduce);
- `dispatch.py`: `ShardedDispatch`, the one hook into the core: the SCM dispatch of a rank's share,
  which re-shards the sub-attention whose sequences cross the slices;
- `engine.py`: the process group (workers started here, or a torchrun launch joined);
- `net.py`: `ParallelNet`, rank 0's stand-in for the network, and the workers' side;
- `script.py`: `sample_grid`, sampling from a script on one process or a group.

From a script:

    from turbo_core.parallel import acquire, sample_grid
    group = acquire("cuda:0,cuda:1")                 # or "cpu:2" (gloo), or under torchrun: from_env()
    x, stats = sample_grid(net, EDM(), noise, sigmas, cond, camera, V, F, cfg=2.0, group=group)
    shutdown()                                       # also at interpreter exit
"""
from __future__ import annotations

import atexit
import logging
from typing import Optional

from .engine import ParallelError, ParallelGroup, choose_devices, parse_devices
from .net import ParallelNet, ShardWorker, begin_run, end_run, set_sync_timing, summary_line
from .plan import MODES, ShardPlan, choose_plan
from .script import sample_grid

log = logging.getLogger("turbo4d")

_CURRENT: Optional[ParallelGroup] = None  # torch.distributed allows one default group per process


def acquire(devices, sync_timing: bool = False) -> ParallelGroup:
    """The process group over `devices` (see parse_devices), started if needed; one that is alive
    on the same devices is reused (workers keep their model between runs), another (or one that
    lost a worker between runs) is shut down first."""
    global _CURRENT
    devs = parse_devices(devices)
    g = _CURRENT
    if g is not None and g.alive and g.devices == devs and not g._dead_workers():
        if g.comm.sync_timing != sync_timing:
            set_sync_timing(g, sync_timing)
        return g
    if g is not None:
        g.shutdown()
    _CURRENT = ParallelGroup.start(devs, sync_timing=sync_timing)
    return _CURRENT


def current() -> Optional[ParallelGroup]:
    return _CURRENT if _CURRENT is not None and _CURRENT.alive else None


def shutdown() -> None:
    """Stops the current group's workers (no-op without one)."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.shutdown()
        _CURRENT = None


def from_env() -> Optional[ParallelGroup]:
    """Under torchrun: rank 0's group (the other ranks serve it and exit inside this call)."""
    global _CURRENT
    g = ParallelGroup.from_env(handler=lambda group: ShardWorker(group).handle)
    if g is not None:
        _CURRENT = g
    return g


atexit.register(shutdown)

__all__ = ["MODES", "ParallelError", "ParallelGroup", "ParallelNet", "ShardPlan", "acquire", "begin_run",
           "choose_devices", "choose_plan", "current", "end_run", "from_env", "parse_devices", "sample_grid",
           "set_sync_timing", "shutdown", "summary_line"]
