"""SV4D / SV4D 2.0 UNet on the SCM dispatch: checkpoint keys and shapes equal the reference lists at
full size; a reduced-width model runs on CPU with every sub-attention going through the dispatch,
any subset of sequences computes the same as all of them, an attention layer equals a line-by-line
transcription of the original layer (both camera reshapes), and weights round-trip through
safetensors with a clear error for a foreign file."""
import os

import pytest
import torch
from einops import rearrange, repeat

from turbo_core.accel.base import Accelerator
from turbo_core.accel.registry import build_run
from turbo_core.dispatch import SCMDispatch
from turbo_core.layout import SCMLayout
from turbo_core.models import CONFIGS, SCMNet
from turbo_core.models.io import CheckpointError, save_model
from turbo_core.models.sv4d import (PREFIX, SV4DConfig, SV4DUNet, detect_sv4d, load_sv4d, parameter_count,
                                    save_sv4d, sv4d_state_shapes)
from turbo_core.models.sv4d_blocks import CameraAxis, timestep_embedding

REFERENCE = "/work/shared/reference"
LEVELS = {0: 16, 1: 16, 2: 8, 3: 8, 4: 4, 5: 4, 6: 2, 7: 4, 8: 4, 9: 4,
          10: 8, 11: 8, 12: 8, 13: 16, 14: 16, 15: 16}  # block -> token grid side at 16x16 latents


def reference_keys(version):
    here = os.path.join(os.path.dirname(__file__), "data", f"{version}_unet_keys.tsv")
    path = here if os.path.exists(here) else os.path.join(REFERENCE, f"{version}_unet_keys.tsv")
    if not os.path.exists(path):
        pytest.skip(f"reference key list {version}_unet_keys.tsv not available")
    out = []
    for line in open(path):
        k, s = line.rstrip("\n").split("\t")
        out.append((k, tuple(int(v) for v in s.strip("()").split(",") if v.strip())))
    return out


def random_net(version="sv4d2", seed=0, **kw):
    torch.manual_seed(seed)
    net = SV4DUNet(SV4DConfig.reduced(version, **kw))
    with torch.no_grad():  # the real init zeroes output projections: test a net that computes
        for p in net.parameters():
            p.normal_(0, 0.05)
        for name, p in net.named_parameters():
            if name.endswith("mix_factor"):
                p.uniform_(-2, 2)
    return net.eval()


def inputs(batch=1, frames=2, views=2, size=16, seed=1, context_dim=1024):
    g = torch.Generator().manual_seed(seed)
    n = batch * frames * views
    return dict(x=torch.randn(n, 8, size, size, generator=g),
                timesteps=torch.rand(n, generator=g),
                context=torch.randn(batch, frames, context_dim, generator=g),
                y=torch.randn(n, 1280, generator=g),
                cond_view=torch.randn(batch * views, 4, size, size, generator=g),
                views=views, frames=frames)


class Recorder(Accelerator):
    """Passes everything through and records what the dispatch saw."""

    def __init__(self):
        super().__init__()
        self.attends, self.chains = [], []

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        self.attends.append((block, axis, tuple(seqs.shape), dispatch.layout))
        return nxt(seqs, index)

    def chain(self, dispatch, block, x, nxt):
        self.chains.append((block, tuple(x.shape)))
        return nxt(x)


class Split(Accelerator):
    """Computes every sub-attention as two interleaved subsets in reverse order, then scatters:
    equals full compute only if compute gathers each sequence's own context by index."""

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        s = seqs.shape[0]
        out = torch.empty_like(seqs)
        for part in (torch.arange(s - 1, -1, -2), torch.arange(s - 2, -1, -2)):
            if len(part):
                out[part] = nxt(seqs[part], part)
        return out


# --- full size ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["sv4d", "sv4d2"])
def test_full_size_keys_and_shapes_equal_reference(version):
    ref = reference_keys(version)
    ours = [(k, tuple(v.shape)) for k, v in sv4d_state_shapes(SV4DConfig(version=version)).items()]
    assert ours == ref  # names, shapes and order
    assert detect_sv4d([k for k, _ in ref]) == version
    count = parameter_count(SV4DConfig(version=version))
    assert count == sum(torch.Size(s).numel() for _, s in ref)
    assert 1.9e9 < count < 2.1e9


# --- reduced width, through the dispatch ------------------------------------------------------
@pytest.mark.parametrize("version", ["sv4d", "sv4d2"])
def test_every_sub_attention_goes_through_the_dispatch(version):
    net = random_net(version)
    inp = inputs(batch=1, frames=2, views=2)
    lay = net.token_layout(4, 2, 2, 16, 16)
    rec = Recorder()
    with torch.no_grad():
        out = net(**inp, dispatch=SCMDispatch(lay, accelerators=[rec]))
    assert out.shape == (4, 4, 16, 16) and torch.isfinite(out).all()
    assert net.blocks == 16
    assert [b for b, _ in rec.chains] == list(range(16))
    assert [(b, a) for b, a, _, _ in rec.attends] == [(b, a) for b in range(16) for a in ("spatial", "camera", "motion")]
    for block, axis, shape, layout in rec.attends:
        side = LEVELS[block]
        n = side * side
        assert (layout.height, layout.width) == (side, side)
        assert shape[:2] == {"spatial": (4, n), "camera": (2 * n, 2), "motion": (2 * n, 2)}[axis]
        assert shape[:2] == layout.axis_shape(axis)
    # Each layer's chain is a token span (SV4DUNet.token_spans): its stream is the level's tokens,
    # in units of V consecutive tokens where SV4D 2.0's camera pixel groups need them whole.
    g = 2 if net.cfg.use_3d_attention else 1
    for block, shape in rec.chains:
        assert shape == (4, LEVELS[block] ** 2 // g, g * net.attention_levels()[block][1])


@pytest.mark.parametrize("version", ["sv4d", "sv4d2"])
def test_any_subset_of_sequences_computes_the_same(version):
    net = random_net(version)
    inp = inputs(batch=2, frames=3, views=2, seed=3)
    lay = net.token_layout(12, 2, 3, 16, 16)
    with torch.no_grad():
        full = net(**inp)
        split = net(**inp, dispatch=SCMDispatch(lay, accelerators=[Split()]))
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-4)


def test_per_image_context_and_scalar_timestep_are_accepted():
    net = random_net("sv4d")
    inp = inputs(batch=1, frames=2, views=2)
    with torch.no_grad():
        ref = net(**{**inp, "timesteps": torch.full((4,), 0.25)})
        per_image = inp["context"][:, :, None].expand(1, 2, 2, 1024).reshape(4, 1, 1024)
        alt = net(**{**inp, "context": per_image, "timesteps": 0.25})
    torch.testing.assert_close(alt, ref)
    bad = per_image.clone()
    bad[1] += 1  # view 1 of frame 0 disagrees with view 0
    with pytest.raises(ValueError, match="one CLIP token per frame"):
        net(**{**inp, "context": bad})
    with pytest.raises(ValueError, match="cond_view must be"):
        net(**{**inp, "cond_view": inp["cond_view"][:1]})


def test_bfloat16_forward_follows_float32():
    net = random_net("sv4d2")
    inp = inputs(batch=1, frames=2, views=2)
    with torch.no_grad():
        ref = net(**inp)
        low = net.to(torch.bfloat16)(**inp)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().mean() / ref.abs().mean()
    assert err < 0.05, err


def test_accelerators_apply_unchanged():
    """The three Turbo4D accelerators on the SV4D 2.0 UNet over a short schedule."""
    net = random_net("sv4d2")
    inp = inputs(batch=1, frames=2, views=2)
    specs = [("bypass", {"threshold": 100.0, "start_percent": 0.0, "max_consecutive": 1}),
             ("cache", {"threshold": 100.0, "start_percent": 0.0, "max_age": 1}),
             ("prune", {"keep_start": 0.5, "keep_end": 0.5, "start_percent": 0.0})]
    run = build_run(specs)
    run.begin()
    sigmas = [10.0, 5.0, 2.5, 1.2, 0.6, 0.0]
    lay = net.token_layout(4, 2, 2, 16, 16)
    with torch.no_grad():
        for s in sigmas[:-1]:
            d = run.dispatch(lay, s, sigmas, blocks=net.blocks)
            out = net(**{**inp, "timesteps": torch.full((4,), 0.25 * torch.tensor(s).log().item())}, dispatch=d)
            run.end_call(d)
            assert torch.isfinite(out).all()
    stats = run.end()
    assert stats.chains_bypassed > 0
    assert stats.cache_hits > 0
    assert sum(stats.reused_by["prune"].values()) > 0


# --- the layer against a transcription of the original ------------------------------------------
def original_attention(attn, x, context=None):
    """CrossAttention.forward as SV4D's code computes it (softmax attention, any context length)."""
    h = attn.heads
    context = x if context is None else context
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=h), (q, k, v))
    w = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    out = torch.einsum("bhij,bhjd->bhid", w.softmax(-1), v)
    return attn.to_out(rearrange(out, "b h n d -> b n (h d)", h=h))


def original_spatial_block(blk, x, context):
    x = original_attention(blk.attn1, blk.norm1(x)) + x
    x = original_attention(blk.attn2, blk.norm2(x), context) + x
    return blk.ff(blk.norm3(x)) + x


def original_time_mix_block(blk, x, context, timesteps):
    """BasicTransformerTimeMixBlock._forward, reshapes as the original lines read."""
    B, S, C = x.shape
    x = rearrange(x, "(b t) s c -> (b s) t c", t=timesteps)
    x_skip = x
    x = blk.ff_in(blk.norm_in(x))
    x += x_skip
    x = original_attention(blk.attn1, blk.norm1(x)) + x
    x = original_attention(blk.attn2, blk.norm2(x), context=context) + x
    x_skip = x
    x = blk.ff(blk.norm3(x))
    x += x_skip
    return rearrange(x, "(b s) t c -> (b t) s c", s=S, b=B // timesteps, c=C, t=timesteps)


def original_layer(layer, x, context, cam, cond_view, use_camera_emb, use_3d_attention):
    """PostHocSpatialTransformerWithTimeMixingAndMotion.forward (depth 1, use_linear, learned
    mixers with image_only_indicator zeroed), the reshape lines as SV4D's code writes them."""
    b, t, d1 = context.shape
    v, d2 = cond_view.shape[0] // b, cond_view.shape[1]
    _, c, h, w = x.shape
    x_in = x
    cond_view = torch.nn.functional.interpolate(cond_view, size=(h, w), mode="bilinear")
    spatial_context = context[:, :, None].repeat(1, 1, v, 1).reshape(-1, 1, d1)
    camera_context = context[:, :, None].repeat(1, 1, h * w, 1).reshape(-1, 1, d1)
    motion_context = cond_view.permute(0, 2, 3, 1).reshape(-1, 1, d2)
    x = layer.norm(x)
    x = rearrange(x, "b c h w -> b (h w) c")
    x = layer.proj_in(x)
    num_frames = torch.arange(t, device=x.device)
    num_frames = repeat(num_frames, "t -> b t", b=b)
    num_frames = rearrange(num_frames, "b t -> (b t)")
    t_emb = timestep_embedding(num_frames, layer.proj_in.in_features)
    emb_time = layer.time_mix_motion_embed(t_emb)
    emb_time = emb_time[:, None, :]
    if use_camera_emb:
        emb_view = layer.time_mix_time_embed(cam.view(b, t, v, -1)[:, 0].reshape(b * v, -1))
        emb_view = emb_view[:, None, :]
    else:
        num_views = torch.arange(v, device=x.device)
        num_views = repeat(num_views, "t -> b t", b=b)
        num_views = rearrange(num_views, "b t -> (b t)")
        v_emb = timestep_embedding(num_views, layer.proj_in.in_features)
        emb_view = layer.time_mix_time_embed(v_emb)
        emb_view = emb_view[:, None, :]
    if use_3d_attention:
        emb_view = emb_view.repeat(1, h * w, 1).view(-1, 1, c)
    block, time_block, mot_block = layer.transformer_blocks[0], layer.time_mix_blocks[0], layer.motion_blocks[0]
    x = original_spatial_block(block, x, spatial_context)
    if use_3d_attention:
        x = x.view(b, t, v, h * w, c).permute(0, 2, 3, 1, 4).reshape(-1, t, c)
    else:
        x = x.view(b, t, v, h * w, c).permute(0, 2, 1, 3, 4).reshape(b * v, -1, c)
    x_mix = x + emb_view
    x_mix = original_time_mix_block(time_block, x_mix, camera_context, timesteps=v)
    alpha = torch.sigmoid(layer.time_mixer.mix_factor)
    x = alpha * x + (1.0 - alpha) * x_mix
    if use_3d_attention:
        x = x.view(b, v, h * w, t, c).permute(0, 3, 1, 2, 4).reshape(b * t, -1, c)
    else:
        x = x.view(b, v, t, h * w, c).permute(0, 2, 1, 3, 4).reshape(b * t, -1, c)
    x_mix = x + emb_time
    x_mix = original_time_mix_block(mot_block, x_mix, motion_context, timesteps=t)
    motion_mixer = layer.time_mixer_motion if hasattr(layer, "time_mixer_motion") else layer.time_mixer
    alpha = torch.sigmoid(motion_mixer.mix_factor)
    x = alpha * x + (1.0 - alpha) * x_mix
    x = x.view(b, t, v, h * w, c).reshape(-1, h * w, c)
    x = layer.proj_out(x)
    x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
    return x + x_in


@pytest.mark.parametrize("version,use_3d,views,side", [
    ("sv4d", False, 3, 4), ("sv4d2", False, 2, 4), ("sv4d2", True, 2, 4),
    ("sv4d2", True, 4, 3),  # 9 pixels in runs of 4: the runs straddle views, as in the 9x9 middle block
])
def test_layer_equals_transcription_of_the_original(version, use_3d, views, side):
    net = random_net(version, use_3d_attention=use_3d)
    b, frames = 2, 3
    inp = inputs(batch=b, frames=frames, views=views, size=8, seed=5)
    layer = net.input_blocks[1][1]
    call = net.condition(**inp)
    x = torch.randn(b * frames * views, layer.proj_in.in_features, side, side, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = layer(x, call)
        ref = original_layer(layer, x, inp["context"], call.emb, inp["cond_view"], net.cfg.use_camera_emb, use_3d)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    if version == "sv4d2":  # the two camera reshapes really compute different things
        other = random_net(version, use_3d_attention=not use_3d)  # same weights, other reshape
        with torch.no_grad():
            assert not torch.allclose(other.input_blocks[1][1](x, other.condition(**inp)), ours, atol=1e-3)


@pytest.mark.parametrize("pixel_groups", [False, True])
@pytest.mark.parametrize("views,side", [(2, 4), (4, 3), (3, 2)])
def test_camera_axis_matches_original_reshapes(pixel_groups, views, side):
    b, t, n, c = 2, 3, side * side, 5
    lay = SCMLayout(b, views, t, side, side)
    cam = CameraAxis(lay, pixel_groups)
    x = torch.randn(b * t * views, n, c)
    seqs = cam.to_axis(x)
    assert seqs.shape == (b * t * n, views, c)
    assert torch.equal(cam.from_axis(seqs), x)  # exact round trip
    ctx_rows, view_rows = cam.rows("cpu")
    # Coordinates of every element, to read what each sequence holds.
    coords = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(t), torch.arange(views), torch.arange(n),
                                        indexing="ij"), -1).reshape(b * t * views, n, 4).float()
    cs = cam.to_axis(coords)
    assert torch.equal(cs[..., 0].long() * views + cs[..., 2].long(), view_rows)  # each element's own view
    if not pixel_groups:
        assert torch.equal(cs, lay.to_axis(coords, "camera"))
        return
    # The original: rows (b, v, pixel) with T frames each, regrouped in runs of V rows.
    v = views
    x3 = x.view(b, t, v, n, c).permute(0, 2, 3, 1, 4).reshape(-1, t, c)
    orig = rearrange(x3, "(b t) s c -> (b s) t c", t=v)                   # sequences (group, frame)
    ours_in_orig_order = seqs.view(b, t, n, v, c).permute(0, 2, 1, 3, 4).reshape(-1, v, c)
    assert torch.equal(ours_in_orig_order, orig)
    clip = torch.randn(b, t, 7)
    camera_context = clip[:, :, None].repeat(1, 1, n, 1).reshape(-1, 1, 7)  # the original's rows
    ours_ctx = clip.reshape(b * t, 7)[ctx_rows].view(b, t, n, 7).permute(0, 2, 1, 3).reshape(-1, 1, 7)
    assert torch.equal(ours_ctx, camera_context)
    # What it really is: V consecutive pixels of one image (one frame), straddling views only
    # where h*w is not a multiple of V.
    assert (cs[..., 1] == cs[..., 1][:, :1]).all()
    flat = cs[..., 2] * n + cs[..., 3]
    assert (flat[:, 1:] - flat[:, :-1] == 1).all()
    assert ((cs[..., 2] == cs[..., 2][:, :1]).all()) == (n % v == 0)


def test_single_token_cross_attention_equals_softmax_attention():
    net = random_net("sv4d2")
    attn = net.input_blocks[1][1].motion_blocks[0].attn2
    x = torch.randn(6, 5, attn.to_q.in_features)
    ctx = torch.randn(6, 1, attn.to_k.in_features)
    with torch.no_grad():
        torch.testing.assert_close(attn.single_token(ctx[:, 0])[:, None].expand(6, 5, -1),
                                   original_attention(attn, x, ctx), atol=1e-6, rtol=1e-5)


# --- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["sv4d", "sv4d2"])
def test_safetensors_round_trip_recognises_version_and_width(tmp_path, version):
    net = random_net(version, head_dim=8, context_dim=128)  # widths read back from shapes, head_dim from metadata
    path = str(tmp_path / f"{version}_small.safetensors")
    save_sv4d(net, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert all(k.startswith(PREFIX) for k in f.keys())
    loaded = load_sv4d(path)
    assert loaded.cfg == net.cfg
    assert (loaded.cfg.model_channels, loaded.cfg.context_dim, loaded.cfg.version) == (32, 128, version)
    for (k1, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    inp = inputs(context_dim=128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp), net(**inp))


def test_full_checkpoint_layout_and_8view_name(tmp_path):
    """A Stability-style file: the UNet under the prefix beside conditioner and VAE tensors, no
    Turbo4D metadata; the width is read from the shapes, SV4D 2.0's camera mode from the name."""
    from safetensors.torch import save_file

    net = random_net("sv4d2", context_dim=128)
    sd = {PREFIX + k: v.contiguous() for k, v in net.state_dict().items()}
    sd["conditioner.embedders.0.open_clip.model.proj"] = torch.zeros(3, 3)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    for name, use_3d in (("sv4d2.safetensors", True), ("sv4d2_8views.safetensors", False)):
        path = str(tmp_path / name)
        save_file(sd, path)
        loaded = load_sv4d(path)
        assert loaded.cfg.model_channels == 32 and loaded.cfg.version == "sv4d2"
        assert loaded.cfg.use_3d_attention is use_3d
        assert torch.equal(loaded.state_dict()["out.2.weight"], net.state_dict()["out.2.weight"])


def test_foreign_file_names_first_missing_and_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "scm_tiny.safetensors")
    save_model(SCMNet(CONFIGS["tiny"]), path)
    with pytest.raises(CheckpointError) as e:
        load_sv4d(path)
    msg = str(e.value)
    assert "not an SV4D" in msg and "scm_tiny.safetensors" in msg
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        present = list(f.keys())
    expected = [k[len(PREFIX):] for k in sv4d_state_shapes(SV4DConfig())]
    first_missing = next(k for k in expected if k not in present)
    first_foreign = next(k for k in present if k not in expected)
    assert f"(first: '{PREFIX}{first_missing}')" in msg
    assert f"(first: '{PREFIX}{first_foreign}')" in msg

    # An SV4D file with one tensor gone and one foreign tensor added.
    from safetensors.torch import save_file

    sd = {PREFIX + k: v.contiguous() for k, v in random_net("sv4d").state_dict().items()}
    gone = PREFIX + "middle_block.1.motion_blocks.0.attn2.to_v.weight"
    del sd[gone]
    sd[PREFIX + "middle_block.1.extra.weight"] = torch.zeros(1)
    path2 = str(tmp_path / "damaged.safetensors")
    save_file(sd, path2)
    with pytest.raises(CheckpointError) as e:
        load_sv4d(path2)
    assert f"'{gone}'" in str(e.value) and f"'{PREFIX}middle_block.1.extra.weight'" in str(e.value)



# --- the loader's variant choice ----------------------------------------------------------------
def test_eight_view_model_has_no_tensor_of_its_own():
    """Why "auto" reads the file name: SV4D 2.0 and its 8-view model (sv4d2.yaml / sv4d2_8views.yaml
    differ only in use_3d_attention) have the same tensor names and shapes, the reference list's."""
    four = [(k, tuple(v.shape)) for k, v in sv4d_state_shapes(SV4DConfig(version="sv4d2")).items()]
    eight = [(k, tuple(v.shape)) for k, v in
             sv4d_state_shapes(SV4DConfig(version="sv4d2", use_3d_attention=False)).items()]
    assert four == eight == reference_keys("sv4d2")


def _stability_file(tmp_path, name, version="sv4d2"):
    """A checkpoint as Stability ships it: the UNet under the prefix, no Turbo4D metadata."""
    from safetensors.torch import save_file

    sd = {PREFIX + k: v.contiguous() for k, v in random_net(version, context_dim=128).state_dict().items()}
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


@pytest.mark.parametrize("name", ["renamed.safetensors", "sv4d2_8views.safetensors"])
def test_variant_choice_sets_the_camera_attention_whatever_the_name(tmp_path, name):
    """A renamed 8-view file loads as the 8-view model (camera attention over the views) when the
    variant says so, and an 8-view-named file as SV4D 2.0 when chosen; auto goes by the name."""
    from turbo_core.models.sv4d import read_sv4d_config, sv4d_variant_note

    path = _stability_file(tmp_path, name)
    eight = "8views" in name
    assert read_sv4d_config(path).use_3d_attention is (not eight)
    assert load_sv4d(path, variant="sv4d2_8views").cfg.use_3d_attention is False
    assert read_sv4d_config(path, variant="sv4d2").use_3d_attention is True
    note = sv4d_variant_note(path)
    assert "by the file name" in note and (eight or "set the loader's variant to sv4d2_8views" in note)
    assert "the choice wins" in sv4d_variant_note(path, "sv4d2_8views" if not eight else "sv4d2")


def test_variant_that_contradicts_the_tensors_is_refused(tmp_path):
    sv4d2, sv4d = _stability_file(tmp_path, "a.safetensors"), _stability_file(tmp_path, "b.safetensors", "sv4d")
    with pytest.raises(CheckpointError, match=r"a.safetensors: variant='sv4d' asks for SV4D, but the file's tensors "
                                              r"are SV4D 2.0.*Set variant to 'auto', 'sv4d2' or 'sv4d2_8views'"):
        load_sv4d(sv4d2, variant="sv4d")
    for v in ("sv4d2", "sv4d2_8views"):
        with pytest.raises(CheckpointError, match=r"b.safetensors: .*tensors are SV4D .*Set variant to 'auto' or 'sv4d'"):
            load_sv4d(sv4d, variant=v)
    assert load_sv4d(sv4d, variant="sv4d").cfg.version == "sv4d"
    with pytest.raises(ValueError, match=r"variant='sv4d3': pick one of"):
        load_sv4d(sv4d2, variant="sv4d3")


def test_variant_that_contradicts_a_turbo4d_files_stored_config_is_refused(tmp_path):
    path = str(tmp_path / "plain_name.safetensors")
    save_sv4d(random_net("sv4d2", context_dim=128, use_3d_attention=False), path)
    assert load_sv4d(path).cfg.use_3d_attention is False  # auto: the stored config, not the name
    with pytest.raises(CheckpointError, match=r"saved by Turbo4D as 'sv4d2_8views'.*Set variant to 'auto' or "
                                              r"'sv4d2_8views'"):
        load_sv4d(path, variant="sv4d2")
