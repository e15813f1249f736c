"""Chain bypass: exact when it never bypasses, fewer chains and a bounded change when it does,
a real (cloned) residual under in-place blocks, max_consecutive and the percent window honoured,
and an estimate that follows the real error."""
import pytest
import torch

from accel_fixtures import full, net, rel_err, sample
from turbo_core.accel.bypass import ChainBypass, ChainBypassConfig
from turbo_core.accel.registry import build_run
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.layout import SCMLayout


@pytest.mark.parametrize("threshold", [0.0, 1e-12])
def test_never_bypassing_equals_full_compute(net, full, threshold):
    x, st = sample(net, [("bypass", ChainBypassConfig(threshold=threshold, start_percent=0.0))])
    assert torch.equal(x, full)
    assert st.chains_bypassed == 0


def test_bypass_skips_chains_within_bound(net, full):
    mlp_calls = []
    hooks = [b.mlp.register_forward_hook(lambda *a: mlp_calls.append(1)) for b in net.blocks]
    try:
        x, st = sample(net, [("bypass", ChainBypassConfig(threshold=0.2, max_consecutive=3, start_percent=0.1))])
    finally:
        for h in hooks:
            h.remove()
    assert st.chains_bypassed > 0
    assert len(mlp_calls) == st.chains_ran == 12 * net.cfg.depth - st.chains_bypassed
    assert 0 < rel_err(x, full) < 1e-2


def _drive(cfg, layout, inputs, chain, width=4, sigmas=None):
    run = build_run([("bypass", cfg)])
    run.begin()
    sig = sigmas or (torch.linspace(10, 0.1, len(inputs) + 4).tolist() + [0.0])
    outs, ran = [], []
    for call, x in enumerate(inputs):
        d = run.dispatch(layout, sig[call], sig, dtype=torch.float32, device="cpu", blocks=1)
        flag = []
        outs.append(d.chain(0, x, lambda h: (flag.append(1), chain(h, call))[1]))
        ran.append(bool(flag))
        run.end_call(d)
    return run, outs, ran


def test_residual_is_cloned_under_in_place_blocks():
    """A ComfyUI-style block that updates its input in place and returns it: without the clone
    the stored residual (y - x) would be zero and a bypass would return x unchanged."""
    lay = SCMLayout(1, 2, 2, 2, 2)
    x = torch.randn(lay.images, lay.tokens, 4)
    delta = torch.randn_like(x)

    def in_place(h, call):
        h.add_(delta * (1 + 0.001 * call))
        return h

    cfg = ChainBypassConfig(threshold=1.0, start_percent=0.0, max_consecutive=5)
    run, outs, ran = _drive(cfg, lay, [x.clone() for _ in range(4)], in_place)
    assert ran == [True, True, False, False]
    torch.testing.assert_close(outs[2], x + delta * 1.001)  # the residual of the last run call


def test_max_consecutive_and_window():
    lay = SCMLayout(1, 2, 2, 2, 2)
    x = torch.randn(lay.images, lay.tokens, 4)
    cfg = ChainBypassConfig(threshold=1.0, start_percent=0.0, end_percent=1.0, max_consecutive=2)
    run, outs, ran = _drive(cfg, lay, [x] * 9, lambda h, call: h * 1.5)
    # Two runs fit k, then at most two bypasses in a row.
    assert ran == [True, True, False, False, True, False, False, True, False]
    for o in outs:
        torch.testing.assert_close(o, x * 1.5)  # constant input: bypassing is exact
    # Outside the window every call runs.
    sig = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.0]
    cfg = ChainBypassConfig(threshold=1.0, start_percent=0.5, end_percent=0.7, max_consecutive=9)
    run, outs, ran = _drive(cfg, lay, [x] * 6, lambda h, call: h * 1.5, sigmas=sig)
    assert ran == [True, True, True, False, True, True]  # percents 0, .2, .4, .6, .8, 1


def test_estimate_tracks_the_real_error():
    """For a block whose residual is linear in its input, k is exact: the recorded estimate equals
    the relative error that the bypass then makes."""
    lay = SCMLayout(1, 2, 2, 2, 2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(lay.images, lay.tokens, 4, generator=g)
    inputs = [x0, x0 * 1.02, x0 * 1.04]
    cfg = ChainBypassConfig(threshold=1.0, start_percent=0.0, signal_stride=1)
    run, outs, ran = _drive(cfg, lay, inputs, lambda h, call: h + 0.5 * h)
    assert ran == [True, True, False]
    st = run.end()
    est = [v for t in st.timeline for v, _ in t["signal"].get("bypass.b0", [])]
    true_y = inputs[2] * 1.5
    real = float((outs[2] - true_y).abs().mean() / true_y.abs().mean())
    assert est[0] == pytest.approx(real, rel=0.02)


def test_memory_freed_and_config_errors(net):
    run = build_run([("bypass", ChainBypassConfig(threshold=0.2))])
    _, st = sample(net, None, run=run)
    assert st.cache_bytes_peak > 0
    assert all(a.cache_bytes() == 0 for a in run.accelerators)
    with pytest.raises(ValueError, match="max_consecutive"):
        ChainBypassConfig(max_consecutive=-1)
    with pytest.raises(ValueError, match="threshold"):
        ChainBypassConfig(threshold=-0.1)
    assert isinstance(build_run([("bypass", {"threshold": 0.1})]).accelerators[0], ChainBypass)


# --- whole steps ------------------------------------------------------------------------------

def _counting_forward(net):
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    return calls, hook


def test_held_output_equals_sampling_with_fewer_steps(net):
    """forecast_order=0: an Euler step with the output of an earlier call is exactly a longer
    Euler step from that call, so the accelerated run must equal plain Euler over the sigmas of
    the calls that ran; and the network really ran only those calls."""
    from accel_fixtures import EDM_, grid_inputs, V, F
    from turbo_core.diffusion import sample_euler

    calls, hook = _counting_forward(net)
    try:
        cfg = StepSkipConfig(step_threshold=0.5, step_max_skips=2, forecast_order=0, start_percent=0.0)
        x, st = sample(net, [("step", cfg)], steps=16)
    finally:
        hook.remove()
    ran = [t for t in st.timeline if any(c != "bypassed" for c in t["cells"].values())]
    skipped = st.summary()["steps_fully_bypassed"]
    assert skipped > 0 and len(calls) == len(ran) == 16 - skipped
    assert st.steps_skipped == skipped

    noise, cond, cam = grid_inputs(net)
    sig = [t["sigma"] for t in ran] + [0.0]
    with torch.no_grad():
        y = sample_euler(lambda z, s, i: EDM_.denoise(net, z, s, cond, cam, V, F), noise, torch.tensor(sig))
    assert rel_err(x, y) < 1e-5


def test_step_skip_forecast_within_bound_and_state_freed(net, full):
    from accel_fixtures import STEPS

    calls, hook = _counting_forward(net)
    try:
        cfg = StepSkipConfig(step_threshold=0.1, step_max_skips=3, start_percent=0.0)
        run = build_run([("step", cfg)])
        x, st = sample(net, None, run=run)
    finally:
        hook.remove()
    skipped = st.steps_skipped
    assert skipped > 0 and len(calls) == STEPS - skipped
    assert st.chains_bypassed == skipped * net.cfg.depth
    assert 0 < rel_err(x, full) < 3e-2
    assert run.accelerators[0].cache_bytes() == 0  # the held outputs are gone after the run
    assert "bypass.step" in {k for t in st.timeline for k in t["signal"]}
    # The same settings again: the same result (nothing carried over from the first run).
    assert torch.equal(sample(net, [("step", cfg)])[0], x)


def test_step_skip_config_errors():
    for bad in ({"step_threshold": -1.0}, {"step_max_skips": -1}, {"forecast_order": 2}, {"kappa_prior": -0.1}):
        with pytest.raises(ValueError, match="StepSkipConfig"):
            StepSkipConfig(**bad)


def test_kappa_prior_lets_the_second_call_be_skipped(net, full):
    """Without a prior the second call always runs (kappa is measured from it); with one, the
    first jump can be long, and the measured rate the run reports is what a prior should be."""
    def run(prior):
        cfg = StepSkipConfig(step_threshold=0.1, step_max_skips=6, start_percent=0.0, kappa_prior=prior)
        x, st = sample(net, [("step", cfg)])
        skipped = [t["step"] for t in st.timeline if t["cells"] and all(c == "bypassed" for c in t["cells"].values())]
        return x, skipped, st.kappa_measured

    _, skipped, kappa = run(0.0)
    assert 1 not in skipped and kappa > 0
    x, skipped, _ = run(kappa)
    assert 1 in skipped
    assert 0 < rel_err(x, full) < 5e-2
