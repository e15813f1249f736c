"""The "Turbo4D Memory" node: the user's bound on how much GPU memory the accelerators' caches may
take. MultiView Sampler (SV4D) reads it; without the node the sampler gives the caches whatever
GPU memory stays free beside the sampling (turbo_core.memory.plan), and keeps the rest in CPU
memory. The work itself is split into pieces from the free memory either way. The embedded
model's runs (MultiView Sampler, KSampler) hold their caches to it too (nodes/model.py); the
per-call levels (block and token reuse) cache no more than it allows, whichever sampler runs."""
from __future__ import annotations

from comfy_api.latest import io

from . import model as m

NODE = "Turbo4D Memory"
MEMORY = "memory"  # key in the pack's transformer_options entry (m.OPTIONS_KEY)


def memory_options(model_patcher) -> dict:
    to = model_patcher.model_options.get("transformer_options", {})
    return dict((to.get(m.OPTIONS_KEY) or {}).get(MEMORY) or {})


def cache_limit_bytes(model_patcher):
    """The node's GPU cache bound in bytes, or None (no node, or 0: from the free memory)."""
    gb = memory_options(model_patcher).get("cache_gpu_gb") or 0
    return int(gb * 2**30) if gb > 0 else None


class Turbo4DMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DMemory",
            display_name=NODE,
            category="Turbo4D/accelerate",
            description="How much GPU memory the accelerators' caches may take, every sampler and every cache "
                        "(block and token reuse hold their caches within it; the sub-attention cache and the "
                        "sequence pruner keep the rest in CPU memory, slower to reuse). The stats line reports "
                        "the cache against its bound.",
            inputs=[
                io.Model.Input("model", tooltip="The Turbo4D or SV4D model (after the accelerator nodes or before "
                                                "them) that a sampler samples."),
                io.Float.Input("cache_gpu_gb", default=0.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="GB of GPU memory for the caches. 0 = whatever stays free beside the sampling "
                                       "(the default without this node)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, cache_gpu_gb) -> io.NodeOutput:
        if cache_gpu_gb < 0:
            raise ValueError(f"{NODE}: cache_gpu_gb must be >= 0 (0 = from the free memory), got {cache_gpu_gb}")
        out = model.clone()
        to = out.model_options.setdefault("transformer_options", {})
        opts = dict(to.get(m.OPTIONS_KEY) or {})
        opts[MEMORY] = {"cache_gpu_gb": float(cache_gpu_gb)}
        to[m.OPTIONS_KEY] = opts
        return io.NodeOutput(out)


NODES = [Turbo4DMemory]
