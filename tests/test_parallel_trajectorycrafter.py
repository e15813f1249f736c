"""TrajectoryCrafter split over processes (turbo_core.parallel) on the CPU with gloo: the reduced-width
CrossTransformer3DModel of the real structure (tests/test_trajectorycrafter.py's tiny network),
sampled by the benchmark's loop (the reference's DDIM through a Turbo4DRun, as the ComfyUI adapter
drives it) with every call's CFG halves on two processes, gives the one-process result, with and
without Chain Bypass (whole steps decided on rank 0, per-block bypasses from all-reduced signals);
the perceiver's reference keys/values are made once per run on each process; block reuse takes the
one-process decisions on both processes, token reuse stands aside on the split calls and says so; a
call that cannot split by its CFG halves runs on one."""
import pytest
import torch

from parallel_guard import finishes_within
from bench.bench_trajectorycrafter import SHAPES, make_inputs, sample_ours
from test_trajectorycrafter import tiny_net
from turbo_core import parallel
from turbo_core.accel.bypass import ChainBypassConfig
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.layout import JointLayout
from turbo_core.parallel import ParallelNet, ShardPlan, choose_plan

SHAPE = dict(SHAPES["tiny"], frames=2, height=4, width=6, text=5)
STEPS = 6
# Both levels of Chain Bypass: whole steps (rank 0, on the CFG-combined latent) and per-block
# bypasses (each process measures its half; the means are all-reduced).
BYPASS = [("bypass", ChainBypassConfig(threshold=5.0, start_percent=0.0, end_percent=1.0, max_consecutive=1)),
          ("step", StepSkipConfig(step_threshold=0.1, kappa_prior=0.4, step_max_skips=1, start_percent=0.0,
                                  end_percent=1.0))]


@pytest.fixture(scope="module")
def net():
    return tiny_net(0)


@pytest.fixture(scope="module")
def inp(net):
    return make_inputs(net.cfg, SHAPE, "cpu", torch.float32, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _stop_group():
    yield
    parallel.shutdown()


def sample(net, inp, specs, group=None):
    box = {}
    x, _, calls, _, _ = sample_ours(net, inp, STEPS, specs, stats_out=box, group=group)
    return x, box["stats"], calls


def blocks_bypassed(stats) -> int:
    return stats.chains_bypassed - stats.steps_skipped * stats.blocks


def test_a_joint_layout_splits_by_its_cfg_halves_only():
    lay = JointLayout(batch=2, text=5, frames=3, height=2, width=3, ref_tokens=12)
    plan, why = choose_plan(lay, 2)
    assert plan.mode == "cfg" and why == "cfg"
    assert [plan.local_layout(r) for r in range(2)] == [JointLayout(1, 5, 3, 2, 3, 12)] * 2
    # An "image" of a joint call is a latent frame: rank r holds its batch item's frames.
    assert [plan.image_index(r).tolist() for r in range(2)] == [[0, 1, 2], [3, 4, 5]]
    for world, batch in ((3, 2), (2, 1)):  # two halves over three, or cfg 1 (one batch item)
        plan, why = choose_plan(JointLayout(batch, 5, 3, 2, 3), world, "frames")
        assert plan is None and "CFG halves" in why and why.endswith("runs on one"), why
    with pytest.raises(ValueError, match="splits only by its CFG halves"):
        ShardPlan("frames", lay, 2)


@pytest.mark.parametrize("accel", ["full", "bypass"])
def test_cfg_halves_on_two_processes_give_the_one_process_result(net, inp, accel):
    specs = [] if accel == "full" else BYPASS
    ref, ref_stats, ref_calls = sample(net, inp, specs)
    group = parallel.acquire("cpu:2")
    out, stats, calls = sample(net, inp, specs, group)
    # fp32 on the CPU: the same arithmetic per batch item, only some reductions' order differs.
    assert (out - ref).abs().max().item() < 1e-5
    par = stats.parallel
    assert calls == ref_calls and par["world"] == 2 and par["calls_by_mode"] == {"cfg": calls}
    # The perceiver's reference went to the worker once for the whole run, not once per call.
    assert calls > 1 and par["references_sent"] == 1
    assert stats.calls == ref_stats.calls and stats.chains_bypassed == ref_stats.chains_bypassed
    assert dict(stats.sequences_computed) == dict(ref_stats.sequences_computed)
    assert stats.compute_fraction == pytest.approx(ref_stats.compute_fraction, rel=1e-9)
    if accel == "bypass":
        # The run really skipped at both levels, else the comparison proves nothing about them.
        assert ref_stats.steps_skipped > 0 and blocks_bypassed(ref_stats) > 0
        worker = par["ranks"][1]["decisions"]  # the worker sees the calls that ran, not the skipped steps
        assert worker["chains_bypassed"] == blocks_bypassed(stats) and worker["chains_ran"] == stats.chains_ran


def test_each_run_sends_its_own_reference_and_a_new_model_drops_it(net, inp):
    """Workers drop a run's perceiver keys/values at its end: the next run sends its reference again
    (a worker computing on the last run's keys/values would be wrong for a new source video)."""
    group = parallel.acquire("cpu:2")
    ref, _, _ = sample(net, inp, [])
    other = make_inputs(net.cfg, SHAPE, "cpu", torch.float32, seed=3)
    other.ref = torch.randn(other.ref.shape, generator=torch.Generator().manual_seed(9))
    want, _, _ = sample(net, other, [])
    assert (want - ref).abs().max().item() > 1e-3  # the reference matters to the result
    for case in (inp, other, inp):
        out, stats, _ = sample(net, case, [], group)
        assert stats.parallel["references_sent"] == 1
        assert (out - (ref if case is inp else want)).abs().max().item() < 1e-5


def test_a_direct_call_with_reference_latents_splits_and_equals_the_network(net, inp):
    """Called as the network, outside a sampling run, with raw reference latents (keys/values for
    this call alone, as the network does) and no dispatch."""
    group = parallel.acquire("cpu:2")
    lat = torch.randn(2, SHAPE["frames"], 16, SHAPE["height"], SHAPE["width"], generator=torch.Generator().manual_seed(4))
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        want = net(lat, inp.text, t, inpaint=inp.inpaint, reference=inp.ref)
        got = ParallelNet(net, group, "views")(lat, inp.text, t, inpaint=inp.inpaint, reference=inp.ref)
    assert (got - want).abs().max().item() < 1e-5
    assert "TrajectoryCrafterTransformer splits only the CFG halves; mode views runs as cfg" in group.state["notes"]


def test_block_reuse_composes_with_the_split_and_token_reuse_stands_aside_and_says_so(net, inp):
    """Block reuse on the split calls reuses the DiT blocks one process reuses (every rank takes rank
    0's decisions, on the whole call's drifts); token reuse, whose ranks would pick their tokens from
    their own halves, stands aside on every rank and says so."""
    from turbo_core.accel.block_reuse import BlockReuseConfig
    from turbo_core.accel.token_reuse import SPLIT_ASIDE as TOKEN_ASIDE, TokenReuseConfig

    block = [("block_reuse", BlockReuseConfig(threshold=10.0, drift_prior=0.05, max_cache_mb=64.0))]
    token = [("token_reuse", TokenReuseConfig(threshold=10.0, max_cache_mb=64.0))]
    one_block, one, _ = sample(net, inp, block)
    _, one_token, _ = sample(net, inp, token)
    assert one.blocks_reused > 0 and one_token.tokens_computed < one_token.tokens_offered  # both reuse alone
    ref, _, _ = sample(net, inp, [])
    group = parallel.acquire("cpu:2")

    with finishes_within(group, 120, "a split with block reuse"):
        out_block, stats, _ = sample(net, inp, block, group)
    with finishes_within(group, 120, "a split with token reuse"):
        out_token, token_stats, _ = sample(net, inp, token, group)
    assert (stats.spans_reused, stats.blocks_reused) == (one.spans_reused, one.blocks_reused)
    ranks = stats.parallel["ranks"]
    assert ranks[1]["decisions"] == ranks[0]["decisions"]
    assert (out_block - one_block).abs().max().item() < 1e-3  # round-off through the 16-bit residuals
    assert (out_token - ref).abs().max().item() < 1e-5
    assert token_stats.tokens_computed == token_stats.tokens_offered
    assert TOKEN_ASIDE in token_stats.notes
