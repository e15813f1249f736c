"""A model call leaves nothing to the garbage collector: when a sampling run returns, every tensor
it made (activations, the conditioning, the accelerators' caches) is freed by reference counting
alone, for the SV4D UNet (the benchmark's run, one row of bench_sv4d --percall), SCMNet and
TrajectoryCrafter's DiT, plain and through the per-call and per-step accelerators.

Why it matters: the dispatch's hook chains (`run_from`) and the UNet's span walk referred to
themselves, reference cycles that kept each call's layer inputs and outputs alive until Python's
collector happened to run, so the next calls (and the next benchmark row) ran on top of them: GPU
peaks up to about twice the working set, varying with when the collector ran. The check runs with
the collector off and counts the live tensors that are not parameters."""
import gc

import pytest
import torch

from accel_fixtures import random_net as scm_net, sample as scm_sample
from bench.bench_sv4d import euler_cfg_run, make_net
from bench.bench_trajectorycrafter import SHAPES, make_inputs, sample_ours
from test_trajectorycrafter import tiny_net
from turbo_core.accel.presets import turbo4d_specs
from turbo_core.accel.token_reuse import PRESETS as TOKEN_REUSE

SPECS = {"full": [], "fast": turbo4d_specs("fast"), "fast (SV4D variant)": turbo4d_specs("fast", family="sv4d"),
         "token reuse": [("token_reuse", TOKEN_REUSE["balanced"])]}


def live_tensors():
    """(count, bytes) of the tensors Python can reach that are not parameters."""
    ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter)]
    return len(ts), sum(t.numel() * t.element_size() for t in ts)


@pytest.fixture
def collector_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def left_behind(run) -> tuple:
    """What `run()` leaves alive beyond what it returns, with the collector off; after one run
    first, which may fill what a network keeps on purpose (TrajectoryCrafter's rotary tables)."""
    run()
    before = live_tensors()
    result = run()
    del result
    after = live_tensors()
    return after[0] - before[0], after[1] - before[1]


class Reduced:
    reduced = True


@pytest.fixture(scope="module")
def unet():
    return make_net("sv4d2", Reduced, "cpu", torch.float32)


@pytest.mark.parametrize("specs", list(SPECS))
def test_an_sv4d_benchmark_row_frees_everything_it_made_when_it_returns(collector_off, unet, specs):
    got = left_behind(lambda: euler_cfg_run(unet, 2, 2, 16, 3, SPECS[specs], "cpu", torch.float32))
    assert got == (0, 0), f"{got[0]} tensors ({got[1]} bytes) outlived the run until a garbage collection"


@pytest.mark.parametrize("specs", ["full", "fast", "token reuse"])
def test_an_scm_net_run_frees_everything_it_made_when_it_returns(collector_off, specs):
    net = scm_net()
    got = left_behind(lambda: scm_sample(net, SPECS[specs], steps=4))
    assert got == (0, 0), f"{got[0]} tensors ({got[1]} bytes) outlived the run until a garbage collection"


@pytest.mark.parametrize("specs", ["full", "fast"])
def test_a_trajectorycrafter_run_frees_everything_it_made_when_it_returns(collector_off, specs):
    net = tiny_net()
    inp = make_inputs(net.cfg, SHAPES["tiny"], "cpu", torch.float32)
    got = left_behind(lambda: sample_ours(net, inp, 4, SPECS[specs]))
    assert got == (0, 0), f"{got[0]} tensors ({got[1]} bytes) outlived the run until a garbage collection"
