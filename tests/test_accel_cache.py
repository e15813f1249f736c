"""Rolling spatiotemporal cache: exact when it never reuses, less work and a bounded change when
it does, rolling refresh keeps every part of an entry younger than max_age, memory is counted
and freed."""
import math

import pytest
import torch

from accel_fixtures import full, net, rel_err, sample, CountingAttention
from turbo_core.accel.cache import RollingCache, RollingCacheConfig
from turbo_core.accel.registry import build_run
from turbo_core.layout import AXES, SCMLayout


@pytest.mark.parametrize("threshold", [0.0, 1e-12])
def test_never_reusing_equals_full_compute(net, full, threshold):
    # 1e-12 runs the whole machinery (signals, storage) without ever reusing; 0 is the off switch.
    x, st = sample(net, [("cache", RollingCacheConfig(threshold=threshold, start_percent=0.0))])
    assert torch.equal(x, full)
    assert st.cache_hits == 0


def test_reuse_skips_work_and_bounds_the_change(net, full):
    counting = CountingAttention()
    cfg = RollingCacheConfig(threshold=0.3, max_age=3, start_percent=0.1)
    x, st = sample(net, [("cache", cfg)], backend=counting)
    ref_count = CountingAttention()
    sample(net, [], backend=ref_count)
    done, all_ = counting.by_axis(net), ref_count.by_axis(net)
    for axis in AXES:
        assert done[axis] < 0.8 * all_[axis], (axis, done, all_)
    assert st.cache_hits > 0
    assert 0 < rel_err(x, full) < 2e-3
    assert st.compute_fraction < 0.8


def test_larger_threshold_reuses_more(net):
    fr = [sample(net, [("cache", RollingCacheConfig(threshold=t, start_percent=0.1))])[1].compute_fraction
          for t in (0.02, 0.08, 0.5)]
    assert fr[0] >= fr[1] >= fr[2] and fr[0] > fr[2]


def _run_constant_input(cfg, layout, calls, width=8):
    """Drives one (block 0) set of sub-attentions directly with an unchanging input, so the change
    signal is 0 and every call after the first reuses; each compute returns its call number, so
    the output says how old every sequence is."""
    run = build_run([("cache", cfg)])
    run.begin()
    x = torch.randn(layout.images, layout.tokens, width)
    sig = torch.linspace(10, 0.1, calls).tolist() + [0.0]
    log = []
    for call in range(calls):
        d = run.dispatch(layout, sig[call], sig, dtype=torch.float32, device="cpu", blocks=1)
        for axis in AXES:
            seen = []

            def compute(s, idx, call=call, seen=seen):
                seen.append(idx)
                return torch.full_like(s, float(call))

            out = d.attend(0, axis, layout.to_axis(x, axis), compute)
            log.append((call, axis, out[:, 0, 0].clone(), seen))
        run.end_call(d)
    return run, log


def test_rolling_refresh_never_lets_an_entry_grow_older_than_max_age():
    lay = SCMLayout(2, 3, 5, 2, 2)  # batch 2: the groups repeat per batch item
    cfg = RollingCacheConfig(threshold=1.0, max_age=2, start_percent=0.0, end_percent=1.0, signal_stride=1)
    run, log = _run_constant_input(cfg, lay, calls=10)
    for call, axis, stamp, seen in log:
        age = call - stamp
        assert age.max() <= cfg.max_age, (call, axis)
        assert len(seen) == 1
        idx = seen[0]
        if call == 0:
            assert idx is None and age.max() == 0
            continue
        groups = lay.sequence_groups(axis)
        chosen = groups[idx].unique()
        # Whole groups are refreshed, ceil(G / (max_age + 1)) of them, and only they are new.
        assert sorted(idx.tolist()) == torch.isin(groups, chosen).nonzero().flatten().tolist()
        assert len(chosen) == math.ceil(lay.group_count(axis) / (cfg.max_age + 1))
        fresh = (age == 0).nonzero().flatten()
        assert fresh.tolist() == sorted(idx.tolist())
    st = run.end()
    assert st.cache_hits == 3 * 9
    # Each sub-attention reused all rows but the refreshed groups.
    for axis in AXES:
        s = lay.axis_shape(axis)[0]
        g = lay.group_count(axis)
        refreshed = math.ceil(g / 3) * (s // g)
        assert st.sequences_reused[axis] == 9 * (s - refreshed)
        assert st.sequences_computed[axis] == s + 9 * refreshed


def test_change_over_threshold_recomputes_everything():
    lay = SCMLayout(1, 2, 3, 2, 2)
    cfg = RollingCacheConfig(threshold=0.05, max_age=4, start_percent=0.0, end_percent=1.0, signal_stride=1)
    run = build_run([("cache", cfg)])
    run.begin()
    x = torch.randn(lay.images, lay.tokens, 8)
    sig = [3.0, 2.0, 1.0, 0.5, 0.0]
    calls = []
    for i, scale in enumerate([1.0, 1.01, 1.5, 1.5]):  # 1% change: reuse; 50%: recompute
        d = run.dispatch(lay, sig[i], sig, dtype=torch.float32, device="cpu", blocks=1)
        seen = []
        d.attend(0, "spatial", x * scale, lambda s, idx: (seen.append(idx), s)[1])
        run.end_call(d)
        calls.append(seen[0])
    assert calls[0] is None and calls[1] is not None and calls[2] is None and calls[3] is not None
    st = run.end()
    assert st.cache_misses == 1 and st.cache_hits == 2
    sig_values = [v for t in st.timeline for v, _ in t["signal"].get("cache.spatial.b0", [])]
    assert sig_values[0] == pytest.approx(0.01, rel=1e-4) and sig_values[1] > 0.05


def test_memory_is_counted_and_freed(net):
    cfg = RollingCacheConfig(threshold=0.3, start_percent=0.0, storage="native")
    run = build_run([("cache", cfg)])
    x, st = sample(net, None, run=run)
    c = net.cfg
    images, tokens = 3 * 4, c.grid ** 2
    out = 3 * images * tokens * c.width * 4              # three axes, fp32 outputs
    ref = (images * math.ceil(tokens / 8) + 2 * math.ceil(images * tokens / 8)) * c.width * 4
    assert st.cache_bytes_peak == c.depth * (out + ref)
    assert all(a.cache_bytes() == 0 and not a.streams for a in run.accelerators)


def test_fp16_and_cpu_storage(net, full):
    native, st_n = sample(net, [("cache", RollingCacheConfig(threshold=0.3))])
    half, st_h = sample(net, [("cache", RollingCacheConfig(threshold=0.3, storage="fp16"))])
    cpu, st_c = sample(net, [("cache", RollingCacheConfig(threshold=0.3, storage="cpu"))])
    assert st_h.cache_bytes_peak < 0.6 * st_n.cache_bytes_peak
    assert rel_err(half, native) < 1e-4 and rel_err(cpu, native) < 1e-4
    assert torch.equal(half, cpu)  # the same 16-bit values, in another place


def test_window_and_end_release(net):
    cfg = RollingCacheConfig(threshold=10.0, start_percent=0.5, end_percent=0.7)
    x, st = sample(net, [("cache", cfg)])
    for t in st.timeline:
        reused = any(c == "cached" for c in t["cells"].values())
        assert reused == (0.5 <= t["percent"] <= 0.7), t["percent"]


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="max_age"):
        RollingCacheConfig(max_age=0)
    with pytest.raises(ValueError, match="axes"):
        RollingCacheConfig(axes=("spatial", "time"))
    with pytest.raises(ValueError, match="storage"):
        RollingCacheConfig(storage="disk")
    with pytest.raises(ValueError, match="start_percent"):
        RollingCacheConfig(start_percent=0.9, end_percent=0.1)
    with pytest.raises(ValueError, match="unknown settings"):
        RollingCacheConfig.from_dict({"treshold": 0.1})
    assert RollingCacheConfig.from_dict(RollingCacheConfig().to_dict()) == RollingCacheConfig()
    assert isinstance(build_run([("cache", {"threshold": 0.2})]).accelerators[0], RollingCache)
