"""Block reuse on the SV4D / SV4D 2.0 UNets' own spans (SV4DUNet.spans, dispatch.span): the
spans nest and leave the output unchanged when nothing is reused; a reused span skips every res
block, up/down sampling and attention inside it (counted by module hooks and a counting attention
backend, independent of RunStats); threshold 0 is full compute bit for bit; the cache stays within
its bound, the spans chosen outermost first; no host sync inside a call; it composes with the step
skip; an interrupted run leaves no cache and the next run equals a fresh one. Reduced-width UNets on
the CPU, Euler EDM with the CFG batch as SV4D samples."""
import math
from collections import defaultdict

import pytest
import torch

from sv4d_fixtures import FRAMES, SIDE, VIEWS, rel_err, reuse_kwargs, sv4d_sample, unet, unet_full  # noqa: F401
from turbo_core.accel.block_reuse import BlockReuseConfig
from turbo_core.accel.registry import build_run
from turbo_core.accel.step_skip import StepSkipConfig
from turbo_core.dispatch import SCMDispatch, sdpa
from turbo_core.models.sv4d_blocks import Downsample, Upsample, VideoResBlock

class Counts:
    """Res blocks and up/down samplings run (forward hooks), attention sequences computed (the
    backend), by kind."""

    def __init__(self, net):
        self.modules = defaultdict(int)
        self.sequences = 0
        self.handles = [m.register_forward_hook(self._hook(type(m).__name__)) for m in net.modules()
                        if isinstance(m, (VideoResBlock, Downsample, Upsample))]

    def _hook(self, kind):
        def count(mod, args, out):
            self.modules[kind] += 1
        return count

    def attention(self, q, k, v):
        self.sequences += q.shape[0]
        return sdpa(q, k, v)

    def close(self):
        for h in self.handles:
            h.remove()


def reuse(**kw):
    return [("block_reuse", BlockReuseConfig(**reuse_kwargs(**kw)))]


def span_sizes(net):
    """Bytes of each span's 16-bit residual in sv4d_sample's calls, outermost first."""
    return [math.prod(s.shape) * 2 for s in net.spans((2 * FRAMES * VIEWS, 8, SIDE, SIDE))]


# --- the spans ---------------------------------------------------------------------------------------
class SpanRecorder:
    """A pass-through accelerator recording the spans it is handed, in order."""
    name = "recorder"

    def __init__(self):
        self.seen = []

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        return nxt(seqs, index)

    def chain(self, dispatch, block, x, nxt):
        return nxt(x)

    def span(self, dispatch, key, x, nxt):
        self.seen.append((key, tuple(x.shape)))
        y = nxt(x)
        assert y.shape == x.shape
        return y


def test_unet_spans_nest_cover_every_level_below_the_top_and_change_nothing(unet):
    spans = unet.spans((8, 8, SIDE, SIDE))
    assert [s.key for s in spans] == [("unet", k) for k in (1, 2, 3, 4)]
    # Each span holds the next (nested), the outermost every attention layer but the top level's
    # first two (input) and last two (output); the deepest is the middle block and the output block
    # that takes the last skip connection.
    for outer, inner in zip(spans, spans[1:]):
        assert set(inner.blocks) < set(outer.blocks) and inner.modules < outer.modules
    assert spans[0].blocks == tuple(range(2, unet.blocks - 2))
    assert spans[-1].blocks == (6,) and spans[-1].modules == 3  # res, attention, res; output res
    mc = unet.cfg.model_channels
    assert [s.shape for s in spans] == [(8, mc, 16, 16), (8, 2 * mc, 8, 8), (8, 4 * mc, 4, 4), (8, 4 * mc, 2, 2)]
    g = torch.Generator().manual_seed(2)
    inp = dict(x=torch.randn(8, 8, SIDE, SIDE, generator=g), timesteps=torch.rand(8, generator=g),
               context=torch.randn(2, FRAMES, 1024, generator=g), y=torch.randn(8, 1280, generator=g),
               cond_view=torch.randn(2 * VIEWS, 4, SIDE, SIDE, generator=g), views=VIEWS, frames=FRAMES)
    rec = SpanRecorder()
    with torch.no_grad():
        plain = unet(**inp)
        through = unet(**inp, dispatch=SCMDispatch(unet.token_layout(8, VIEWS, FRAMES, SIDE, SIDE),
                                                   accelerators=[rec]))
    assert torch.equal(plain, through)
    assert rec.seen == [(s.key, s.shape) for s in spans]


def test_threshold_zero_is_full_compute_bit_for_bit(unet, unet_full):
    x, st, _ = sv4d_sample(unet, reuse(threshold=0.0))
    assert torch.equal(x, unet_full)
    assert st.spans_reused == 0 and st.blocks_reused == 0 and st.spans_run > 0


def test_a_reused_span_skips_every_convolution_and_attention_inside_it(unet, unet_full):
    full = Counts(unet)
    sv4d_sample(unet, backend=full.attention)
    full.close()
    counts = Counts(unet)
    x, st, _ = sv4d_sample(unet, reuse(spans=1), backend=counts.attention)
    counts.close()
    outer = unet.spans((8, 8, SIDE, SIDE))[0]
    assert st.spans_reused >= 2  # at 6 steps with max_age 2: calls 2-3 and 5-6
    assert st.blocks_reused == st.spans_reused * len(outer.blocks)
    skipped_modules = sum(full.modules.values()) - sum(counts.modules.values())
    assert skipped_modules == st.spans_reused * outer.modules
    # Every res block of the span is skipped (the 2D and temporal halves: one module each call).
    inside_res = sum(1 for m in (list(unet.middle_block) + [m for b in unet.output_blocks[:10] for m in b]
                                 + [m for b in unet.input_blocks[3:] for m in b]) if isinstance(m, VideoResBlock))
    assert full.modules["VideoResBlock"] - counts.modules["VideoResBlock"] == st.spans_reused * inside_res
    # Attention: the sequences of every layer inside the span, on its own grid, per reuse.
    lay = unet.token_layout(8, VIEWS, FRAMES, SIDE, SIDE)
    work = unet.block_work(lay)
    per_reuse = sum(work[(b, a)][0] for b in outer.blocks for a in ("spatial", "camera", "motion"))
    assert full.sequences - counts.sequences == st.spans_reused * per_reuse
    assert st.compute_fraction < 1.0
    # The output moves, within a bound (random weights, everything reused that max_age allows).
    assert 0 < rel_err(x, unet_full) < 0.1


def sample_watched(unet, run):
    """One sample through `run`, with the cache's bytes and the span plans seen at every call."""
    seen, plans = [], []

    def listener(stats, entry):
        if entry is not None:
            acc = run.accelerators[0]
            seen.append(acc.cache_bytes())
            plans.extend((list(st.spans), st.forecast) for st in acc.streams.values())

    run.listeners.append(listener)
    x, st, _ = sv4d_sample(unet, run=run)
    return x, st, seen, plans


def test_memory_bound_is_never_exceeded_and_spans_are_chosen_outermost_first(unet):
    s1, s2, s3, s4 = span_sizes(unet)
    for mb, keys, forecast in (
            (1.01 * (s1 + s2) / 2**20, [1, 2], False),     # as-is: the two outer spans fill it
            (0.9 * s1 / 2**20, [2, 3, 4], False),          # the outermost does not fit: the rest do
            (2.2 * s1 / 2**20, [1, 4], True),              # the forecast: two tensors a span
            (0.5 * s4 / 2**20, [], False)):                # none fits: nothing cached, nothing reused
        run = build_run(reuse(max_cache_mb=mb, forecast=1 if forecast or not keys else 0), backend="sdpa")
        x, st, seen, plans = sample_watched(unet, run)
        assert plans[-1] == ([("unet", k) for k in keys], forecast), mb
        assert max(seen) <= mb * 2**20, (mb, max(seen))
        assert st.summary()["cache_memory_peak_mb"] <= mb + 1e-6
        assert st.summary()["cache_bound_mb"] == pytest.approx(mb, abs=1e-3)
        if keys:
            assert st.spans_reused > 0
        else:
            assert st.spans_reused == 0 and max(seen) == 0
        assert torch.isfinite(x).all()


def test_declared_spans_a_fraction_bound_just_short_of_the_smallest_holds_it_within_the_slack(unet):
    # The bound from the memory fraction (estimated on a CPU from the outermost span's input: a
    # float32 stream, twice its 16-bit residual) just under the smallest span: that span is cached,
    # as-is, and the run says so; a bound further off still caches nothing.
    from turbo_core.accel.bound import ESTIMATE_ACTIVATIONS
    from turbo_core.accel.spans import SPAN_SLACK

    sizes = span_sizes(unet)
    small = min(sizes)
    for over, keys in ((0.98, [sizes.index(small) + 1]), (0.9, [])):
        frac = over * small / (ESTIMATE_ACTIVATIONS * 2 * sizes[0])
        cfg = reuse(forecast=1, max_cache_mb=0.0, memory_fraction=frac)
        run = build_run(cfg, backend="sdpa")
        x, st, seen, plans = sample_watched(unet, run)
        bound = int(frac * ESTIMATE_ACTIVATIONS * 2 * sizes[0])
        assert plans[-1] == ([("unet", k) for k in keys], False), over
        if keys:
            assert st.spans_reused > 0 and bound < max(seen) <= bound * (1 + SPAN_SLACK)
            assert st.summary()["cache_bound_mb"] == pytest.approx(small / 2**20, abs=1e-3)
            assert any("block reuse" in n and "short of one span" in n for n in st.notes)
        else:
            assert st.spans_reused == 0 and max(seen) == 0


def test_no_host_sync_inside_a_call(unet):
    x, st, _ = sv4d_sample(unet, reuse(), guard=True)
    assert st.spans_reused > 0


def test_composes_with_the_step_skip(unet):
    step = [("step", StepSkipConfig(step_threshold=0.3, start_percent=0.0, end_percent=1.0, kappa_prior=0.4,
                                    step_max_skips=10_000))]
    alone, st_alone, _ = sv4d_sample(unet, step, steps=10)
    assert st_alone.summary()["model_calls_run"] < 10
    # Not across skipped calls (max_skipped 0, the default): after every skip the spans restart,
    # nothing is reused over a skipped call, and where nothing is reused the step skip's result stands.
    x, st, _ = sv4d_sample(unet, step + reuse(max_age=2, max_skipped=0), steps=10)
    assert st.summary()["model_calls_run"] == st_alone.summary()["model_calls_run"]
    assert st.calls_aside["block_reuse"] > 0
    if st.spans_reused == 0:
        assert torch.equal(x, alone)
    # Across skipped calls: spans reused on the calls the step skip lets run, within a bound of it.
    x, st, _ = sv4d_sample(unet, step + reuse(max_age=10, max_skipped=9), steps=10)
    assert st.summary()["model_calls_run"] == st_alone.summary()["model_calls_run"]
    assert st.spans_reused > 0 and st.compute_fraction < st_alone.compute_fraction
    assert 0 < rel_err(x, alone) < 0.1


def test_an_interrupted_run_leaves_no_cache_and_the_next_run_is_fresh(unet):
    run = build_run(reuse(), backend="sdpa")
    with pytest.raises(KeyboardInterrupt):
        sv4d_sample(unet, run=run, fail_at=4)
    acc = run.accelerators[0]
    assert acc.cache_bytes() == 0 and not acc.streams
    again, st, _ = sv4d_sample(unet, run=run)
    fresh, st_fresh, _ = sv4d_sample(unet, reuse())
    assert torch.equal(again, fresh)
    assert (st.spans_reused, st.spans_run) == (st_fresh.spans_reused, st_fresh.spans_run)


def test_a_span_interrupted_inside_is_dropped_not_reused(unet):
    """An error inside running spans (here: in the middle block's output res block, inside all four)
    drops their half-written residuals as it passes through them, before the run's end frees the
    rest."""
    run = build_run(reuse(), backend="sdpa")
    acc = run.accelerators[0]
    calls, before, after = [0], [], []

    def fail(mod, args, out):
        calls[0] += 1
        if calls[0] == 2:  # its second run: a later call that recomputes the spans (age past max_age)
            before.append(sum(len(st.entries) for st in acc.streams.values()))
            raise RuntimeError("boom")

    end = run.end

    def end_noting(*a, **kw):
        after.append(sum(len(st.entries) for st in acc.streams.values()))
        return end(*a, **kw)

    run.end = end_noting
    h = unet.output_blocks[0][0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sv4d_sample(unet, run=run)
    finally:
        h.remove()
    assert before == [4] and after == [0]
    assert acc.cache_bytes() == 0
