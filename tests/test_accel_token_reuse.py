"""Token reuse: a block computed at a subset of token positions is exactly the full block there;
spans run on the kept tokens skip that share of the camera and motion projections, attention and
MLP rows and of the spatial queries; the output changes within a bound, no position is reused past
max_age, the subset sizes come from the fixed buckets, the memory bound holds, nothing syncs with
the host inside a call, it composes with the step skip, and the statistics are what happened."""
import pytest
import torch

from accel_fixtures import CountingAttention, grid_inputs, rel_err, sample, V, F
from per_call_fixtures import LinearRows, SyncGuarded, cache_probe, deep_net, plan_probe
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.accel.registry import build_run
from turbo_core.accel.token_reuse import TokenReuseConfig, bucket_size
from turbo_core.dispatch import FullCompute
from turbo_core.layout import SCMLayout

BIG = 1000.0


def apply_token_reuse(specs, cfg):
    return list(specs) + [("token_reuse", cfg)]


@pytest.fixture(scope="module")
def deep():
    return deep_net(5)


@pytest.fixture(scope="module")
def deep_full(deep):
    return sample(deep, [])[0]


def test_block_at_a_subset_of_positions_equals_the_full_block_there(deep):
    lay = SCMLayout(2, V, F, 8, 8)
    torch.manual_seed(0)
    x = torch.randn(lay.images, lay.tokens, 32)
    temb, cam, frm = (torch.randn(lay.images, 32) for _ in range(3))
    d = FullCompute(lay, backend="sdpa")
    blk = deep.blocks[1]
    captured = {}

    class Probe(FullCompute):
        def chain(self, block, h, chain, tokens=None, stream=False):
            captured["tokens"] = tokens
            return chain(h)

    y = blk(x, temb, cam, frm, lay, Probe(lay, backend="sdpa"))
    pos = torch.stack([torch.randperm(lay.tokens)[:20].sort().values, torch.randperm(lay.tokens)[:20].sort().values])
    part = captured["tokens"](x, pos)
    expect = torch.stack([y[i][pos[i // (V * F)]] for i in range(lay.images)])
    assert torch.allclose(part, expect, atol=1e-5), (part - expect).abs().max()
    every = captured["tokens"](x, torch.arange(lay.tokens).expand(2, -1))
    assert torch.allclose(every, y, atol=1e-5)
    del d


@pytest.mark.parametrize("cfg", [dict(threshold=0.0), dict(keep_min=1.0)])
def test_never_reusing_equals_full_compute(deep, deep_full, cfg):
    # threshold 0 is the off switch; keep_min 1 keeps every position (the whole machinery runs).
    x, st = sample(deep, apply_token_reuse([], TokenReuseConfig(max_cache_mb=BIG, **cfg)))
    assert torch.equal(x, deep_full)
    assert st.summary()["tokens_computed"] == 0


def test_reuse_skips_projections_mlp_and_attention_within_bound(deep, deep_full, monkeypatch):
    # The module hooks count rows the modules see: the norms' fused kernel (token_fuse, where
    # Triton runs) bypasses the module, so this count runs the unfused path.
    monkeypatch.setenv("TURBO4D_TOKEN_FUSE", "torch")
    cfg = TokenReuseConfig(threshold=1.0, spans=1, max_cache_mb=BIG)
    ref_rows = LinearRows(deep)
    ref_count = CountingAttention()
    sample(deep, [], backend=ref_count)
    ref_rows.close()
    rows, counting = LinearRows(deep), CountingAttention()
    run = build_run(apply_token_reuse([], cfg), backend=counting)
    plans = plan_probe(run, "token_reuse")
    x, st = sample(deep, None, run=run)
    rows.close()
    s = st.summary()
    assert plans[-1][0] == [(1, 3)]
    assert 0 < s["tokens_computed"] < s["tokens_offered"]
    skipped = s["tokens_offered"] - s["tokens_computed"]  # image tokens not run through a block
    for key in ("camera.proj", "motion.proj", "mlp", "spatial.proj"):
        # Every per-token layer ran exactly the kept tokens (spatial: its queries' output projection).
        assert rows.rows[key] == ref_rows.rows[key] - skipped, key
    # The spatial norm runs on every token once (the keys and values read all of them).
    assert rows.rows["spatial.norm"] == ref_rows.rows["spatial.norm"]
    # Camera and motion attention ran only the kept positions' sequences.
    lay = deep.token_layout(V * F, V, F)
    for length, per_seq_tokens in ((V, V), (F, F)):
        assert counting.sequences[length] == ref_count.sequences[length] - skipped // per_seq_tokens
    assert 0 < rel_err(x, deep_full) < 0.05
    assert st.compute_fraction < 0.9
    del lay


def test_no_position_is_reused_past_max_age(deep):
    for max_age in (1, 3):
        cfg = TokenReuseConfig(threshold=10.0, spans=1, max_age=max_age, max_cache_mb=BIG, weigh_output=False)
        run = build_run(apply_token_reuse([], cfg))
        acc = run.accelerators[0]
        ages = []

        def listener(stats, entry):
            if entry is None:
                return
            for st in acc.streams.values():
                for e in st.entries.values():
                    ages.append((entry["step"], int((entry["step"] - e.at).max())))

        run.listeners.append(listener)
        x, st = sample(deep, None, run=run)
        assert ages and max(a for _, a in ages) <= max_age, (max_age, ages)
        assert max(a for _, a in ages) == max_age  # the bound is reached, and held
        assert st.summary()["tokens_computed"] < st.summary()["tokens_offered"]


def test_subset_sizes_come_from_the_buckets(deep):
    cfg = TokenReuseConfig(threshold=0.5, spans=1, buckets=4, max_cache_mb=BIG)
    sizes = set()
    net_tokens = deep.cfg.grid ** 2

    class Sizes(CountingAttention):
        def __call__(self, q, k, v):
            if q.shape[-2] != k.shape[-2]:
                sizes.add(q.shape[-2])
            return super().__call__(q, k, v)

    sample(deep, apply_token_reuse([], cfg), backend=Sizes())
    assert sizes and sizes <= {net_tokens // 4, net_tokens // 2, 3 * net_tokens // 4}
    assert bucket_size(1, 64, 4) == 16 and bucket_size(17, 64, 4) == 32 and bucket_size(64, 64, 4) == 64
    assert bucket_size(5, 10, 3) == 8 and bucket_size(9, 10, 3) == 10


def test_memory_bound_is_never_exceeded(deep):
    lay = deep.token_layout(V * F, V, F)
    per_span = lay.images * lay.tokens * (32 + 4) * 2 + lay.batch * lay.tokens * 4
    for mb, spans in ((per_span * 1.5 / 2**20, 1), (per_span * 3.1 / 2**20, 3), (per_span * 0.9 / 2**20, 0)):
        run = build_run(apply_token_reuse([], TokenReuseConfig(threshold=1.0, max_cache_mb=mb)))
        seen = cache_probe(run)
        plans = plan_probe(run, "token_reuse")
        x, st = sample(deep, None, run=run)
        assert len(plans[-1][0]) == spans
        assert max(seen) <= mb * 2**20
        if spans == 0:
            assert st.summary()["tokens_computed"] == 0


def test_a_bound_just_short_of_one_span_holds_one_with_a_coarser_sample(deep):
    # The large configuration's edge: a tenth of the working set holds the span's residual but not
    # its input sample. The estimate (CPU: ESTIMATE_ACTIVATIONS stream tensors) sets the bound here.
    from turbo_core.accel.bound import ESTIMATE_ACTIVATIONS
    from turbo_core.accel.token_reuse import SPAN_SLACK

    lay = deep.token_layout(V * F, V, F)
    stream = lay.images * lay.tokens * 32 * 4             # fp32
    residual = lay.images * lay.tokens * 32 * 2           # one 16-bit residual
    for over, held in ((1.01, True), (0.99, True), (0.9, False)):
        frac = over * residual / (ESTIMATE_ACTIVATIONS * stream)
        run = build_run(apply_token_reuse([], TokenReuseConfig(threshold=1.0, memory_fraction=frac)))
        seen = cache_probe(run)
        plans = plan_probe(run, "token_reuse")
        x, st = sample(deep, None, run=run)
        bound = int(frac * ESTIMATE_ACTIVATIONS * stream)
        s = st.summary()
        if held:
            assert len(plans[-1][0]) == 1 and 0 < s["tokens_computed"] < s["tokens_offered"]
            shown = s["cache_bound_mb"] * 2**20  # rounded to 1e-3 MB
            assert shown <= bound * (1 + SPAN_SLACK) + 600
            assert max(seen) <= shown + 600  # the bound shown is the one held
            assert max(seen) > bound  # over the fraction's figure (within the slack) ...
            assert any("short of one span" in n for n in st.notes)  # ... and the run says so
        else:
            assert plans[-1][0] == [] and s["tokens_computed"] == 0 and max(seen) == 0
    # An explicit bound (max_cache_mb) is never exceeded, however close.
    mb = 1.01 * residual / 2**20
    run = build_run(apply_token_reuse([], TokenReuseConfig(threshold=1.0, max_cache_mb=mb)))
    seen = cache_probe(run)
    x, st = sample(deep, None, run=run)
    assert max(seen) <= mb * 2**20


def test_no_host_sync_inside_a_call(deep):
    x, st = sample(SyncGuarded(deep), apply_token_reuse([], TokenReuseConfig(threshold=1.0, max_cache_mb=BIG)))
    assert st.summary()["tokens_computed"] > 0


def test_composes_with_the_step_skip(deep):
    def step(t):
        return StepSkipConfig(step_threshold=t, start_percent=0.0, end_percent=1.0, kappa_prior=0.4,
                              step_max_skips=10_000)

    alone, st_alone = sample(deep, [("step", step(0.5))])
    x, st = sample(deep, [("step", step(0.5))] + apply_token_reuse([], TokenReuseConfig(max_cache_mb=BIG)))
    assert st.calls_aside["token_reuse"] == 1 and st.summary()["tokens_computed"] == 0
    assert torch.equal(x, alone)
    alone, st_alone = sample(deep, [("step", step(0.1))])
    x, st = sample(deep, [("step", step(0.1))] + apply_token_reuse(
        [], TokenReuseConfig(threshold=1.0, max_age=8, max_cache_mb=BIG)))
    assert st.summary()["model_calls_run"] == st_alone.summary()["model_calls_run"]
    assert st.summary()["tokens_computed"] > 0
    assert st.compute_fraction < st_alone.compute_fraction
    assert 0 < rel_err(x, alone) < 0.02


def test_config_errors():
    for bad in (dict(keep_min=0.0), dict(keep_min=1.5), dict(buckets=0), dict(max_age=0), dict(threshold=-1),
                dict(drift_prior=-1), dict(memory_fraction=2.0), dict(spans=-1)):
        with pytest.raises(ValueError, match="TokenReuseConfig"):
            TokenReuseConfig(**bad)


def test_interrupted_run_leaves_nothing_and_next_run_is_fresh(deep):
    from turbo_core.accel.block_reuse import BlockReuseConfig

    for specs in (apply_token_reuse([], TokenReuseConfig(threshold=1.0, max_cache_mb=BIG)),
                  [("block_reuse", BlockReuseConfig(threshold=0.5, max_cache_mb=BIG))]):
        run = build_run(specs)

        def interrupt(i, x, den):
            if i == 6:
                raise RuntimeError("interrupted by the user")

        with pytest.raises(RuntimeError, match="interrupted"):
            sample(deep, None, run=run, callback=interrupt)
        assert all(a.cache_bytes() == 0 and not a.streams for a in run.accelerators)
        again, st_again = sample(deep, None, run=run)  # the same run object, reused
        fresh, st_fresh = sample(deep, specs)
        assert torch.equal(again, fresh)
        assert st_again.summary() | {"seconds": 0} == st_fresh.summary() | {"seconds": 0}


def test_high_noise_calls_reuse_more_weighed_by_what_reaches_the_final_image(deep):
    # An error of a high-noise call's output is mostly denoised away by the later calls
    # (spans.final_weight); weighed by the call's denoised image alone (weigh_final False) the
    # second call of 6 counts as much as the fourth. Work counted through the dispatch's attention
    # backend (camera sequences per call), the output held to its bound, the cache to its bound.
    lay = deep.token_layout(V * F, V, F)
    per_span = lay.images * lay.tokens * (32 + 4) * 2 + lay.batch * lay.tokens * 4
    mb = per_span * 1.5 / 2**20
    full_seqs = lay.images * lay.tokens // V * (deep.cfg.depth - 1)  # camera sequences of the span's blocks
    per_call, outs = {}, {}
    for final in (False, True):
        counting = CountingAttention()
        run = build_run(apply_token_reuse([], TokenReuseConfig(threshold=0.2, spans=1, max_cache_mb=mb,
                                                                weigh_final=final)), backend=counting)
        seen = cache_probe(run)
        counts = []
        run.listeners.append(lambda stats, entry: entry is not None and counts.append(counting.sequences[V]))
        x, st = sample(deep, None, run=run, steps=6)
        per_call[final] = [b - a for a, b in zip([0] + counts, counts)]
        outs[final] = (x, st)
        assert max(seen) <= mb * 2**20
    ref = sample(deep, [], steps=6)[0]
    old, new = per_call[False], per_call[True]
    head = lay.images * lay.tokens // V  # the head block runs every position
    # The second call (sigma 24): the old weight computes half the positions, the new one the
    # least bucket (keep_min 0.25).
    assert old[1] == head + full_seqs // 2
    assert new[1] == head + full_seqs // 4
    assert sum(new) < sum(old)
    assert outs[True][1].compute_fraction < outs[False][1].compute_fraction
    assert 0 < rel_err(outs[True][0], ref) < 0.05


def test_final_weight_follows_the_schedule():
    from turbo_core.accel.spans import final_weight, output_weight
    from turbo_core.diffusion import EDM, karras_sigmas
    from turbo_core.schedule import next_sigma

    edm = EDM(sigma_data=0.5)
    s = karras_sigmas(6).tolist()
    x = torch.zeros(1, 3, 4, 4)
    w = [final_weight(s[i], next_sigma(s[i], s), edm.output_space(x, s[i])) for i in range(6)]
    assert [round(v, 3) for v in w] == [0.02, 0.085, 0.458, 0.875, 0.168, 0.004]
    assert next_sigma(s[5], s) == 0.0 and next_sigma(1.0, None) is None
    # Without the schedule's next sigma (or the output space), the call's own weight.
    assert final_weight(s[1], None, edm.output_space(x, s[1])) == output_weight(s[1], edm.output_space(x, s[1]))
    assert final_weight(s[1], s[2], None) == 1.0
