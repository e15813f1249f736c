"""Token reuse on the SV4D / SV4D 2.0 UNets' attention layers (SV4DUNet.token_spans, dispatch.Span
form "tokens"), and the presets' per-model variants (presets.model_family).

The token form of each layer equals the full layer at the kept tokens; a run computes a share of
the camera/motion sequences and spatial queries (counted by a counting attention backend,
independent of RunStats) within its bound, without a host sync, bit for bit at threshold 0; a
network that declares no token spans still gets the note. Reduced-width UNets on the CPU."""
import torch

from per_call_fixtures import deep_net
from sv4d_fixtures import FRAMES, SIDE, VIEWS, rel_err, reuse_kwargs, sv4d_sample, unet, unet_full  # noqa: F401
from test_sv4d import random_net
from turbo_core.accel.token_reuse import NO_STREAM, TokenReuseConfig
from turbo_core.dispatch import sdpa
from turbo_core.models import sv4d as S


def tokens(**kw):
    return [("token_reuse", TokenReuseConfig(**reuse_kwargs(**kw)))]


class CountingAttention:
    def __init__(self):
        self.queries = 0

    def __call__(self, q, k, v):
        self.queries += q.shape[0] * q.shape[2]
        return sdpa(q, k, v)


def test_token_spans_are_every_layer_deepest_first_in_units_that_keep_camera_sequences_whole(unet):
    n = 2 * FRAMES * VIEWS
    spans = unet.token_spans((n, 8, SIDE, SIDE), VIEWS)
    g = VIEWS if unet.cfg.use_3d_attention else 1
    levels = unet.attention_levels()
    assert sorted(s.blocks[0] for s in spans) == list(range(unet.blocks))
    assert all(s.form == "tokens" and s.key == ("tokens", s.blocks[0]) for s in spans)
    ds = [levels[s.blocks[0]][0] for s in spans]
    assert ds == sorted(ds, reverse=True)  # deepest level first
    for s in spans:
        d, width = levels[s.blocks[0]]
        assert s.shape == (n, (SIDE // d) ** 2 // g, g * width)


def test_the_token_form_of_each_layer_equals_the_full_layer_at_the_kept_tokens(unet):
    errs, orig = [], S.SV4DAttentionLayer._chain
    gen = torch.Generator().manual_seed(3)

    def check(self, toks, call, level):
        out = orig(self, toks, call, level)
        lay, g = level.layout, level.group
        n, t, c = toks.shape
        units = t // g
        pos = torch.stack([torch.randperm(units, generator=gen)[:max(1, units // 3)].sort().values
                           for _ in range(lay.batch)])
        part = self._tokens(toks, pos, call, level)
        px = (pos[..., None] * g + torch.arange(g)).reshape(lay.batch, -1)
        errs.append(rel_err(part, out.reshape(n * t, c).index_select(0, lay.token_rows(px)).view(n, -1, c)))
        return out

    S.SV4DAttentionLayer._chain = check
    try:
        sv4d_sample(unet, steps=1)
    finally:
        S.SV4DAttentionLayer._chain = orig
    assert len(errs) == unet.blocks and max(errs) < 1e-5


def test_token_reuse_computes_a_share_of_the_unets_attention_within_its_bound(unet, unet_full):
    full, reused = CountingAttention(), CountingAttention()
    sv4d_sample(unet, backend=full)
    x, st, run = sv4d_sample(unet, tokens(keep_min=0.25), backend=reused)
    assert NO_STREAM not in st.notes
    assert reused.queries < 0.8 * full.queries  # work really skipped, counted by the backend
    assert st.summary()["compute_fraction"] < 0.8
    assert rel_err(x, unet_full) < 0.05
    # A bound that holds some of the layers: never exceeded, something cached, freed at the end.
    _, st, run = sv4d_sample(unet, tokens(keep_min=0.25, max_cache_mb=0.3))
    assert 0 < st.bounded_cache_peak <= 0.3 * 2**20
    assert run.accelerators[0].cache_bytes() == 0


def test_threshold_zero_is_full_compute_bit_for_bit_and_no_host_sync_inside_a_call(unet, unet_full):
    x, _, _ = sv4d_sample(unet, tokens(threshold=0.0))
    assert torch.equal(x, unet_full)
    sv4d_sample(unet, tokens(), guard=True)  # NoHostSync raises on a host read inside a call


def test_a_network_without_a_token_span_or_stream_runs_whole_and_the_run_says_so():
    from turbo_core.accel.registry import build_run
    from turbo_core.schedule import StepInfo  # noqa: F401 (the run builds the step)

    net = deep_net(0)
    run = build_run(tokens())
    run.begin()
    lay = net.token_layout(2, 2, 1)
    sigmas = [2.0, 1.0, 0.0]
    d = run.dispatch(lay, 2.0, sigmas, blocks=1)
    x = torch.randn(2, lay.tokens, 8)
    y = d.chain(0, x, lambda h: h * 2)  # not a stream, and no span declared
    assert torch.equal(y, x * 2)
    assert NO_STREAM in run.end().notes


# --- the presets' per-model variants -----------------------------------------------------------
def test_turbo4d_presets_give_an_sv4d_unet_its_variant_and_the_embedded_model_the_default():
    from turbo_core.accel.mechanisms import node_configs, preset_variant, settings_line
    from turbo_core.accel.presets import TURBO4D_PRESETS, model_family, turbo4d_specs, turbo4d_variant

    sv4d, embedded = random_net("sv4d2"), deep_net(0)
    assert model_family(sv4d) == "sv4d" and model_family(random_net("sv4d")) == "sv4d"
    assert model_family(embedded) == "default"
    for name in ("balanced", "fast"):
        own = dict(turbo4d_specs(name, family=model_family(sv4d)))
        assert turbo4d_variant(name, "sv4d") == "sv4d"
        assert own["block_reuse"].max_skipped == 5 and own["block_reuse"].max_age == 6
        assert dict(turbo4d_specs(name, family=model_family(embedded))) == dict(turbo4d_specs(name))
        assert dict(turbo4d_specs(name))["block_reuse"] == TURBO4D_PRESETS[name]["block_reuse"]
        assert dict(turbo4d_specs(name))["block_reuse"].max_skipped == 0
    assert turbo4d_variant("quality", "sv4d") == "default"  # not measured: the default
    # The Cache node: the SV4D variant of its block reuse preset, named in its settings line.
    cfg = node_configs("Turbo4DCache", "fast", family="sv4d")["block_reuse"]
    assert (cfg.threshold, cfg.max_age, cfg.max_skipped) == (0.4, 6, 5)
    assert preset_variant("Turbo4DCache", "fast", "sv4d") == "sv4d"
    assert "(sv4d variant)" in settings_line("Turbo4D Cache", "fast", {"block_reuse": cfg}, "sv4d")
    assert node_configs("Turbo4DCache", "fast", family="default") == node_configs("Turbo4DCache", "fast")
    assert preset_variant("Turbo4DCache", "fast", "default") is None
    # the sub-attention cache method has no variant
    assert preset_variant("Turbo4DCache", "fast", "sv4d", "sub-attention cache") is None
