"""Block reuse: span residuals reused across calls skip the spans' blocks (every projection and
MLP row of them), change the output within a bound, never hold more than the memory bound, never
reuse a residual older than max_age, forecast exactly what is linear, decide without host syncs
inside a call, compose with the step skip, and report what happened."""
import math

import pytest
import torch

from accel_fixtures import full, net, random_net, rel_err, sample, CountingAttention
from per_call_fixtures import LinearRows, SyncGuarded, cache_probe, deep_net, plan_probe
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.spans import output_weight, plan_spans
from turbo_core.accel.bound import ESTIMATE_ACTIVATIONS
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.accel.registry import build_run
from turbo_core.diffusion import DenoisedSpace
from turbo_core.layout import SCMLayout

BIG = 1000.0  # MiB: a bound that never binds


def apply_block_reuse(specs, cfg):
    return list(specs) + [("block_reuse", cfg)]


def planned(net, cfg, **kw):
    """(output, stats, (spans, forecast, bound measured) as planned) of a run with block reuse `cfg`."""
    run = build_run(apply_block_reuse([], cfg), **kw)
    plans = plan_probe(run, "block_reuse")
    x, st = sample(net, None, run=run)
    return x, st, plans[-1]


@pytest.fixture(scope="module")
def deep():
    return deep_net(3)


@pytest.fixture(scope="module")
def deep_full(deep):
    return sample(deep, [])[0]


def test_threshold_zero_equals_full_compute(deep, deep_full):
    x, st = sample(deep, apply_block_reuse([], BlockReuseConfig(threshold=0.0, max_cache_mb=BIG)))
    assert torch.equal(x, deep_full)
    assert st.chains_bypassed == 0


def test_reuse_skips_every_row_of_the_spans_within_bound(deep, deep_full, monkeypatch):
    # The module hooks count the norms' rows too: the fused norm (token_fuse, where Triton runs,
    # full compute included) bypasses the module, so this count runs the unfused path.
    monkeypatch.setenv("TURBO4D_TOKEN_FUSE", "torch")
    cfg = BlockReuseConfig(threshold=0.5, spans=1, drift_prior=0.05, forecast=0, max_cache_mb=BIG,
                           weigh_output=False)
    ref_rows, rows = LinearRows(deep), None
    sample(deep, [])
    ref_rows.close()
    rows = LinearRows(deep)
    counting, ref_count = CountingAttention(), CountingAttention()
    x, st, (spans, _, _) = planned(deep, cfg, backend=counting)
    rows.close()
    sample(deep, [], backend=ref_count)
    assert spans == [(1, 3)] and st.spans_reused > 0
    skipped_chains = st.blocks_reused
    assert skipped_chains == 3 * st.spans_reused and st.chains_bypassed == 0
    # Every linear layer and every attention of a skipped block is skipped: the counts fall by
    # exactly the skipped blocks' share.
    per_block_rows = {k: v // (12 * deep.depth) for k, v in ref_rows.rows.items()}
    for key, n in ref_rows.rows.items():
        assert rows.rows[key] == n - skipped_chains * per_block_rows[key], key
    per_block_seqs = {k: v // (12 * deep.depth) for k, v in ref_count.sequences.items()}
    for length, n in ref_count.sequences.items():
        assert counting.sequences[length] == n - skipped_chains * per_block_seqs[length]
    assert 0 < rel_err(x, deep_full) < 0.05
    assert st.chains_ran == 12 * deep.depth - skipped_chains


def test_memory_bound_is_never_exceeded(deep):
    lay = deep.token_layout(12, 3, 4)
    stream = lay.images * lay.tokens * deep.cfg.width
    one_span = stream * 2  # a 16-bit residual of a float32 stream
    for mb, spans in ((one_span * 1.5 / 2**20, 1), (one_span * 3.2 / 2**20, 3), (one_span * 0.9 / 2**20, 0)):
        cfg = BlockReuseConfig(threshold=0.5, drift_prior=0.05, forecast=0, max_cache_mb=mb)
        run = build_run(apply_block_reuse([], cfg))
        seen = cache_probe(run)
        plans = plan_probe(run, "block_reuse")
        x, st = sample(deep, None, run=run)
        assert len(plans[-1][0]) == spans
        assert max(seen) <= mb * 2**20, (mb, max(seen))
        assert st.summary()["cache_memory_peak_mb"] <= mb
        assert st.summary()["cache_bound_mb"] == pytest.approx(mb, abs=1e-3)
        assert 0 < st.summary()["bounded_cache_peak_mb"] <= mb or spans == 0
        if spans == 0:
            assert st.blocks_reused == 0
    # With the forecast a span holds two tensors: half as many fit; where not even one span fits
    # so, the spans reuse as-is.
    cfg = BlockReuseConfig(threshold=0.5, drift_prior=0.05, forecast=1, max_cache_mb=one_span * 3.2 / 2**20)
    spans, forecast, _ = planned(deep, cfg)[2]
    assert len(spans) == 1 and forecast
    cfg = BlockReuseConfig(threshold=0.5, drift_prior=0.05, forecast=1, max_cache_mb=one_span * 1.5 / 2**20)
    spans, forecast, _ = planned(deep, cfg)[2]
    assert len(spans) == 1 and not forecast


def test_default_bound_is_a_tenth_of_the_estimated_call_on_cpu(deep):
    x, st, (spans, _, measured) = planned(deep, BlockReuseConfig(threshold=0.5, drift_prior=0.05, forecast=0))
    lay = deep.token_layout(12, 3, 4)
    stream = lay.images * lay.tokens * deep.cfg.width * 4
    bound = st.summary()["cache_bound_mb"]
    assert bound == pytest.approx(0.1 * ESTIMATE_ACTIVATIONS * stream / 2**20, abs=1e-3)
    assert not measured
    assert len(spans) == 2  # 1.2 float32 streams hold two 16-bit residuals
    assert st.summary()["cache_memory_peak_mb"] <= bound
    # With the forecast (the default), two tensors a span: one span.
    x, st, (spans, forecast, _) = planned(deep, BlockReuseConfig(threshold=0.5))
    assert len(spans) == 1 and forecast
    assert st.summary()["cache_memory_peak_mb"] <= st.summary()["cache_bound_mb"]


def test_a_bound_just_short_of_one_span_holds_one_within_the_slack_never_over_a_hard_bound(deep):
    # The large configuration's edge: a tenth of the working set measured just under one 16-bit
    # residual cached nothing. A bound from the memory fraction (the estimate on a CPU:
    # ESTIMATE_ACTIVATIONS stream tensors) within SPAN_SLACK of one span holds it, as-is, and says so.
    from turbo_core.accel.spans import SPAN_SLACK
    from turbo_core.memory import CacheBudget, cache_budget

    lay = deep.token_layout(12, 3, 4)
    stream = lay.images * lay.tokens * deep.cfg.width * 4   # float32
    one_span = stream // 2                                  # its 16-bit residual
    for over, held in ((0.99, True), (0.96, True), (0.9, False)):
        frac = over * one_span / (ESTIMATE_ACTIVATIONS * stream)
        run = build_run(apply_block_reuse([], BlockReuseConfig(threshold=0.5, drift_prior=0.05, memory_fraction=frac)))
        seen = cache_probe(run)
        plans = plan_probe(run, "block_reuse")
        x, st = sample(deep, None, run=run)
        bound = int(frac * ESTIMATE_ACTIVATIONS * stream)
        spans, forecast, _ = plans[-1]
        s = st.summary()
        if held:
            assert spans == [(1, 3)] and not forecast and st.spans_reused > 0, over
            shown = s["cache_bound_mb"] * 2**20
            assert bound < shown <= bound * (1 + SPAN_SLACK) + 600  # the bound held, shown
            assert bound < max(seen) <= shown + 600
            assert any("block reuse" in n and "short of one span" in n for n in st.notes)
        else:
            assert spans == [] and st.blocks_reused == 0 and max(seen) == 0
    # A hard bound is never exceeded, however close: max_cache_mb ...
    mb = 0.99 * one_span / 2**20
    run = build_run(apply_block_reuse([], BlockReuseConfig(threshold=0.5, drift_prior=0.05, max_cache_mb=mb)))
    seen = cache_probe(run)
    x, st = sample(deep, None, run=run)
    assert max(seen) <= mb * 2**20 and st.blocks_reused == 0
    assert not any("short of one span" in n for n in st.notes)
    # ... nor the Turbo4D Memory node's budget, though the fraction's bound alone would take the slack.
    frac = 0.99 * one_span / (ESTIMATE_ACTIVATIONS * stream)
    budget = CacheBudget(gpu_bytes=int(frac * ESTIMATE_ACTIVATIONS * stream))
    run = build_run(apply_block_reuse([], BlockReuseConfig(threshold=0.5, drift_prior=0.05, memory_fraction=frac)))
    seen = cache_probe(run)
    with cache_budget(budget):
        x, st = sample(deep, None, run=run)
    assert max(seen) <= int(frac * ESTIMATE_ACTIVATIONS * stream) and st.blocks_reused == 0


def _drive(cfg, calls, residual, skip=(), stream=True):
    """Runs blocks 0..3 through the dispatch directly: block b adds residual(call, b); the output
    says which call's residuals were used. Calls in `skip` are skipped whole (as the step skip
    records them: a dispatch and its end, no model call)."""
    lay = SCMLayout(1, 2, 2, 2, 2)
    run = build_run([("block_reuse", cfg)])
    run.begin()
    sig = torch.linspace(10, 1, calls).tolist() + [0.0]
    x = torch.zeros(lay.images, lay.tokens, 4)
    outs, ran = [], []
    for call in range(calls):
        d = run.dispatch(lay, sig[call], sig, dtype=torch.float32, device="cpu", blocks=4)
        if call in skip:
            run.end_call(d)
            outs.append(None)
            ran.append(None)
            continue
        h, seen = x, []
        run.model_call(d, x, lambda: None)
        for b in range(4):
            h = d.chain(b, h, lambda t, b=b, call=call: (seen.append(b), t + residual(call, b, sig[call]))[1],
                          stream=stream)
        run.end_call(d)
        outs.append(h)
        ran.append(seen)
    run.end()
    return outs, ran


def test_no_residual_is_reused_older_than_max_age():
    for max_age in (1, 2, 4):
        cfg = BlockReuseConfig(threshold=1.0, max_age=max_age, spans=3, refresh=0, forecast=0, drift_prior=1e-6,
                               max_cache_mb=BIG, weigh_output=False)
        outs, ran = _drive(cfg, 12, lambda call, b, sigma: float(call))
        reused_at = {}
        for call, (h, seen) in enumerate(zip(outs, ran)):
            assert 0 in seen  # the head block always runs
            for b in (1, 2, 3):
                if b in seen:
                    reused_at[b] = call
                else:
                    assert call - reused_at[b] <= max_age, (max_age, call, b)
            # Each block added the call it was computed at: the reused residuals are those calls'.
            assert torch.all(h == call + sum(reused_at[b] for b in (1, 2, 3))), (call, h.flatten()[0])
        assert any(len(seen) < 4 for seen in ran)


def test_calls_skipped_whole_beyond_max_skipped_recompute_every_span():
    def cfg(max_skipped):
        return BlockReuseConfig(threshold=1.0, max_age=4, spans=3, forecast=0, drift_prior=1e-6, max_cache_mb=BIG,
                                weigh_output=False, max_skipped=max_skipped)

    _, ran = _drive(cfg(0), 6, lambda call, b, sigma: 1.0, skip=(3,))
    assert ran[2] == [0] and ran[4] == [0, 1, 2, 3]  # reused before the skipped call, not after it
    _, ran = _drive(cfg(1), 6, lambda call, b, sigma: 1.0, skip=(3,))
    assert ran[4] == [0]  # one skipped call allowed: still reused
    with pytest.raises(ValueError, match="max_skipped"):
        BlockReuseConfig(max_age=2, max_skipped=2)


def test_skip_weight_reuses_across_short_gaps_only():
    # The span's estimate (the prior 0.5 times the distance in log(sigma) to its compute at call 0)
    # stays under the threshold at call 4; after a call skipped whole it is weighed by
    # 1 + skip_weight * 1, which puts it over: every span runs there, while a call with no skip
    # before it still reuses.
    def cfg(w):
        return BlockReuseConfig(threshold=1.0, max_age=4, spans=3, refresh=0, forecast=0, drift_prior=0.5,
                                max_cache_mb=BIG, weigh_output=False, max_skipped=1, skip_weight=w)

    _, ran = _drive(cfg(0.0), 6, lambda call, b, sigma: 1.0, skip=(3,))
    assert ran[2] == [0] and ran[4] == [0]
    _, ran = _drive(cfg(1.0), 6, lambda call, b, sigma: 1.0, skip=(3,))
    assert ran[2] == [0] and ran[4] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="skip_weight"):
        BlockReuseConfig(skip_weight=-1.0)


def test_rotating_share_spreads_the_refresh():
    cfg = BlockReuseConfig(threshold=1.0, max_age=2, spans=3, forecast=0, drift_prior=1e-6, max_cache_mb=BIG,
                           weigh_output=False)
    _, ran = _drive(cfg, 9, lambda call, b, sigma: 1.0)
    # 3 spans, max_age 2: one span (the oldest) runs at every call after the first.
    for seen in ran[1:]:
        assert len([b for b in seen if b > 0]) >= 1


def test_forecast_is_exact_on_a_residual_linear_in_log_sigma():
    def residual(call, b, sigma):
        return 0.5 * math.log(sigma) + b

    def expect(sigma):
        return sum(residual(0, b, sigma) for b in range(4))

    cfg = BlockReuseConfig(threshold=1.0, max_age=2, spans=1, forecast=1, drift_prior=1e-6,
                           max_cache_mb=BIG, weigh_output=False)
    sig = torch.linspace(10, 1, 10).tolist()
    outs, ran = _drive(cfg, 10, residual)
    forecast = [c for c, seen in enumerate(ran) if seen == [0] and c > 2]  # two computes before it
    assert forecast, ran
    for call in forecast:
        assert torch.allclose(outs[call], torch.full_like(outs[call], expect(sig[call])), atol=1e-2)
    # As-is reuse of the same residuals is off by the drift.
    cfg0 = BlockReuseConfig(threshold=1.0, max_age=2, spans=1, forecast=0, drift_prior=1e-6, max_cache_mb=BIG,
                            weigh_output=False)
    outs0, ran0 = _drive(cfg0, 10, residual)
    assert any(seen == [0] and abs(float(h.flatten()[0]) - expect(sig[c])) > 0.01
               for c, (h, seen) in enumerate(zip(outs0, ran0)))


def test_output_weight_follows_the_denoised_image():
    space = DenoisedSpace.identity(torch.zeros(1), 0.5)
    assert output_weight(80.0, space) == pytest.approx(1.0, abs=1e-4)
    assert output_weight(0.002, space) < 0.01
    assert output_weight(0.5, space) == pytest.approx(1 / math.sqrt(2))
    assert output_weight(0.5, None) == 1.0


def test_late_calls_reuse_more_when_weighed(deep):
    specs = apply_block_reuse([], BlockReuseConfig(threshold=0.05, spans=1, max_cache_mb=BIG))
    unweighed = apply_block_reuse([], BlockReuseConfig(threshold=0.05, spans=1, max_cache_mb=BIG, weigh_output=False))
    assert sample(deep, specs)[1].blocks_reused > sample(deep, unweighed)[1].blocks_reused


def test_no_host_sync_inside_a_call(deep, deep_full):
    for cfg in (BlockReuseConfig(threshold=0.5, drift_prior=0.05, forecast=0, max_cache_mb=BIG),
                BlockReuseConfig(threshold=0.5, drift_prior=0.05, forecast=1, max_cache_mb=BIG)):
        x, st = sample(SyncGuarded(deep), apply_block_reuse([], cfg))
        assert st.blocks_reused > 0


def test_a_host_sync_inside_a_call_is_caught(deep):
    import per_call_fixtures

    from turbo_core.accel.base import Accelerator
    from turbo_core.accel.run import Turbo4DRun

    class ReadsTheDevice(Accelerator):
        name = "reads"
        state_class = type("S", (), {"reset": lambda self: None})

        def chain(self, d, block, x, nxt):
            float(x.abs().mean())
            return nxt(x)

    with pytest.raises(per_call_fixtures.HostSync):
        sample(SyncGuarded(deep), None, run=Turbo4DRun([ReadsTheDevice()]))


def test_composes_with_the_step_skip(deep):
    def step(t):
        return StepSkipConfig(step_threshold=t, start_percent=0.0, end_percent=1.0, kappa_prior=0.4,
                              step_max_skips=10_000)

    reuse = apply_block_reuse([], BlockReuseConfig(threshold=0.5, max_age=8, drift_prior=0.05, max_cache_mb=BIG))
    # Long jumps (2 calls of 12 run): every call past max_age restarts, nothing is reused, and the
    # result is the step skip's own, bit for bit.
    alone, st_alone = sample(deep, [("step", step(0.5))])
    x, st = sample(deep, [("step", step(0.5))] + apply_block_reuse(
        [], BlockReuseConfig(threshold=0.5, max_age=1, drift_prior=0.05, max_cache_mb=BIG)))
    assert st.summary()["model_calls_run"] == st_alone.summary()["model_calls_run"] == 2
    assert st.spans_reused == 0 and st.calls_aside["block_reuse"] == 1
    assert torch.equal(x, alone)
    # Close calls (the step skip runs the last ones back to back): block reuse skips spans there, on
    # top of the whole steps skipped, within a bound of the step skip's result.
    alone, st_alone = sample(deep, [("step", step(0.1))])
    x, st = sample(deep, [("step", step(0.1))] + reuse)
    assert st.summary()["model_calls_run"] == st_alone.summary()["model_calls_run"]
    assert st.spans_reused > 0
    assert st.compute_fraction < st_alone.compute_fraction
    assert 0 < rel_err(x, alone) < 0.01


def test_plan_spans_and_config_errors():
    assert plan_spans(8, 1, 0, 1) == [(1, 7)]
    assert plan_spans(8, 1, 0, 3) == [(1, 3), (4, 5), (6, 7)]
    assert plan_spans(8, 1, 1, 10) == [(i, i) for i in range(1, 7)]
    assert plan_spans(8, 1, 0, 0) == []
    for bad in (dict(threshold=-1), dict(max_age=0), dict(forecast=2), dict(memory_fraction=0.0),
                dict(max_cache_mb=-1), dict(head=-1), dict(refresh=-2), dict(drift_prior=-0.1)):
        with pytest.raises(ValueError, match="BlockReuseConfig"):
            BlockReuseConfig(**bad)
    with pytest.raises(ValueError, match="unknown settings"):
        BlockReuseConfig.from_dict({"treshold": 0.1})


def test_a_span_whose_last_block_is_skipped_is_dropped_not_reused():
    # An outer accelerator may skip a span's last block after its first ran: the half-written
    # residual must never be reused.
    cfg = BlockReuseConfig(threshold=1.0, max_age=2, spans=1, forecast=0, drift_prior=1e-6, max_cache_mb=BIG,
                           weigh_output=False)
    lay = SCMLayout(1, 2, 2, 2, 2)
    run = build_run([("block_reuse", cfg)])
    run.begin()
    sig = torch.linspace(10, 1, 4).tolist() + [0.0]
    x = torch.zeros(lay.images, lay.tokens, 4)
    acc = run.accelerators[0]
    for call in range(4):
        d = run.dispatch(lay, sig[call], sig, dtype=torch.float32, device="cpu", blocks=4)
        run.model_call(d, x, lambda: None)
        h = x
        for b in range(4):
            if call == 0 and b == 3:
                continue  # the span (1..3) opened at block 1, its last block never reached
            h = d.chain(b, h, lambda t: t + 1.0, stream=True)
        run.end_call(d)
        if call == 0:
            assert not acc.streams["default"].entries  # dropped
        else:
            assert torch.all(h == 4.0)  # run or reused, always the real four blocks' sum
    run.end()


def test_cache_and_prune_nodes_default_to_the_per_call_levels_with_the_old_methods_a_choice():
    from turbo_core.accel.cache import RollingCacheConfig
    from turbo_core.accel.mechanisms import node_configs
    from turbo_core.accel.prune import TokenPrunerConfig
    from turbo_core.accel.token_reuse import TokenReuseConfig

    assert node_configs("Turbo4DCache", "balanced") == {"block_reuse": BlockReuseConfig(threshold=0.25), "cache": None}
    old = node_configs("Turbo4DCache", "fast", storage="fp16", method="sub-attention cache")
    assert old["block_reuse"] is None and old["cache"].storage == "fp16" and isinstance(old["cache"], RollingCacheConfig)
    # Custom: the shared inputs (threshold, max_age, the window) go to the chosen method only; the
    # other method's own inputs (storage) are left out of it.
    custom = node_configs("Turbo4DCache", "custom", dict(threshold=0.3, max_age=4, start_percent=0.1,
                                                         end_percent=0.9, storage="native"), "native")
    assert custom == {"block_reuse": BlockReuseConfig(threshold=0.3, max_age=4, start_percent=0.1, end_percent=0.9),
                      "cache": None}
    prune = node_configs("Turbo4DSemanticPrune", "custom", dict(keep_start=0.5, keep_end=0.3, saliency=0.5,
                                                                max_age=6, threshold=0.4, keep_min=0.5),
                         method="sequence prune")
    assert prune["token_reuse"] is None
    assert prune["prune"] == TokenPrunerConfig(keep_start=0.5, keep_end=0.3, saliency=0.5, max_age=6)
    assert node_configs("Turbo4DSemanticPrune", "quality")["token_reuse"] == TokenReuseConfig(threshold=0.15)
    assert node_configs("Turbo4DCache", "quality")["block_reuse"] == BlockReuseConfig(threshold=0.25)
    with pytest.raises(ValueError, match="unknown method"):
        node_configs("Turbo4DCache", "balanced", method="nonsense")
    with pytest.raises(ValueError, match="unknown settings"):
        node_configs("Turbo4DCache", "custom", dict(treshold=0.3))


def test_blocks_that_hand_no_stream_are_left_alone_and_the_run_says_so():
    # A UNet's attention layers go through dispatch.chain with res-blocks between them (SV4D):
    # a span residual across them would be wrong, so block reuse runs every block and notes why.
    cfg = BlockReuseConfig(threshold=1.0, max_age=4, spans=3, forecast=0, drift_prior=1e-6, max_cache_mb=BIG,
                           weigh_output=False)
    outs, ran = _drive(cfg, 6, lambda call, b, sigma: float(call), stream=False)
    assert all(seen == [0, 1, 2, 3] for seen in ran)
    assert all(torch.all(h == 4 * call) for call, h in enumerate(outs))
    lay = SCMLayout(1, 2, 2, 2, 2)
    run = build_run([("block_reuse", cfg)])
    run.begin()
    d = run.dispatch(lay, 1.0, [1.0, 0.0], dtype=torch.float32, device="cpu", blocks=4)
    d.chain(0, torch.zeros(lay.images, lay.tokens, 4), lambda t: t)
    run.end_call(d)
    assert any("choose method 'sub-attention cache'" in n for n in run.end().notes)
