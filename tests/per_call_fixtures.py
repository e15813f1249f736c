"""Pieces of the per-call reuse tests (block reuse, token reuse): an independent count of the work
the network's linear layers do, a guard that fails on host syncs inside a model call, and a probe
of the cache memory after every call."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from turbo_core.models.scm_net import MLP, AxisAttention


class LinearRows:
    """Counts the token rows each kind of linear layer of an SCMNet processes (forward hooks on the
    modules, independent of RunStats): spatial/camera/motion projections and the MLP."""

    def __init__(self, net):
        self.rows = defaultdict(int)
        self.handles = []
        for blk in net.blocks:
            for kind in ("spatial", "camera", "motion"):
                att: AxisAttention = getattr(blk, kind)
                self._hook(att.proj, f"{kind}.proj")
                self._hook(att.norm, f"{kind}.norm")
            mlp: MLP = blk.mlp
            self._hook(mlp.fc1, "mlp")

    def _hook(self, mod, key):
        def count(m, args, out):
            self.rows[key] += out.numel() // out.shape[-1]

        self.handles.append(mod.register_forward_hook(count))

    def close(self):
        for h in self.handles:
            h.remove()


class HostSync(RuntimeError):
    pass


_SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default,
            torch.ops.aten.masked_select.default, torch.ops.aten.unique_dim.default,
            torch.ops.aten._unique2.default}


class NoHostSync(TorchDispatchMode):
    """Fails on the operations that read device data on the host (.item(), float(t), nonzero,
    torch.equal, boolean masks, unique): on a GPU each would stall the call until the device
    catches up. The CPU stand-in for torch.cuda.set_sync_debug_mode("error")."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            raise HostSync(f"host sync inside a model call: {func}")
        return func(*args, **(kwargs or {}))


class SyncGuarded:
    """The network with NoHostSync around each of its calls (the accelerators' per-call hooks
    outside the network are not inside it)."""

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, *args, **kwargs):
        with NoHostSync():
            return self.net(*args, **kwargs)


def cache_probe(run):
    """A run listener recording the accelerators' cache bytes after every model call."""
    seen = []

    def listener(stats, entry):
        if entry is not None:
            seen.append(sum(a.cache_bytes() for a in run.accelerators))

    run.listeners.append(listener)
    return seen


def plan_probe(run, name):
    """A run listener recording, after every model call, the span plan of the accelerator `name`
    (block_reuse or token_reuse): (spans, forecast on, bound measured) of each of its streams."""
    seen = []
    acc = next(a for a in run.accelerators if a.name == name)

    def listener(stats, entry):
        if entry is not None:
            for st in acc.streams.values():
                seen.append((st.spans, getattr(st, "forecast", None), st.bound.measured))

    run.listeners.append(listener)
    return seen


def deep_net(seed: int):
    """Four blocks of random weights at small scale, so that spans and head blocks both exist."""
    from turbo_core.models import SCMNet, SCMNetConfig

    torch.manual_seed(seed)
    n = SCMNet(SCMNetConfig(image_size=16, patch_size=2, width=32, depth=4, heads=2))
    with torch.no_grad():
        for p in n.parameters():
            p.normal_(0, 0.05)
    return n.eval()
