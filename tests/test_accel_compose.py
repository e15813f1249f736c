"""The three accelerators together: exact when all are off-equivalent, less work than any alone
and a bounded change; the statistics equal an independent count; runs start clean after an
interrupt and on a change of shape or dtype; runs and streams share nothing."""
import pytest
import torch

from accel_fixtures import EDM_, F, STEPS, V, full, grid_inputs, net, random_net, rel_err, sample, CountingAttention
from turbo_core.accel.bypass import ChainBypassConfig
from turbo_core.accel.cache import RollingCacheConfig
from turbo_core.accel.prune import TokenPrunerConfig
from turbo_core.accel.registry import build_run
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.diffusion import karras_sigmas
from turbo_core.layout import AXES

ON = [("cache", RollingCacheConfig(threshold=0.3, start_percent=0.1)),
      ("prune", TokenPrunerConfig(keep_start=0.5, keep_end=0.3)),
      ("bypass", ChainBypassConfig(threshold=0.2, start_percent=0.1, max_consecutive=2))]


def test_all_off_equivalent_equals_full(net, full):
    specs = [("bypass", ChainBypassConfig(threshold=1e-12, start_percent=0.0)),
             ("prune", TokenPrunerConfig(keep_start=1.0, keep_end=1.0, adapt=0.0, start_percent=0.0)),
             ("cache", RollingCacheConfig(threshold=1e-12, start_percent=0.0))]
    x, st = sample(net, specs)
    assert torch.equal(x, full)
    assert st.compute_fraction == 1.0


def test_all_three_do_less_work_than_each_alone_within_bound(net, full):
    x, st = sample(net, ON)
    alone = [sample(net, [spec])[1].compute_fraction for spec in ON]
    assert st.compute_fraction < min(alone)
    assert st.chains_bypassed > 0 and st.cache_hits > 0 and st.reused_by["prune"]
    assert 0 < rel_err(x, full) < 1e-2


def test_order_of_specs_does_not_matter(net):
    a, _ = sample(net, ON)
    b, _ = sample(net, list(reversed(ON)))
    assert torch.equal(a, b)
    assert [acc.name for acc in build_run(list(reversed(ON))).accelerators] == ["bypass", "cache", "prune"]


def test_statistics_equal_an_independent_count(net):
    counting = CountingAttention()
    mlp_calls = []
    hooks = [b.mlp.register_forward_hook(lambda *a: mlp_calls.append(1)) for b in net.blocks]
    try:
        x, st = sample(net, ON, backend=counting)
    finally:
        for h in hooks:
            h.remove()
    depth = net.cfg.depth
    assert st.calls == STEPS
    assert dict(st.sequences_computed) == counting.by_axis(net)
    assert st.chains_ran == len(mlp_calls) and st.chains_ran + st.chains_bypassed == STEPS * depth
    lay = net.token_layout(V * F, V, F)
    cost = net.cost(lay)
    for axis in AXES:
        n = lay.axis_shape(axis)[0]
        assert st.sequences_total[axis] == STEPS * depth * n
        # every sequence was computed, reused from a cache, or skipped with its whole chain
        assert (st.sequences_computed[axis] + st.sequences_reused[axis] + st.chains_bypassed * n
                == st.sequences_total[axis])
    flops = sum(counting.by_axis(net)[a] * cost[a] for a in AXES) + len(mlp_calls) * lay.images * cost["mlp"]
    assert st.flops_done == pytest.approx(flops)
    s = st.summary()
    assert s["chains_bypassed"] == st.chains_bypassed and s["model_calls"] == STEPS
    cells = [c for row in st.timeline_grid() for c in row]
    assert cells.count("bypassed") == st.chains_bypassed
    # The map shows the cache's and the pruner's work (a block with both is "cached+pruned").
    assert any("cached" in c for c in cells) and any("pruned" in c for c in cells)
    assert st.format_line().startswith("Turbo4D:")


def test_interrupted_run_leaves_nothing_and_next_run_is_fresh(net):
    run = build_run(ON)

    def interrupt(i, x, den):
        if i == 6:
            raise RuntimeError("interrupted by the user")

    with pytest.raises(RuntimeError, match="interrupted"):
        sample(net, None, run=run, callback=interrupt)
    assert all(a.cache_bytes() == 0 and not a.streams for a in run.accelerators)
    again, st_again = sample(net, None, run=run)   # the same run object, reused
    fresh, st_fresh = sample(net, ON)
    assert torch.equal(again, fresh)
    assert st_again.summary()["chains_bypassed"] == st_fresh.summary()["chains_bypassed"]


def _calls(run, net, inputs, views, frames, steps, stream="default"):
    """The adapter's per-call protocol without begin/end, for runs that change shape mid-way."""
    noise, cond, cam = inputs
    sigmas = karras_sigmas(steps)
    sched = sigmas.tolist()
    lay = net.token_layout(noise.shape[0], views, frames)
    dtype = next(net.parameters()).dtype
    x = noise.to(dtype) * sigmas[0]
    for i in range(steps):
        d = run.dispatch(lay, sched[i], sched, stream, dtype, "cpu", net.depth, net.cost(lay))
        den = EDM_.denoise(net, x, sched[i], cond.to(dtype), cam, views, frames, dispatch=d)
        run.end_call(d)
        x = (x + (x - den) / sched[i] * (sched[i + 1] - sched[i])).to(dtype)
    return x


def test_change_of_shape_or_dtype_resets(net):
    small = grid_inputs(net, 2, 4, seed=3)
    fresh_small = _calls(_begun(ON), net, small, 2, 4, STEPS)
    run = _begun(ON)
    _calls(run, net, grid_inputs(net), V, F, 7)        # stopped part-way, no end()
    assert torch.equal(_calls(run, net, small, 2, 4, STEPS), fresh_small)

    net64 = random_net(dtype=torch.float64)
    inp = grid_inputs(net)
    fresh64 = _calls(_begun(ON), net64, inp, V, F, STEPS)
    run = _begun(ON)
    _calls(run, net, inp, V, F, 5)
    assert torch.equal(_calls(run, net64, inp, V, F, STEPS), fresh64)
    run.end()
    assert all(a.cache_bytes() == 0 for a in run.accelerators)


def _begun(specs):
    run = build_run(specs)
    run.begin()
    return run


def test_runs_and_streams_share_nothing(net):
    a_in, b_in = grid_inputs(net, seed=1), grid_inputs(net, seed=2)
    alone_a = _calls(_begun(ON), net, a_in, V, F, STEPS)
    alone_b = _calls(_begun(ON), net, b_in, V, F, STEPS)
    r1, r2 = build_run(ON), build_run(ON)
    assert not {id(a) for a in r1.accelerators} & {id(a) for a in r2.accelerators}
    # Two runs built from the same specs, stepped in lockstep, give what each gives alone.
    sigmas = karras_sigmas(STEPS)
    xs = []
    for run, inp in ((r1, a_in), (r2, b_in)):
        run.begin()
    lay = net.token_layout(V * F, V, F)
    state = {id(r1): a_in[0] * sigmas[0], id(r2): b_in[0] * sigmas[0]}
    sched = sigmas.tolist()
    for i in range(STEPS):
        for run, (noise, cond, cam) in ((r1, a_in), (r2, b_in)):
            x = state[id(run)]
            d = run.dispatch(lay, sched[i], sched, "default", torch.float32, "cpu", net.depth, net.cost(lay))
            den = EDM_.denoise(net, x, sched[i], cond, cam, V, F, dispatch=d)
            run.end_call(d)
            state[id(run)] = x + (x - den) / sched[i] * (sched[i + 1] - sched[i])
    assert torch.equal(state[id(r1)], alone_a) and torch.equal(state[id(r2)], alone_b)
    # Two streams (cond / uncond) interleaved in one run: likewise.
    run = _begun(ON)
    state = {"cond": a_in[0] * sigmas[0], "uncond": b_in[0] * sigmas[0]}
    for i in range(STEPS):
        for stream, (noise, cond, cam) in (("cond", a_in), ("uncond", b_in)):
            x = state[stream]
            d = run.dispatch(lay, sched[i], sched, stream, torch.float32, "cpu", net.depth, net.cost(lay))
            den = EDM_.denoise(net, x, sched[i], cond, cam, V, F, dispatch=d)
            run.end_call(d)
            state[stream] = x + (x - den) / sched[i] * (sched[i + 1] - sched[i])
    assert torch.equal(state["cond"], alone_a) and torch.equal(state["uncond"], alone_b)
    # Configs are frozen: a node's stored spec cannot be changed through a run.
    with pytest.raises(Exception):
        run.accelerators[0].config.threshold = 1.0


def test_cache_and_pruner_stand_aside_after_long_whole_step_skips(net, monkeypatch):
    """Calls that whole-step skips leave more than max_age steps apart have nothing reusable: the
    cache and the pruner must then pass them through untouched (the result equals the bypass
    alone), counted as calls stood aside, computing every sequence through the grid path (no
    camera or motion sequences built), and holding no cache memory at all (the first call stands
    aside too). With calls close together they work as before."""
    skip = ("step", StepSkipConfig(start_percent=0.0, end_percent=1.0, step_threshold=0.5,
                                        step_max_skips=100, kappa_prior=0.4))
    reuse = [("cache", RollingCacheConfig(threshold=10.0, max_age=1, start_percent=0.0)),
             ("prune", TokenPrunerConfig(keep_start=0.3, keep_end=0.3, max_age=1, start_percent=0.0))]
    alone, st_alone = sample(net, [skip])
    ran = st_alone.steps_ran
    assert 2 <= ran <= STEPS // 2  # long gaps between the calls that run
    from turbo_core.dispatch import SCMDispatch

    as_sequences = []
    original = SCMDispatch.attend
    monkeypatch.setattr(SCMDispatch, "attend", lambda self, block, axis, seqs, compute: (
        as_sequences.append((self.step.index, axis)), original(self, block, axis, seqs, compute))[1])
    run = build_run([skip] + reuse)
    memory = []
    run.listeners.append(lambda stats, entry: memory.append(sum(a.cache_bytes() for a in run.accelerators[1:]))
                         if entry else None)
    x, st = sample(net, None, run=run)
    assert torch.equal(x, alone)
    assert st.calls_aside["cache"] == ran == st.calls_aside["prune"]
    assert st.cache_hits == 0 and not st.reused_by.get("prune")
    # Work the bypass skipped is not reported as pruned, and skipped calls are not counted as run.
    s = st.summary()
    assert s["tokens_pruned_camera_motion"] == 0 < s["sequences_skipped_camera_motion"]
    assert s["model_calls"] == STEPS and s["model_calls_run"] == ran
    # No call sent camera/motion attention through the sequence path, and nothing was stored.
    assert not [i for i, axis in as_sequences if axis != "spatial"]
    assert memory and max(memory) == 0

    # Without whole-step skips the calls are one step apart: the cache reuses, and only the first
    # call (no predecessor) stands aside.
    x2, st2 = sample(net, reuse)
    assert st2.calls_aside["cache"] == 1 and st2.cache_hits > 0
