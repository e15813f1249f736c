"""Token pruning: exact at keep 1, fewer camera/motion sequences and a bounded change otherwise,
picks the sequences that changed or vary most, never starves one past max_age, handles subsets
from an outer accelerator, and adapts its keep share to the measured change."""
import math

import pytest
import torch

from accel_fixtures import full, net, rel_err, sample, CountingAttention
from turbo_core.accel.base import Accelerator
from turbo_core.accel.prune import TokenPruner, TokenPrunerConfig
from turbo_core.accel.registry import build_run
from turbo_core.accel.run import Turbo4DRun
from turbo_core.layout import SCMLayout


def test_keep_one_equals_full_compute(net, full):
    x, st = sample(net, [("prune", TokenPrunerConfig(keep_start=1.0, keep_end=1.0, adapt=0.0, start_percent=0.0))])
    assert torch.equal(x, full)
    assert not st.reused_by["prune"]


def test_pruning_skips_camera_and_motion_work_within_bound(net, full):
    counting, ref = CountingAttention(), CountingAttention()
    cfg = TokenPrunerConfig(keep_start=0.4, keep_end=0.2, start_percent=0.1, adapt=0.0, size_buckets=0)
    x, st = sample(net, [("prune", cfg)], backend=counting)
    sample(net, [], backend=ref)
    done, all_ = counting.by_axis(net), ref.by_axis(net)
    assert done["spatial"] == all_["spatial"]  # spatial attention is never pruned
    for axis in ("camera", "motion"):
        assert done[axis] < 0.6 * all_[axis]
        # Exactly the scheduled share, rounded up, on every pruned call.
        expect = 0
        s = all_[axis] // (12 * net.cfg.depth)
        for t in st.timeline:
            p = t["percent"]
            outside = p < cfg.start_percent or p > cfg.end_percent or t["step"] == 0
            k = s if outside else math.ceil(cfg.scheduled_keep(p) * s)
            expect += k * net.cfg.depth
        assert done[axis] == expect
    assert 0 < rel_err(x, full) < 2e-3


def _drive(cfg, layout, inputs, width=6, outer=None):
    """Calls the pruner's camera sub-attention directly with the given per-call inputs; each
    compute returns its call number. Returns outputs and the computed row index per call."""
    accs = ([outer] if outer else []) + [TokenPruner(cfg)]
    run = Turbo4DRun(accs)
    run.begin()
    sig = torch.linspace(10, 0.1, len(inputs) + 4).tolist() + [0.0]  # every call inside the window
    outs, seen = [], []
    for call, x in enumerate(inputs):
        d = run.dispatch(layout, sig[call], sig, dtype=torch.float32, device="cpu", blocks=1)
        got = []

        def compute(s, idx, call=call, got=got):
            got.append(idx)
            return torch.full_like(s, float(call))

        outs.append(d.attend(0, "camera", x, compute))
        seen.append(got)
        run.end_call(d)
    return run, outs, seen


def test_changed_sequences_are_computed_first():
    lay = SCMLayout(1, 3, 2, 4, 4)
    s = lay.axis_shape("camera")[0]
    base = torch.randn(s, 3, 8)
    moved = torch.tensor([1, 7, 20])
    x1 = base.clone()
    x1[moved] += 1.0
    cfg = TokenPrunerConfig(keep_start=3 / s, keep_end=3 / s, start_percent=0.0, saliency=0.0, adapt=0.0,
                            channel_stride=1, size_buckets=0)
    run, outs, seen = _drive(cfg, lay, [base, x1])
    assert seen[0] == [None]
    assert seen[1][0].tolist() == moved.tolist()
    assert torch.equal(outs[1][moved], torch.ones(3, 3, 8))
    rest = torch.ones(s, dtype=torch.bool)
    rest[moved] = False
    assert torch.equal(outs[1][rest], torch.zeros(int(rest.sum()), 3, 8))  # reused from call 0


def test_saliency_prefers_sequences_whose_views_differ():
    lay = SCMLayout(1, 3, 2, 4, 4)
    s = lay.axis_shape("camera")[0]
    x = torch.randn(s, 1, 8).expand(s, 3, 8).clone()  # every view alike ...
    varied = torch.tensor([3, 11, 30])
    x[varied] = torch.randn(3, 3, 8) * 2              # ... except here
    cfg = TokenPrunerConfig(keep_start=3 / s, keep_end=3 / s, start_percent=0.0, saliency=1.0, adapt=0.0,
                            channel_stride=1, size_buckets=0)
    run, outs, seen = _drive(cfg, lay, [x, x])        # no change at all: saliency decides
    assert seen[1][0].tolist() == varied.tolist()


def test_no_sequence_waits_longer_than_max_age():
    lay = SCMLayout(1, 3, 2, 4, 4)
    s = lay.axis_shape("camera")[0]
    x = torch.randn(s, 3, 8)
    cfg = TokenPrunerConfig(keep_start=0.25, keep_end=0.25, start_percent=0.0, adapt=0.0, max_age=3)
    run, outs, seen = _drive(cfg, lay, [x] * 12)
    for call, out in enumerate(outs):
        assert (call - out[:, 0, 0]).max() <= cfg.max_age
    st = run.end()
    # Nothing changes, so the same salient rows would win every call: the rest are computed only
    # because they come due; the share per call is never below the schedule.
    assert all(len(c[0]) >= math.ceil(0.25 * s) for c in seen[1:])
    assert st.reused_by["prune"]["camera"] == sum(s - len(c[0]) for c in seen[1:]) > 0


class _HalfSubset(Accelerator):
    """An outer accelerator that passes only the even sequences down and fills the rest with -1."""

    name = "half"

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        if dispatch.step.index == 0:
            return nxt(seqs, index)
        idx = torch.arange(0, seqs.shape[0], 2)
        out = torch.full_like(seqs, -1.0)
        out[idx] = nxt(seqs[idx], idx)
        return out


def test_subsets_from_an_outer_accelerator():
    lay = SCMLayout(1, 3, 2, 4, 4)
    s = lay.axis_shape("camera")[0]
    x0 = torch.randn(s, 3, 8)
    x1 = x0.clone()
    x1[[4, 10]] += 1.0   # even rows: visible to the pruner
    x1[[5]] += 5.0       # an odd row: the pruner never sees it
    cfg = TokenPrunerConfig(keep_start=2 / (s // 2), keep_end=2 / (s // 2), start_percent=0.0, saliency=0.0,
                            adapt=0.0, channel_stride=1, size_buckets=0)
    run, outs, seen = _drive(cfg, lay, [x0, x1], outer=_HalfSubset())
    assert seen[1][0].tolist() == [4, 10]             # rows of the whole axis, not of the subset
    out = outs[1]
    assert torch.equal(out[[4, 10]], torch.ones(2, 3, 8))
    assert torch.equal(out[0::2][[0, 1, 3, 4]], torch.zeros(4, 3, 8))
    assert torch.equal(out[1::2], torch.full((s // 2, 3, 8), -1.0))


def test_keep_share_loosens_when_the_change_jumps():
    lay = SCMLayout(1, 3, 2, 4, 4)
    s = lay.axis_shape("camera")[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s, 3, 8, generator=g)
    inputs = [x]
    for i in range(7):  # small steady drift, then a jump
        step = 0.01 if i < 5 else 0.5
        inputs.append(inputs[-1] + step * torch.randn(s, 3, 8, generator=g))
    cfg = TokenPrunerConfig(keep_start=0.3, keep_end=0.3, start_percent=0.0, adapt=1.0, size_buckets=0)
    run, outs, seen = _drive(cfg, lay, inputs)
    counts = [len(c[0]) for c in seen[1:]]
    # The jump at input 6 is measured there and applied at input 7: more rows are computed.
    assert counts[-1] > counts[-3]
    assert counts[-1] > math.ceil(0.3 * s)


def test_config_errors():
    with pytest.raises(ValueError, match="spatial"):
        TokenPrunerConfig(axes=("spatial",))
    with pytest.raises(ValueError, match="keep_end"):
        TokenPrunerConfig(keep_end=0.0)
    assert isinstance(build_run([("prune", None)]).accelerators[0], TokenPruner)


def test_subset_sizes_are_bucketed():
    """An adaptive k is rounded up to one of `size_buckets` sizes, so kernels see a bounded set of
    shapes; rounding only ever computes more than the unbucketed share."""
    lay = SCMLayout(1, 3, 2, 4, 4)
    s = lay.axis_shape("camera")[0]
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(s, 3, 8, generator=g)]
    for i in range(11):  # irregular drift makes the adapted share take many values
        inputs.append(inputs[-1] + torch.randn(s, 3, 8, generator=g) * (0.02 + 0.3 * (i % 3)))
    exact_cfg = TokenPrunerConfig(keep_start=0.5, keep_end=0.1, start_percent=0.0, adapt=1.0, size_buckets=0)
    _, _, exact = _drive(exact_cfg, lay, inputs)
    cfg = TokenPrunerConfig(keep_start=0.5, keep_end=0.1, start_percent=0.0, adapt=1.0, size_buckets=4)
    _, _, seen = _drive(cfg, lay, inputs)
    def size(c):  # None: the whole axis was computed
        return s if c[0] is None else len(c[0])

    sizes = {size(c) for c in seen[1:]}
    unit = -(-s // 4)
    assert sizes <= {unit * i for i in range(1, 5)} | {s}, sizes
    assert len({size(c) for c in exact[1:]}) > len(sizes)
    assert size(seen[1]) >= size(exact[1])  # the same state at call 1: rounding only adds
    with pytest.raises(ValueError, match="size_buckets"):
        TokenPrunerConfig(size_buckets=-1)


@pytest.mark.parametrize("views, frames", [(3, 1), (1, 4)])
def test_one_frame_or_one_view_prunes_without_warnings_or_nan(net, views, frames):
    """A one-token sequence (motion with one frame, camera with one view) has no spread within it:
    its saliency is 0, not the NaN (and the `std(): degrees of freedom` warning) of a one-sample
    standard deviation."""
    import warnings

    cfg = TokenPrunerConfig(keep_start=0.5, keep_end=0.3, saliency=1.0, start_percent=0.0, adapt=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, st = sample(net, [("prune", cfg)], views=views, frames=frames)
    assert torch.isfinite(x).all()
    assert sum(st.reused_by["prune"].values()) > 0  # it did prune
