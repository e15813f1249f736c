"""The SV4D nodes' memory side, in process with the host's ComfyUI modules (CPU): the Turbo4D
Memory node's cache bound, ComfyUI's memory estimate of the SV4D model, and the sampler's merge of
per-pass stats (per-level counts, cache placement, out-of-memory retries)."""
import pytest
import torch

from conftest import import_pack_nodes
from turbo_core.accel.stats import MemoryReport, RunStats
from turbo_core.layout import SCMLayout
from turbo_core.models.sv4d import SV4DConfig, SV4DUNet
from turbo_core.schedule import StepInfo


@pytest.fixture(scope="module")
def pack():
    return import_pack_nodes()


def test_memory_node_sets_the_cache_bound(pack):
    mem, g = pack("memory_limit"), pack("model_sv4d")
    mp = g.make_sv4d_model_patcher(SV4DUNet(SV4DConfig.reduced()))
    assert mem.cache_limit_bytes(mp) is None
    bounded = mem.Turbo4DMemory.execute(mp, 12.5).result[0]
    assert mem.cache_limit_bytes(bounded) == int(12.5 * 2**30)
    assert mem.cache_limit_bytes(mp) is None  # the node cloned the model
    assert mem.cache_limit_bytes(mem.Turbo4DMemory.execute(mp, 0.0).result[0]) is None  # 0 = from free memory
    with pytest.raises(ValueError, match="cache_gpu_gb must be >= 0"):
        mem.Turbo4DMemory.execute(mp, -1.0)


def test_comfy_memory_estimate_is_the_forward_s_own(pack):
    g = pack("model_sv4d")
    net = SV4DUNet(SV4DConfig.reduced())
    mp = g.make_sv4d_model_patcher(net)
    shape = [378, 8, 72, 72]
    est = mp.model.memory_required(shape)
    assert est == net.activation_bytes(378, 72, 72, 4) + g.PIECE_ROOM
    assert mp.model.memory_required([756, 8, 72, 72]) - g.PIECE_ROOM == 2 * (est - g.PIECE_ROOM)


def _stats(work, computed):
    st = RunStats(blocks=2)
    st.begin_call(StepInfo(0, 1.0, 0.0, 1, "s"), SCMLayout(1, 2, 2, 4, 4), work)
    for (b, a), n in computed.items():
        st.attention_ran(b, a, n, work[(b, a)][0])
    return st


def test_sampler_merges_per_level_counts_and_memory(pack):
    sv = pack("sv4d")
    work = {(0, "camera"): (32, 10.0), (1, "camera"): (8, 40.0)}
    a, b = _stats(work, {(0, "camera"): 32, (1, "camera"): 4}), _stats(work, {(0, "camera"): 16})
    a.memory = MemoryReport(retries=1, gpu_limit_mb=100.0, gpu_peak_mb=80.0, cpu_peak_mb=0.0)
    b.memory = MemoryReport(retries=2, gpu_limit_mb=100.0, gpu_peak_mb=100.0, cpu_peak_mb=50.0)
    m = RunStats.merge([a, b])
    counts = m.block_counts()["camera"]
    assert counts[0]["computed"] == 48 and counts[0]["total"] == 64
    assert counts[1]["computed"] == 4 and counts[1]["total"] == 16
    assert m.flops_done == pytest.approx(48 * 10 + 4 * 40) and m.flops_full == pytest.approx(64 * 10 + 16 * 40)
    assert m.memory == MemoryReport(retries=3, gpu_limit_mb=100.0, gpu_peak_mb=100.0, cpu_peak_mb=50.0)
    line = m.format_line()
    assert "cache on GPU 0.1 of 0.1 GB allowed, in CPU memory 0.0 GB" in line and "3 out-of-memory retries" in line
    assert sv.plan_memory(None, None, 12, 16) == (None, None)  # the host runs on the CPU: no plan


@pytest.mark.parametrize("family", ["sv4d", "turbo4d"])
def test_denoised_space_is_comfy_s_own_parameterisation(pack, family):
    """The whole-step skip holds denoised images; the adapters' map from a call's raw output to the
    denoised image must be ComfyUI's model_sampling (V_PREDICTION_EDM for SV4D, EDM for ours)."""
    from turbo_core.models import CONFIGS, SCMNet

    g = torch.Generator().manual_seed(0)
    if family == "sv4d":
        glue = pack("model_sv4d")
        mp = glue.make_sv4d_model_patcher(SV4DUNet(SV4DConfig.reduced()))
        channels, extra, space_of = 4, 4, glue.v_denoised_space
    else:
        glue = pack("model")
        net = SCMNet(CONFIGS["tiny"])
        mp = glue.make_model_patcher(net, torch.float32)
        channels, extra = 3, 3
        space_of = lambda x, to: glue.denoised_space(net, x, to)  # noqa: E731
    ms = mp.model.model_sampling
    sigma = torch.full((6,), 3.7)
    noisy = torch.randn(6, channels, 8, 8, generator=g) * 3.7
    x_in = torch.cat([ms.calculate_input(sigma, noisy), torch.randn(6, extra, 8, 8, generator=g)], dim=1)
    f = torch.randn(6, channels, 8, 8, generator=g)
    space = space_of(x_in, {"sigmas": sigma[:3]})  # a CFG-batched call carries the sampler's sigmas
    want = ms.calculate_denoised(sigma, f, noisy)
    torch.testing.assert_close(space.denoised(f), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(space.output(want), f, rtol=1e-4, atol=1e-4)
    assert space_of(x_in, {}) is None
    # the phase the whole-step skip places calls at, without a host sync, is the one c_skip implies
    import math
    assert space.sigma_data == pytest.approx(float(ms.sigma_data))
    assert math.atan(3.7 / space.sigma_data) == pytest.approx(math.acos(float(space.c_skip.flatten()[0]) ** 0.5))
