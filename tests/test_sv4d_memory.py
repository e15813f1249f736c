"""SV4D on a reduced-width UNet (CPU): RunStats counts every attention layer at its own level's
token grid, equal to a direct count of the attention work; the forward in memory pieces gives the
one-piece result; a piece that runs out of memory is retried smaller, with a message, and gives the
same result and the same counts."""
import logging

import pytest
import torch

from test_sv4d import inputs, random_net
from turbo_core.accel.registry import build_run
from turbo_core.dispatch import SCMDispatch
from turbo_core.memory import MemoryConfig, run_in_pieces
from turbo_core.models.sv4d import SV4DAttentionLayer, _transformer_flops

V, T, SIDE = 2, 3, 16  # sequence lengths 2 (camera), 3 (motion), 256/64/16/4 (spatial): all distinct
SIGMAS = [10.0, 5.0, 2.5, 1.2, 0.0]


class Census:
    """A direct count of the work: the attention backend records (block, axis, sequences, FLOPs)
    per call, the block taken from a forward pre-hook on each attention layer, the axis from the
    sequence length; the hooks also record each layer's token grid per call."""

    def __init__(self, net, fail_over=None):
        self.block = None
        self.done, self.grids = [], []
        self.fail_over = fail_over  # raise OutOfMemoryError for calls with more sequences than this
        for m in net.modules():
            if isinstance(m, SV4DAttentionLayer):
                m.register_forward_pre_hook(self._enter)

    def _enter(self, module, args):
        self.block = module.index
        x = args[0]
        self.grids.append((module.index, x.shape[0], x.shape[2] * x.shape[3], x.shape[1]))

    def __call__(self, q, k, v):
        s, heads, length, d = q.shape
        if self.fail_over is not None and s > self.fail_over:
            raise torch.cuda.OutOfMemoryError(f"injected: {s} sequences > {self.fail_over}")
        axis = {V: "camera", T: "motion"}.get(length, "spatial")
        flops = s * _transformer_flops(length, heads * d, ff_in=axis != "spatial")
        self.done.append((self.block, axis, s, flops))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def sample(net, census, specs, memory=None, batch=2, calls=4):
    inp = inputs(batch=batch, frames=T, views=V, size=SIDE)
    n = inp["x"].shape[0]
    run = build_run(specs, backend=census)
    run.begin()
    lay = net.token_layout(n, V, T, SIDE, SIDE)
    outs = []
    with torch.no_grad():
        for s in SIGMAS[:calls]:
            d = run.dispatch(lay, s, SIGMAS, blocks=net.blocks, work=net.block_work(lay))
            t = torch.full((n,), 0.25 * torch.tensor(s).log().item())
            outs.append(net(**{**inp, "timesteps": t}, dispatch=d, memory=memory))
            run.end_call(d)
    return outs, run.end()


ACCEL = [("bypass", {"threshold": 0.5, "start_percent": 0.3, "max_consecutive": 1}),
         ("cache", {"threshold": 100.0, "start_percent": 0.3, "max_age": 1}),
         ("prune", {"keep_start": 0.5, "keep_end": 0.4, "start_percent": 0.0})]


def expected_totals(census, batch):
    """(block, axis) -> sequences at full compute, from the token grids the hooks saw."""
    out = {}
    for block, images, tokens, _ in census.grids:
        for axis, n in (("spatial", images), ("camera", batch * T * tokens), ("motion", batch * V * tokens)):
            out[(block, axis)] = out.get((block, axis), 0) + n
    return out


def test_sv4d_stats_count_each_level_at_its_own_grid():
    net = random_net("sv4d2")
    census = Census(net)
    _, stats = sample(net, census, ACCEL)
    counts = stats.block_counts()
    done = {}
    for block, axis, s, f in census.done:
        c = done.setdefault((block, axis), [0, 0.0])
        c[0] += s
        c[1] += f
    assert len({g for _, _, g, _ in census.grids}) == 4  # four token grids: 256, 64, 16, 4 tokens
    # Every call ran every layer's hook (bypass skips a chain inside the layer, after the hook).
    totals = expected_totals(census, batch=2)
    assert set(totals) == {(b, a) for b in range(net.blocks) for a in ("spatial", "camera", "motion")}
    for (block, axis), n in totals.items():
        cell = counts[axis][block]
        assert cell["total"] == n, (block, axis)
        c, f = done.get((block, axis), (0, 0.0))
        assert cell["computed"] == c, (block, axis)
        assert cell["flops_done"] == pytest.approx(f, rel=1e-9)
    for axis in ("spatial", "camera", "motion"):
        assert stats.sequences_total[axis] == sum(n for (b, a), n in totals.items() if a == axis)
        assert stats.sequences_computed[axis] == sum(s for _, a, s, _ in census.done if a == axis)
    assert stats.flops_done == pytest.approx(sum(f for *_, f in census.done), rel=1e-9)
    s = stats.summary()
    assert 0 < s["tokens_pruned_camera_motion"] < s["tokens_total_camera_motion"]
    assert s["tokens_total_camera_motion"] == stats.sequences_total["camera"] + stats.sequences_total["motion"]
    # The accelerators did skip work, so the count is not trivially "everything ran".
    assert stats.flops_done < 0.9 * stats.flops_full


def test_sv4d_forward_in_pieces_equals_one_piece():
    net = random_net("sv4d2")
    inp = inputs(batch=2, frames=T, views=V, size=SIDE)
    lay = net.token_layout(inp["x"].shape[0], V, T, SIDE, SIDE)
    one, pieces = Census(net), Census(net)
    cfg = MemoryConfig(piece_bytes=1_000_000)  # a few images / pixels / one batch item at a time
    with torch.no_grad():
        ref = net(**inp, dispatch=SCMDispatch(lay, backend=one))
        out = net(**inp, dispatch=SCMDispatch(lay, backend=pieces), memory=cfg)
    assert len(pieces.done) > 2 * len(one.done)  # the pieces really split the work
    for axis in ("spatial", "camera", "motion"):  # ... and covered it once
        assert sum(s for _, a, s, _ in pieces.done if a == axis) == sum(s for _, a, s, _ in one.done if a == axis)
    # The same arithmetic per sequence; only the matrix products' blocking may differ.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cfg.retries == 0


def test_sv4d_accelerated_run_in_pieces_equals_one_piece():
    """Under the accelerators (the cache reusing with a rolling refresh, whose choices do not
    depend on the values), pieces change neither the result nor the counts."""
    net = random_net("sv4d2")
    cache = [("cache", {"threshold": 100.0, "start_percent": 0.3, "max_age": 1})]
    ref, st_ref = sample(net, Census(net), cache, calls=3)
    pieces = Census(net)
    out, st = sample(net, pieces, cache, memory=MemoryConfig(piece_bytes=1_000_000), calls=3)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert st.block_counts() == st_ref.block_counts()
    assert st.timeline_grid() == st_ref.timeline_grid()
    assert [t["parts"] for t in st.timeline] == [t["parts"] for t in st_ref.timeline]
    assert st.cache_hits == st_ref.cache_hits > 0


def test_sv4d_out_of_memory_piece_is_retried_smaller(caplog):
    net = random_net("sv4d2")
    ref, st_ref = sample(net, Census(net), [], calls=2)
    failing = Census(net, fail_over=200)  # "allocations" for more than 200 sequences fail
    cfg = MemoryConfig()  # on the CPU: one piece first, then halves on failure
    with caplog.at_level(logging.WARNING, logger="turbo4d"):
        out, st = sample(net, failing, [], memory=cfg, calls=2)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert cfg.retries > 0 and all(s <= 200 for _, _, s, _ in failing.done)
    msgs = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(msgs) == cfg.retries
    # Camera attention first ran whole on the dispatch's grid path, then in pieces of sequences.
    assert msgs[0] == ("Turbo4D: out of GPU memory in camera attention of block 0 run whole; running it in pieces "
                       "of sequences from now on")
    assert msgs[1] == ("Turbo4D: out of GPU memory in camera attention of block 0 (1536 at a time, units 0..1535 "
                       "of 1536); retrying 768 at a time")
    # The second call starts from the sizes that worked: no message repeats.
    assert len(set(msgs)) == len(msgs)
    # Retried pieces are counted once.
    for axis in ("spatial", "camera", "motion"):
        assert st.sequences_computed[axis] == st_ref.sequences_computed[axis] == st.sequences_total[axis]
    assert st.flops_done == pytest.approx(st_ref.flops_done)


def test_out_of_memory_at_the_smallest_piece_names_the_fix():
    def fn(a, b):
        raise torch.cuda.OutOfMemoryError("injected")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="Lower the frames, views"):
        run_in_pieces(fn, 8, 8, "a test", MemoryConfig(min_piece=2))


def test_res_block_out_of_memory_is_retried_per_batch_item(caplog):
    net = random_net("sv4d")
    inp = inputs(batch=2, frames=2, views=2)
    with torch.no_grad():
        ref = net(**inp)
    block = net.input_blocks[1][0]
    full = block.forward

    def fails_for_two_items(h, emb, per_item):
        if h.shape[0] > per_item:
            raise torch.cuda.OutOfMemoryError("injected")
        return full(h, emb, per_item)

    block.forward = fails_for_two_items
    cfg = MemoryConfig()
    with caplog.at_level(logging.WARNING, logger="turbo4d"), torch.no_grad():
        out = net(**inp, memory=cfg)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cfg.retries == 1 and "a res block (2 at a time" in cfg.messages[0]
