"""The accelerators' cache under a CacheBudget: within the device limit, the rest in CPU memory,
counted while held and released when the accelerators drop it, with results unchanged."""
import pytest
import torch

from accel_fixtures import net, sample  # noqa: F401  (fixture)
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.cache import RollingCacheConfig
from turbo_core.accel.presets import turbo4d_specs
from turbo_core.accel.prune import TokenPrunerConfig
from turbo_core.accel.storage import TensorStore
from turbo_core.memory import CacheBudget, cache_budget


# The stores the budget places: the sub-attention cache and the sequence pruner with the step skip
# (the Turbo4D fast preset before block reuse replaced them there).
STORED = turbo4d_specs("fast")[:1] + [("cache", RollingCacheConfig(threshold=0.3, max_age=5)),
                                      ("prune", TokenPrunerConfig(keep_start=0.45, keep_end=0.3, start_percent=0.1))]


def test_budget_places_the_cache_and_keeps_the_result(net):
    specs = STORED
    ref, st_ref = sample(net, specs)
    roomy = CacheBudget(gpu_bytes=1 << 40)
    with cache_budget(roomy):
        out, _ = sample(net, specs)
    assert torch.equal(out, ref)
    need = roomy.peak["gpu"]
    assert need > 0 and roomy.peak["cpu"] == 0
    assert roomy.live == {"gpu": 0, "cpu": 0}  # the run's end dropped every entry

    tight = CacheBudget(gpu_bytes=need // 3)
    with cache_budget(tight):
        out, st = sample(net, specs)
    assert torch.equal(out, ref)  # same dtype, other place: the same values come back
    assert 0 < tight.peak["gpu"] <= need // 3
    assert tight.peak["cpu"] > 0
    assert tight.live == {"gpu": 0, "cpu": 0}
    assert st.summary()["compute_fraction"] == st_ref.summary()["compute_fraction"]


def test_budget_half_precision_and_explicit_cpu_mode():
    budget = CacheBudget(gpu_bytes=1 << 20, half=torch.bfloat16)
    t = torch.randn(64, 32)
    with cache_budget(budget):
        kept = TensorStore("native").keep(t.clone())
        on_cpu = TensorStore("cpu").put(t)
    assert kept.dtype == torch.bfloat16 and budget.live["gpu"] == kept.numel() * 2
    assert on_cpu.dtype == torch.bfloat16 and budget.live["cpu"] == on_cpu.numel() * 2
    del kept, on_cpu
    assert budget.live == {"gpu": 0, "cpu": 0}
    # Outside the block, stores do as their modes say.
    assert TensorStore("native").put(t).dtype == torch.float32
    with pytest.raises(ValueError, match="half must be"):
        CacheBudget(1, half=torch.float32)


def test_per_call_caches_reserve_their_bound_in_the_budget_and_give_it_back(net):
    # The Turbo4D Memory node's bound caps block reuse's own (a tenth of the call) and is shared:
    # what block reuse sets aside is not left to the other caches, and comes back at the run's end.
    specs = [("block_reuse", BlockReuseConfig(threshold=0.5))]
    _, st_free = sample(net, specs)
    free = st_free.summary()["cache_bound_mb"] * 2**20
    budget = CacheBudget(gpu_bytes=int(free // 2))
    with cache_budget(budget):
        _, st = sample(net, specs)
    assert st.cache_bound_bytes <= budget.gpu_bytes and budget.peak["gpu"] == st.cache_bound_bytes
    assert st.bounded_cache_peak <= st.cache_bound_bytes
    assert budget.live == {"gpu": 0, "cpu": 0}
