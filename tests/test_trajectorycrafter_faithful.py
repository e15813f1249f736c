"""TrajectoryCrafter's network against its peers' code, on random weights at reduced width, on CPU:
the transformer without the perceiver against diffusers' CogVideoXTransformer3DModel, the 3D RoPE
against diffusers' get_3d_rotary_pos_embed, the perceiver and the whole CrossTransformer3DModel
forward against a transcription of the original (TrajectoryCrafter's models/crosstransformer3d.py,
written out below on top of diffusers' CogVideoX block), and the CogVideoX VAE as the pack loads
it against diffusers' AutoencoderKLCogVideoX run as the reference pipeline runs it.

diffusers is a test requirement (requirements-test.txt; CI installs it from PyPI)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from turbo_core.dispatch import FullCompute, naive_attention
from turbo_core.models.trajectorycrafter import (CONFIGS, PerceiverCrossAttention, TrajectoryCrafterConfig,
                                                 TrajectoryCrafterTransformer, rope_3d, rope_crop_region)

try:
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
except ImportError as e:  # a test requirement: fail loudly, a skip would hide the comparison
    raise ImportError(f"diffusers is needed for these tests ({e}): pip install -r requirements-test.txt") from e

# fp32 round-off over a few blocks of matmuls and softmaxes: well above 1e-7 x depth, far below
# any real difference (a wrong gate, chunk order or RoPE pair order moves outputs by > 1e-2).
RTOL = 2e-5


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize(module, seed=0):
    """Weights that exercise every path: LayerNorm weights near 1, the rest small and nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.05))
    return module.eval()


# --- transcription of the reference pipeline's RoPE crop (pipeline_trajectorycrafter.py) -------
def original_crop_region(src, tgt_width, tgt_height):
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, int(round(tgt_height / h * w))
    else:
        resize_width, resize_height = tgt_width, int(round(tgt_width / w * h))
    top = int(round((tgt_height - resize_height) / 2.0))
    left = int(round((tgt_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def original_rope(frames, gh, gw, head_dim):
    """The pipeline's _prepare_rotary_positional_embeddings: the grid cropped from 480 x 720 / 16."""
    crop = original_crop_region((gh, gw), 720 // 16, 480 // 16)
    return get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=crop, grid_size=(gh, gw),
                                   temporal_size=frames, use_real=True)


def old_diffusers_rope(frames, gh, gw, head_dim):
    """get_3d_rotary_pos_embed as diffusers < 0.32 computed it (numpy grids), for rope_grid
    "diffusers<0.32"; the frequency part is diffusers' own."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    (t0, l0), (t1, l1) = original_crop_region((gh, gw), 45, 30)
    grid_h = np.linspace(t0, t1, gh, endpoint=False, dtype=np.float32)
    grid_w = np.linspace(l0, l1, gw, endpoint=False, dtype=np.float32)
    grid_t = np.linspace(0, frames, frames, endpoint=False, dtype=np.float32)
    dt, ds = head_dim // 4, head_dim // 8 * 3
    ft, fh, fw = (get_1d_rotary_pos_embed(d, torch.from_numpy(g), use_real=True)
                  for d, g in ((dt, grid_t), (ds, grid_h), (ds, grid_w)))

    def comb(t, h, w):
        return torch.cat([t[:, None, None].expand(-1, gh, gw, -1), h[None, :, None].expand(frames, -1, gw, -1),
                          w[None, None].expand(frames, gh, -1, -1)], -1).reshape(frames * gh * gw, -1)

    return comb(ft[0], fh[0], fw[0]), comb(ft[1], fh[1], fw[1])


@pytest.mark.parametrize("grid", [(13, 24, 42), (3, 4, 7), (2, 30, 45), (4, 6, 4)])
def test_rope_equals_diffusers_get_3d_rotary_pos_embed(grid):
    frames, gh, gw = grid
    assert rope_crop_region(gh, gw, 30, 45) == original_crop_region((gh, gw), 45, 30)
    cos, sin = rope_3d(frames, gh, gw, 64)
    ref_cos, ref_sin = original_rope(frames, gh, gw, 64)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    cos, sin = rope_3d(frames, gh, gw, 64, grid="diffusers<0.32")
    ref_cos, ref_sin = old_diffusers_rope(frames, gh, gw, 64)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2e-6)


def test_rope_grids_differ_where_the_crop_is_offset():
    """TrajectoryCrafter's 384 x 672 grid lies at rows 2..28 of the 30 x 45 base: the two diffusers
    generations place its rows differently (so which one a checkpoint saw matters), while at
    CogVideoX's own 480 x 720 (no offset) they agree."""
    new, old = rope_3d(13, 24, 42, 64)[0], rope_3d(13, 24, 42, 64, grid="diffusers<0.32")[0]
    assert (new - old).abs().max() > 1e-3
    torch.testing.assert_close(rope_3d(3, 30, 45, 64)[0], rope_3d(3, 30, 45, 64, grid="diffusers<0.32")[0],
                               rtol=0, atol=2e-6)


# --- the transformer without the perceiver = diffusers' CogVideoXTransformer3DModel -------------
def diffusers_twin(cfg: TrajectoryCrafterConfig) -> CogVideoXTransformer3DModel:
    return CogVideoXTransformer3DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, time_embed_dim=cfg.time_embed_dim,
        text_embed_dim=cfg.text_embed_dim, num_layers=cfg.num_layers, patch_size=cfg.patch_size,
        norm_eps=cfg.norm_eps, use_rotary_positional_embeddings=True).eval()


def call_inputs(cfg, batch=2, frames=3, h=8, w=14, text=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, frames, 16, h, w, generator=g),
            torch.randn(batch, frames, cfg.in_channels - 16, h, w, generator=g),
            torch.randn(batch, text, cfg.text_embed_dim, generator=g),
            torch.tensor([937, 261][:batch]))


def test_transformer_without_perceiver_equals_diffusers_cogvideox():
    cfg = TrajectoryCrafterConfig.from_dict({**CONFIGS["tiny"].to_dict(), "is_train_cross": False})
    ours = randomize(TrajectoryCrafterTransformer(cfg))
    theirs = diffusers_twin(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys, same shapes
    lat, inp, text, t = call_inputs(cfg)  # 4 x 7 tokens: cropped at an offset in the base grid
    with torch.no_grad():
        out = ours(lat, text, t, inpaint=inp)
        ref = theirs(torch.cat([lat, inp], 2), text, t, image_rotary_emb=original_rope(3, 4, 7, 16),
                     return_dict=False)[0]
    assert out.shape == ref.shape == (2, 3, 16, 8, 14)
    assert ref.abs().max() > 0.1  # a real output, not a degenerate one
    print("relative error", rel_err(out, ref))
    assert rel_err(out, ref) < RTOL


def test_diffusers_config_json_maps_onto_the_config():
    theirs = diffusers_twin(CONFIGS["tiny"])
    cfg = TrajectoryCrafterConfig.from_diffusers(dict(theirs.config))
    # A plain CogVideoX config: no perceiver (its fields keep their defaults).
    assert cfg == dataclasses.replace(CONFIGS["tiny"], is_train_cross=False, cross_attn_dim_head=128,
                                      cross_attn_num_heads=16)
    with pytest.raises(ValueError, match="use_rotary_positional_embeddings=False"):
        TrajectoryCrafterConfig.from_diffusers({**dict(theirs.config), "use_rotary_positional_embeddings": False})


# --- the perceiver and the whole CrossTransformer3DModel against a transcription ----------------
class OriginalPerceiver(nn.Module):
    """PerceiverCrossAttention of TrajectoryCrafter's models/crosstransformer3d.py, transcribed."""

    def __init__(self, *, dim=3072, dim_head=128, heads=16, kv_dim=2048):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim if kv_dim is None else kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim if kv_dim is None else kv_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    @staticmethod
    def reshape_tensor(x, heads):
        bs, length, width = x.shape
        return x.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, seq_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (self.reshape_tensor(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, seq_len, -1)
        return self.to_out(out)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_perceiver_equals_transcription_of_the_original(backend):
    cfg = TrajectoryCrafterConfig(num_attention_heads=4, attention_head_dim=16, cross_attn_dim_head=32,
                                  cross_attn_num_heads=3, num_layers=2)
    ours = randomize(PerceiverCrossAttention(cfg), seed=3)
    orig = OriginalPerceiver(dim=cfg.inner_dim, dim_head=32, heads=3, kv_dim=None).eval()
    orig.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    ref_tokens, video = torch.randn(2, 12, 64, generator=g), torch.randn(2, 40, 64, generator=g)
    attention = FullCompute(None, backend=backend).attention
    with torch.no_grad():
        k, v = ours.keys_values(ref_tokens)
        out = ours(video, k, v, attention)
        ref = orig(ref_tokens, video)
    assert rel_err(out, ref) < RTOL


def original_cross_transformer_forward(base: CogVideoXTransformer3DModel, perceivers, ref_patch, interval,
                                       hidden_states, encoder_hidden_states, timestep, inpaint_latents,
                                       cross_latents, image_rotary_emb):
    """CrossTransformer3DModel.forward (use_rotary_positional_embeddings, is_train_cross),
    transcribed, on diffusers' CogVideoX modules."""
    batch_size, num_frames, channels, height, width = hidden_states.shape
    emb = base.time_embedding(base.time_proj(timestep).to(dtype=hidden_states.dtype))
    hidden_states = torch.concat([hidden_states, inpaint_latents], 2)
    hidden_states = base.patch_embed(encoder_hidden_states, hidden_states)
    b, f, c, h, w = cross_latents.shape  # RefPatchEmbed
    cross = ref_patch(cross_latents.reshape(-1, c, h, w))
    cross = cross.view(b, f, *cross.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
    text_seq_length = encoder_hidden_states.shape[1]
    encoder_hidden_states = hidden_states[:, :text_seq_length]
    hidden_states = hidden_states[:, text_seq_length:]
    ca_idx = 0
    for i, block in enumerate(base.transformer_blocks):
        hidden_states, encoder_hidden_states = block(hidden_states=hidden_states,
                                                     encoder_hidden_states=encoder_hidden_states,
                                                     temb=emb, image_rotary_emb=image_rotary_emb)
        if i % interval == 0:
            hidden_states = hidden_states + perceivers[ca_idx](cross, hidden_states)
            ca_idx += 1
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    hidden_states = base.norm_final(hidden_states)[:, text_seq_length:]
    hidden_states = base.proj_out(base.norm_out(hidden_states, temb=emb))
    p = base.config.patch_size
    output = hidden_states.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
    return output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


def test_cross_transformer_equals_transcription_of_the_original():
    """The whole network: perceivers after blocks 0, 2 (of 4), reference without positions."""
    cfg = CONFIGS["tiny"]
    ours = randomize(TrajectoryCrafterTransformer(cfg), seed=5)
    sd = ours.state_dict()
    base = diffusers_twin(cfg)
    base.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("perceiver", "ref_patch"))})
    perceivers = nn.ModuleList(OriginalPerceiver(dim=cfg.inner_dim, dim_head=cfg.cross_attn_dim_head,
                                                 heads=cfg.cross_attn_num_heads, kv_dim=None)
                               for _ in range(cfg.num_perceivers))
    perceivers.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("perceiver")})
    ref_patch = nn.Conv2d(16, cfg.inner_dim, 2, stride=2)
    ref_patch.load_state_dict({"weight": sd["ref_patch_embed.proj.weight"], "bias": sd["ref_patch_embed.proj.bias"]})
    lat, inp, text, t = call_inputs(cfg, seed=6)
    ref = torch.randn(1, 2, 16, 8, 14, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = ours(lat, text, t, inpaint=inp, reference=ours.reference(ref))
        want = original_cross_transformer_forward(base, perceivers, ref_patch, cfg.cross_attn_interval, lat, text,
                                                  t, inp, torch.cat([ref] * 2), original_rope(3, 4, 7, 16))
        without = ours(lat, text, t, inpaint=inp, reference=ours.reference(torch.zeros_like(ref)))
    print("relative error", rel_err(out, want))
    assert rel_err(out, want) < RTOL
    assert rel_err(without, want) > 1e-3  # the reference reaches the output


# --- the CogVideoX VAE: diffusers' AutoencoderKLCogVideoX, loaded by the pack -------------------
VAE_SMALL = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.7)


def test_vae_from_safetensors_encodes_and_decodes_as_the_reference_pipeline(tmp_path):
    """A reduced-width VAE saved as diffusers saves it (a folder with config.json and
    diffusion_pytorch_model.safetensors) loads through the pack's loader and encodes (posterior mode
    x scaling factor, in 4-frame chunks as TrajectoryCrafter's VAE) and decodes as diffusers' model
    does when driven as pipeline_trajectorycrafter.py drives it."""
    from turbo_core.models import cogvideox_vae

    torch.manual_seed(0)
    theirs = AutoencoderKLCogVideoX(**VAE_SMALL).eval()
    theirs.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    theirs.num_sample_frames_batch_size = 4  # TrajectoryCrafter's autoencoder_magvit.py encodes 4 at a time
    ours = cogvideox_vae.load(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    video = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = cogvideox_vae.encode(ours, video)
        z_ref = theirs.encode(video)[0].mode() * theirs.config.scaling_factor
        assert z.shape == (1, 16, 3, 2, 3)
        assert rel_err(z, z_ref) < RTOL
        out = cogvideox_vae.decode(ours, z)
        out_ref = theirs.decode(z_ref / theirs.config.scaling_factor).sample
        assert out.shape == video.shape and rel_err(out, out_ref) < RTOL
        # diffusers' own default chunk (8 frames) gives other latents: the setting is what matches.
        theirs.num_sample_frames_batch_size = 8
        assert rel_err(theirs.encode(video)[0].mode() * 0.7, z_ref) > 1e-3


def test_vae_single_file_under_vae_prefix_without_config(tmp_path):
    """One file of a whole pipeline (keys under `vae.`), no config.json: the widths, depth and
    channels come from the shapes, the rest from CogVideoX 5B's config."""
    from safetensors.torch import save_file

    from turbo_core.models import cogvideox_vae

    theirs = AutoencoderKLCogVideoX(block_out_channels=(32, 32, 64), layers_per_block=2,
                                    down_block_types=("CogVideoXDownBlock3D",) * 3,
                                    up_block_types=("CogVideoXUpBlock3D",) * 3)
    sd = theirs.state_dict()
    save_file({"vae." + k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()} | {"transformer.x": torch.ones(1)},
              str(tmp_path / "pipeline.safetensors"))
    ours = cogvideox_vae.load(str(tmp_path / "pipeline.safetensors"))
    assert ours.config.scaling_factor == 0.7 and list(ours.config.block_out_channels) == [32, 32, 64]
    assert ours.config.layers_per_block == 2 and ours.num_sample_frames_batch_size == 4
    for k, v in ours.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].to(torch.bfloat16).float()), k
