"""The dispatch and the registry: backends by name or as a function, accelerators consulted in
level order whatever the spec order, clear errors for unknown names."""
import pytest
import torch

from turbo_core.accel.base import Accelerator
from turbo_core.accel.run import Turbo4DRun
from turbo_core.accel.registry import build_run, merge_spec
from turbo_core.dispatch import SCMDispatch, naive_attention, sdpa
from turbo_core.layout import SCMLayout


def test_backend_by_name_or_function():
    lay = SCMLayout(1, 2, 2, 2, 2)
    assert SCMDispatch(lay, backend="naive").attention is naive_attention
    calls = []

    def mine(q, k, v):
        calls.append(q.shape)
        return sdpa(q, k, v)

    d = SCMDispatch(lay, backend=mine)
    q = torch.randn(3, 2, 4, 8)
    torch.testing.assert_close(d.attention(q, q, q), sdpa(q, q, q))
    assert calls == [q.shape]
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        SCMDispatch(lay, backend="flash9")
    run = Turbo4DRun([], backend=mine)
    assert run.dispatch(lay, 1.0).attention is mine


class _Tag(Accelerator):
    """Appends its name to a shared log on the way in; checks middleware order."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        self.log.append(self.name)
        return nxt(seqs, index)

    def chain(self, dispatch, block, x, nxt):
        self.log.append(self.name + ".chain")
        return nxt(x)


def test_middleware_order_and_counting():
    lay = SCMLayout(1, 2, 2, 2, 2)
    log = []
    run = Turbo4DRun([_Tag("outer", log), _Tag("inner", log)])
    run.begin()
    d = run.dispatch(lay, 1.0, [2.0, 1.0, 0.0], blocks=1, cost={"spatial": 10.0})
    x = torch.randn(lay.images, lay.tokens, 4)
    out = d.chain(0, x, lambda h: h + d.attend(0, "spatial", h, lambda s, idx: s * 2))
    torch.testing.assert_close(out, x * 3)
    assert log == ["outer.chain", "inner.chain", "outer", "inner"]
    run.end_call(d)
    st = run.end()
    assert st.sequences_computed["spatial"] == lay.images and st.chains_ran == 1
    assert st.flops_done == 10.0 * lay.images


def test_registry_levels_and_errors():
    run = build_run([("prune", None), ("bypass", None), ("cache", None)])
    assert [a.name for a in run.accelerators] == ["bypass", "cache", "prune"]
    with pytest.raises(ValueError, match="unknown Turbo4D accelerator 'teacache'"):
        build_run([("teacache", None)])
    specs = merge_spec([("cache", 1), ("prune", 2)], "cache", 3)
    assert specs == [("prune", 2), ("cache", 3)]


def test_schedule_position_on_lists_and_tensors():
    """Percent through the schedule: 0 at the first sigma, 1 at the last evaluated one (the final
    0 is never evaluated), interpolated between entries; a tensor schedule gives the same."""
    import torch

    from turbo_core.schedule import schedule_position

    sched = [10.0, 5.0, 2.0, 1.0, 0.0]
    assert schedule_position(10.0, sched) == (0.0, 4)
    assert schedule_position(1.0, sched) == (1.0, 4)
    assert schedule_position(5.0, sched) == (pytest.approx(1 / 3), 4)
    assert schedule_position(3.5, sched) == (pytest.approx(1.5 / 3), 4)  # Heun's midpoint
    assert schedule_position(3.5, torch.tensor(sched)) == schedule_position(3.5, sched)
    assert schedule_position(3.0, None) == (0.0, 1)
