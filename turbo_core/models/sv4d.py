"""SV4D and SV4D 2.0's UNet (Stability AI's `SpatialUNetModelWithTime` with motion attention),
written for the SCM dispatch, so that Turbo4D's accelerators (chain bypass, rolling cache, token
pruning) run on it unchanged.

Plain PyTorch, no ComfyUI import: the core has to run where ComfyUI is absent, e.g. on a bare GPU
benchmark machine or from a script; the ComfyUI nodes only wrap it.

Structure (model_channels 320, channel_mult (1, 2, 4, 4), two res blocks per level): every res block
is a 2D res block followed by a temporal 3D res block (kernel 3x1x1) over the T*V images of a batch
item, blended by `time_mixer`. Sixteen attention layers (input_blocks 1, 2, 4, 5, 7, 8, the middle
block, output_blocks 3..11, numbered 0..15 in that order for the dispatch) each run

1. spatial: `transformer_blocks.0` per image: self-attention over its h*w tokens, cross-attention
   to its frame's CLIP token, feed-forward;
2. camera: `time_mix_blocks.0` over the V views of one (batch, frame, pixel), after adding the view
   embedding `time_mix_time_embed`, cross-attending to the frame's CLIP token; blended into the
   stream by `time_mixer` (x + (1 - a) * (block(x + e) - x), a = sigmoid(mix_factor));
   SV4D 2.0's default `use_3d_attention` groups other tokens, see `sv4d_blocks.CameraAxis`;
3. motion: `motion_blocks.0` over the T frames of one (batch, view, pixel), after adding the frame
   embedding `time_mix_motion_embed`, cross-attending to that pixel of the reference-view latent
   `cond_view` (4 channels, resized bilinearly to the level); blended by `time_mixer_motion`
   (SV4D 2.0) or `time_mixer` (SV4D).

Each sub-attention goes through `SCMDispatch.attend(block, axis, seqs, compute)` and each layer's
whole chain (norm, proj_in, the three sub-blocks, proj_out, residual) through `dispatch.chain`.
What `compute` returns is the sub-block's update of the stream (its output minus its input), so a
cache reuses updates, not activations. Every sequence is independent of the others, and `compute`
gathers each sequence's own context (CLIP token, cond_view pixel, view and frame embeddings) by
`index`, so any subset can be computed. Images are stacked (batch, frame, view), SV4D's own
(b, t, v) order and the layout's, so nothing is reordered. The UNet has four token grids (h*w,
h*w/4, h*w/16, and h*w/64 in the middle), so each level gets its own `SCMLayout` and a view of
the caller's dispatch with that layout.

What the model expects (SV4D's sampler; not implemented here):
- denoiser `VScalingWithEDMcNoise` (ComfyUI's V_PREDICTION_EDM, sigma_data 1):
  c_in = 1/sqrt(s^2+1), c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), and `timesteps` =
  c_noise = 0.25 * ln(s); D(x) = c_skip * x + c_out * F(cat[c_in * x, concat], c_noise, ...).
  EDM discretisation, sigma_max 500 in the configs, rho 7; Euler EDM sampler.
- x: (N = b*T*V, 8, h, w) = 4 noisy latent channels (times c_in) + 4 channels of "concat": the VAE
  latent of the input video's frame t, the same for every view of that frame, as the VAE's encoder
  gives it: not multiplied by the 0.18215 scale factor (SV4D's conditioner encodes with its own
  scale_factor left at 1; only the latents being denoised are scaled).
- context: (b, T, 1024) one OpenCLIP-H image embedding per frame of the input video.
- y: (N, 1280) = [256-d sinusoidal embedding of the conditioning noise (0 in SV4D) | 512-d of the
  view's polar angle (radians) | 512-d of its azimuth (radians)].
- cond_view: (b*V, 4, H', W') VAE latents of the V output views at the chunk's first frame
  (anchor / previous chunk), unscaled like concat; any size, resized per level.
- CFG: the guiders batch [uncond, cond], so b = 2.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import FullCompute, SCMDispatch, Span
from ..layout import SCMLayout
from ..memory import TRANSFORMER_ELEMENTS, MemoryConfig, piece_budget, run_in_pieces, units_per_piece
from ..plain import PlainData
from .io import CheckpointError, read_metadata
from .sv4d_blocks import (AlphaBlender, CameraAxis, Downsample, GroupNorm32, MixBlock, SpatialBlock,
                          Upsample, VideoResBlock, mlp, timestep_embedding)

VERSIONS = ("sv4d", "sv4d2")
PREFIX = "model.diffusion_model."
FORMAT = "turbo4d-sv4d-unet"


@dataclass(frozen=True)
class SV4DConfig(PlainData):
    version: str = "sv4d2"            # "sv4d" | "sv4d2"
    model_channels: int = 320         # override for reduced-width checkpoints (multiple of 32)
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with attention (ds 1, 2, 4); the middle always has one
    head_dim: int = 64
    context_dim: int = 1024           # CLIP image embedding
    motion_context_dim: int = 4       # reference-view latent channels
    in_channels: int = 8
    out_channels: int = 4
    adm_in_channels: int = 1280       # y
    time_kernel: int = 3              # temporal res block kernel (3, 1, 1)
    max_period: float = 10000.0
    # SV4D 2.0's camera reshape (see CameraAxis). None = the version's default: True for SV4D 2.0
    # (sv4d2.yaml), False for SV4D; the SV4D 2.0 8-view model (same keys) needs False.
    use_3d_attention: Optional[bool] = None

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"SV4DConfig.version must be one of {VERSIONS}, got {self.version!r}")
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.use_3d_attention is None:
            object.__setattr__(self, "use_3d_attention", self.version == "sv4d2")
        if self.use_3d_attention and self.version != "sv4d2":
            raise ValueError("use_3d_attention exists only in SV4D 2.0; set version='sv4d2' or use_3d_attention=False")
        mc = self.model_channels
        if mc < 32 or mc % 32:
            raise ValueError(f"SV4DConfig.model_channels must be a positive multiple of 32 (GroupNorm of 32 "
                             f"groups), got {mc}")
        for m in self.channel_mult:
            if (m * mc) % self.head_dim:
                raise ValueError(f"SV4DConfig.head_dim {self.head_dim} does not divide the width {m * mc} of a level; "
                                 f"pick a head_dim that divides {mc}")

    # The camera view embedding of SV4D 2.0 is fed the UNet's time + y embedding (4 * model_channels
    # wide); the original sizes its input by adm_in_channels, which is the same 1280 at full size.
    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def use_camera_emb(self) -> bool:
        return self.version == "sv4d2"

    @property
    def motion_mixer(self) -> str:
        """Name of the motion blend's parameter module."""
        return "time_mixer_motion" if self.version == "sv4d2" else "time_mixer"

    @classmethod
    def reduced(cls, version: str = "sv4d2", model_channels: int = 32, head_dim: int = 16, **kw) -> "SV4DConfig":
        """Same structure and key names at a small width, for tests and CPU smoke runs."""
        return cls(version=version, model_channels=model_channels, head_dim=head_dim, **kw)


class SV4DAttentionLayer(nn.Module):
    """`PostHocSpatialTransformerWithTimeMixingAndMotion` at depth 1, through the dispatch."""

    def __init__(self, cfg: SV4DConfig, ch: int, index: int):
        super().__init__()
        self.index = index
        heads, hd = ch // cfg.head_dim, cfg.head_dim
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)  # not upcast: the original's plain GroupNorm
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([SpatialBlock(ch, heads, hd, cfg.context_dim)])
        self.proj_out = nn.Linear(ch, ch)
        self.time_mix_blocks = nn.ModuleList([MixBlock(ch, heads, hd, cfg.context_dim)])
        self.motion_blocks = nn.ModuleList([MixBlock(ch, heads, hd, cfg.motion_context_dim)])
        self.time_mix_time_embed = mlp(cfg.time_embed_dim if cfg.use_camera_emb else ch, 4 * ch, ch)
        self.time_mix_motion_embed = mlp(ch, 4 * ch, ch)
        self.time_mixer = AlphaBlender()
        if cfg.version == "sv4d2":
            self.time_mixer_motion = AlphaBlender()
        self.motion_mixer_name = cfg.motion_mixer

    def forward(self, x: torch.Tensor, call: "SV4DCall") -> torch.Tensor:
        n, c, hh, ww = x.shape
        level = call.level(hh, ww)
        tokens = x.flatten(2).transpose(1, 2)  # (N, h*w, C), a view
        if level.dispatch.span_of(("tokens", self.index)) is None:
            out = level.dispatch.chain(self.index, tokens, lambda t: self._chain(t, call, level))
            return out.transpose(1, 2).reshape(n, c, hh, ww)
        # A token span (SV4DUNet.token_spans): the stream handed over in units of `group` consecutive
        # tokens (SV4D 2.0's camera pixel groups, whole in every kept unit), with its token form.
        g, t = level.group, hh * ww
        units = tokens.reshape(n, t // g, g * c)

        whole = []  # (units, tokens) of a full pass on the layer's own input

        def chain(u):
            if u is not units:
                return self._chain(u.view(n, t, c), call, level).reshape(n, t // g, g * c)
            # On the layer's own input, and handed on with the plain path's strides where it comes
            # back unchanged: the res block after it computes bit for bit as without token spans.
            y = self._chain(tokens, call, level)
            whole.append((y.reshape(n, t // g, g * c), y))
            return whole[-1][0]

        def part(u, pos):
            return self._tokens(u.view(n, t, c), pos, call, level).view(n, -1, g * c)

        out = level.unit_dispatch.chain(self.index, units, chain, part)
        y = whole[-1][1] if whole and out is whole[-1][0] else out.view(n, t, c)
        return y.transpose(1, 2).reshape(n, c, hh, ww)

    def _tables(self, call: "SV4DCall", ch: int, dtype) -> tuple:
        """Per-frame / per-view tables of one call, gathered per sequence: (spatial cross token,
        camera cross token (b*T, C), view embedding (b*V, C), frame embedding (b*T, C), camera and
        motion blend weights)."""
        sp, cam = self.transformer_blocks[0], self.time_mix_blocks[0]
        return (sp.attn2.single_token(call.clip), cam.attn2.single_token(call.clip),
                self.time_mix_time_embed(call.view_input(ch)), self.time_mix_motion_embed(call.frame_input(ch)),
                1 - self.time_mixer.alpha(dtype), 1 - getattr(self, self.motion_mixer_name).alpha(dtype))

    def _chain(self, tokens: torch.Tensor, call: "SV4DCall", level: "_Level") -> torch.Tensor:
        d, i, lay = level.dispatch, self.index, level.layout
        attn = d.attention
        ch = tokens.shape[-1]
        h = self.proj_in(self.norm(tokens.transpose(1, 2)).transpose(1, 2))
        sp, cam, mot = self.transformer_blocks[0], self.time_mix_blocks[0], self.motion_blocks[0]
        sp_cross, cam_cross, emb_view, emb_frame, keep_cam, keep_mot = self._tables(call, ch, h.dtype)

        def spatial(s, idx):
            rows = level.image_frame if idx is None else level.image_frame[idx]
            return sp(s, sp_cross[rows], attn) - s

        h = h + d.attend(i, "spatial", h, spatial)

        ctx_rows, view_rows = level.camera.rows(h.device)

        def camera(s, idx):
            cr, vr = (ctx_rows, view_rows) if idx is None else (ctx_rows[idx], view_rows[idx])
            return keep_cam * (cam(s + emb_view[vr], cam_cross[cr], attn) - s)

        # The grid paths compute the same on the image-major tokens (no sequence copies): each
        # element's view / frame embedding is its image's, the cross token is per sequence.
        cam_view = level.camera.axis_view

        def camera_grid(x):
            e = emb_view[level.image_view][:, None]
            return keep_cam * (cam.forward_grid(x + e, cam_cross[ctx_rows], cam_view, d.grid_attention(cam_view)) - x)

        h = h + d.attend_grid(i, "camera", h, camera, camera_grid, level.camera.to_axis, level.camera.from_axis)

        frame_rows, pixels = level.motion_frame_rows, level.cond_pixels

        def motion(s, idx):
            fr, px = (frame_rows, pixels) if idx is None else (frame_rows[idx], pixels[idx])
            return keep_mot * (mot(s + emb_frame[fr], mot.attn2.single_token(px), attn) - s)

        def mot_view(t):
            return lay.axis_view(t, "motion")

        def motion_grid(x):
            e = emb_frame[level.image_frame][:, None]
            return keep_mot * (mot.forward_grid(x + e, mot.attn2.single_token(pixels), mot_view,
                                                d.grid_attention(mot_view)) - x)

        h = h + d.attend_grid(i, "motion", h, motion, motion_grid)
        return tokens + self.proj_out(h)

    def _tokens(self, tokens: torch.Tensor, pos: torch.Tensor, call: "SV4DCall", level: "_Level") -> torch.Tensor:
        """The layer's output at the units `pos` ((batch, k) units of level.group consecutive tokens,
        the same in every image of a batch item) as (images, k * group, C). Their camera sequences
        (the V views of a pixel; with SV4D 2.0's pixel groups, the V consecutive pixels of a unit)
        and motion sequences (the T frames of a pixel) are whole, so camera, motion, their
        projections and feed-forwards, spatial's queries, output projection and feed-forward run
        on the kept tokens alone; GroupNorm (its statistics are the image's), proj_in and spatial
        attention's keys and values run on every token."""
        d, lay, g = level.dispatch, level.layout, level.group
        attn = d.attention
        n, t, ch = tokens.shape
        b, views, frames = lay.batch, lay.views, lay.frames
        px = (pos[..., None] * g + torch.arange(g, device=pos.device)).reshape(b, -1)   # (batch, k) tokens
        k = px.shape[1]
        rows = lay.token_rows(px)
        h_all = self.proj_in(self.norm(tokens.transpose(1, 2)).transpose(1, 2))
        sp, cam, mot = self.transformer_blocks[0], self.time_mix_blocks[0], self.motion_blocks[0]
        sp_cross, cam_cross, emb_view, emb_frame, keep_cam, keep_mot = self._tables(call, ch, h_all.dtype)

        def kept(a):
            return a.reshape(n * t, ch).index_select(0, rows).view(n, k, ch)

        h = kept(h_all)
        nx = sp.norm1(h_all)
        h = h + sp.attn1.forward_queries(kept(nx), nx, attn)
        del nx, h_all
        h = h + sp_cross[level.image_frame][:, None].to(h.dtype)
        h = h + sp.ff(sp.norm3(h))

        sub = SCMLayout(b, views, frames, k, 1)
        sub_cam = CameraAxis(sub, level.camera.pixel_groups)
        # Each kept camera sequence's index among the level's (batch, frame, pixel or pixel group),
        # in the kept sequences' order, for its CLIP row: with pixel groups, kept group j * kk + r
        # of a (batch, frame) is the level's group j * t / g + pos[r] (j the view, kk = k / g units).
        if level.camera.pixel_groups:
            local = (torch.arange(views, device=pos.device)[None, :, None] * (t // g) + pos[:, None, :]).reshape(b, -1)
        else:
            local = px
        bt = torch.arange(b * frames, device=pos.device).view(b, frames, 1) * t
        ctx_rows, _ = level.camera.rows(h.device)
        cr = ctx_rows[(bt + local[:, None, :]).reshape(-1)]
        cam_view = sub_cam.axis_view
        e = emb_view[level.image_view][:, None]
        h = h + keep_cam * (cam.forward_grid(h + e, cam_cross[cr], cam_view, d.grid_attention(cam_view)) - h)

        def mot_view(u):
            return sub.axis_view(u, "motion")

        cp = level.cond_pixels.view(b, views, t, -1)
        cp = cp.gather(2, px[:, None, :, None].expand(b, views, k, cp.shape[-1])).reshape(b * views * k, -1)
        e = emb_frame[level.image_frame][:, None]
        h = h + keep_mot * (mot.forward_grid(h + e, mot.attn2.single_token(cp), mot_view,
                                             d.grid_attention(mot_view)) - h)
        return kept(tokens) + self.proj_out(h)


class _Level:
    """Everything one resolution level's layers share in one call: layout, dispatch view,
    camera axis, and the index tables of its sequences."""

    def __init__(self, call: "SV4DCall", hh: int, ww: int):
        b, t, v = call.batch, call.frames, call.views
        self.layout = SCMLayout(b, v, t, hh, ww)
        self.dispatch = _dispatch_at(call.dispatch, self.layout)
        self.camera = CameraAxis(self.layout, call.cfg.use_3d_attention)
        # Token reuse's unit (SV4DUNet.token_group): where it is several tokens, the layers' token
        # spans are handed over on a layout of units.
        self.group = SV4DUNet.token_group(call.cfg, v)
        self.unit_dispatch = self.dispatch
        if self.group > 1 and (hh * ww) % self.group == 0:
            self.unit_dispatch = _dispatch_at(call.dispatch, SCMLayout(b, v, t, hh * ww // self.group, 1))
        dev = call.emb.device
        n = hh * ww
        self.image_frame = torch.arange(b * t * v, device=dev) // v                      # (N,) rows of (b*T)
        img = torch.arange(b * t * v, device=dev)
        self.image_view = img // (t * v) * v + img % v                                   # (N,) rows of (b*V)
        q = torch.arange(b * v * n, device=dev)
        self.motion_frame_rows = (q // (v * n))[:, None] * t + torch.arange(t, device=dev)[None]  # (S, T)
        cv = F.interpolate(call.cond_view.float(), size=(hh, ww), mode="bilinear")
        self.cond_pixels = cv.permute(0, 2, 3, 1).reshape(b * v * n, -1).to(call.dtype)   # rows (b, v, pixel)


def _dispatch_at(d: Optional[SCMDispatch], layout: SCMLayout) -> SCMDispatch:
    """The caller's dispatch (same step, accelerators, stats, backend) with a level's layout."""
    if d is None:
        return FullCompute(layout)
    if d.layout == layout:
        return d
    view = copy.copy(d)
    view.layout = layout
    return view


class SV4DCall:
    """One forward's conditioning, shared by the layers (built by `SV4DUNet.condition`)."""

    def __init__(self, cfg, batch, frames, views, clip, emb, cond_view, dispatch, dtype):
        self.cfg, self.batch, self.frames, self.views = cfg, batch, frames, views
        self.clip, self.emb, self.cond_view, self.dispatch, self.dtype = clip, emb, cond_view, dispatch, dtype
        self._levels, self._view_in, self._frame_in = {}, {}, {}

    def level(self, hh: int, ww: int) -> _Level:
        if (hh, ww) not in self._levels:
            self._levels[(hh, ww)] = _Level(self, hh, ww)
        return self._levels[(hh, ww)]

    def view_input(self, ch: int) -> torch.Tensor:
        """Input of time_mix_time_embed, (b*V, .): SV4D 2.0 feeds the UNet's time + y embedding of
        each view at the first frame; SV4D a sinusoidal embedding of the view index."""
        b, t, v = self.batch, self.frames, self.views
        if self.cfg.use_camera_emb:
            return self.emb.view(b, t, v, -1)[:, 0].reshape(b * v, -1)
        if ch not in self._view_in:
            idx = torch.arange(v, device=self.emb.device).repeat(b)
            self._view_in[ch] = timestep_embedding(idx, ch, self.cfg.max_period).to(self.dtype)
        return self._view_in[ch]

    def frame_input(self, ch: int) -> torch.Tensor:
        """Input of time_mix_motion_embed, (b*T, ch): sinusoidal embedding of the frame index."""
        if ch not in self._frame_in:
            idx = torch.arange(self.frames, device=self.emb.device).repeat(self.batch)
            self._frame_in[ch] = timestep_embedding(idx, ch, self.cfg.max_period).to(self.dtype)
        return self._frame_in[ch]


def _transformer_flops(length: int, width: int, ff_in: bool) -> float:
    """One sequence through a transformer block: self-attention (projections + scores), a
    single-token cross-attention, GEGLU feed-forward(s)."""
    proj = 2 * length * width * width * (4 + 2 + 12 + (12 if ff_in else 0))
    return float(proj + 4 * length * length * width)


class SV4DUNet(nn.Module):
    """F of SV4D / SV4D 2.0. `state_dict()` keys (with PREFIX) and shapes are the checkpoint's."""

    # The presets' variant for this network (turbo_core.accel.presets.model_family).
    preset_family = "sv4d"

    def __init__(self, cfg: SV4DConfig = SV4DConfig()):
        super().__init__()
        self.cfg = cfg
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = mlp(mc, ted, ted)
        self.label_emb = nn.Sequential(mlp(cfg.adm_in_channels, ted, ted))
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        n_attn = 0

        def attention(ch):
            nonlocal n_attn
            n_attn += 1
            return SV4DAttentionLayer(cfg, ch, n_attn - 1)

        def res(ch_in, ch_out):
            return VideoResBlock(ch_in, ted, ch_out, cfg.time_kernel)

        chans, ch = [mc], mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attention(ch))
                self.input_blocks.append(nn.ModuleList(layers))
                chans.append(ch)
            if level != last:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                chans.append(ch)
        self.middle_block = nn.ModuleList([res(ch, ch), attention(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self.n_blocks = n_attn

    @property
    def blocks(self) -> int:
        """Attention layers, i.e. dispatch blocks (16 at the standard structure)."""
        return self.n_blocks

    @property
    def depth(self) -> int:
        return self.n_blocks

    def token_layout(self, n_images: int, views: int, frames: int, height: int, width: int) -> SCMLayout:
        """The layout of the top level (the latent grid), for Turbo4DRun.dispatch."""
        return SCMLayout.from_images(n_images, views, frames, height, width)

    def attention_levels(self) -> list[tuple[int, int]]:
        """(downsampling factor of the latent grid, channel width) of each attention layer, in
        dispatch block order."""
        out, ds = [], 1
        for blk in self.input_blocks:
            for mod in blk:
                if isinstance(mod, Downsample):
                    ds *= 2
                elif isinstance(mod, SV4DAttentionLayer):
                    out.append((ds, mod.proj_in.in_features))
        out += [(ds, mod.proj_in.in_features) for mod in self.middle_block if isinstance(mod, SV4DAttentionLayer)]
        for blk in self.output_blocks:
            for mod in blk:
                if isinstance(mod, SV4DAttentionLayer):
                    out.append((ds, mod.proj_in.in_features))
                elif isinstance(mod, Upsample):
                    ds //= 2
        return out

    def block_work(self, layout: SCMLayout) -> dict:
        """{(block, axis): (sequences, FLOPs per sequence)} of one full-compute call, each
        attention layer at its own level's grid (`layout` is the top level's): what RunStats
        counts a call's work against (Turbo4DRun.dispatch's `work`)."""
        out = {}
        for block, (ds, width) in enumerate(self.attention_levels()):
            lay = SCMLayout(layout.batch, layout.views, layout.frames, layout.height // ds, layout.width // ds)
            for axis in ("spatial", "camera", "motion"):
                n, length = lay.axis_shape(axis)
                out[(block, axis)] = (n, _transformer_flops(length, width, ff_in=axis != "spatial"))
        return out

    def call_work(self, layout: SCMLayout) -> tuple[dict, dict]:
        """(sequences, FLOPs) per axis of one full-compute call, summed over the attention layers,
        each at its own level's grid (`layout` is the top level's)."""
        axes = ("spatial", "camera", "motion")
        seqs, flops = dict.fromkeys(axes, 0), dict.fromkeys(axes, 0.0)
        for (_, axis), (n, per_seq) in self.block_work(layout).items():
            seqs[axis] += n
            flops[axis] += n * per_seq
        return seqs, flops

    def cost(self, layout: SCMLayout) -> dict:
        """FLOPs per sequence of each axis, averaged over the attention layers' grids (RunStats
        counts each layer at its own grid from `block_work`; this only serves readers of its cost)."""
        seqs, flops = self.call_work(layout)
        return {a: flops[a] / max(seqs[a], 1) for a in seqs}

    def activation_bytes(self, images: int, height: int, width: int, element_size: int = 2) -> int:
        """Memory a forward of `images` latents of height x width holds beside the transient work
        of its pieces (turbo_core.memory): the skip connections (every input block's output, kept
        for the output blocks) and a working set of about eight top-level tensors of the model's
        width (the stream, the attention chain's projections, axis copies and sums, a res block's
        concatenated input)."""
        cfg, hw = self.cfg, height * width
        mc = cfg.model_channels
        skip, ds = mc * hw, 1                          # input_blocks.0: the input convolution
        for level, mult in enumerate(cfg.channel_mult):
            skip += cfg.num_res_blocks * mult * mc * hw // (ds * ds)
            if level != len(cfg.channel_mult) - 1:
                ds *= 2
                skip += mult * mc * hw // (ds * ds)    # the downsampled stream
        return int((skip + 8 * mc * hw) * images * element_size)

    def condition(self, x: torch.Tensor, timesteps, context: torch.Tensor, y: torch.Tensor,
                  cond_view: torch.Tensor, views: int, frames: int,
                  dispatch: Optional[SCMDispatch] = None) -> "SV4DCall":
        """Checks the inputs and computes what every layer of one forward shares (see `forward`)."""
        cfg = self.cfg
        n, c, hh, ww = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels; SV4D expects {cfg.in_channels} (4 noisy latent + 4 latent "
                             f"of the input frame)")
        if hh % 8 or ww % 8:
            raise ValueError(f"latent size {hh}x{ww} must be a multiple of 8 (three downsamplings)")
        lay = self.token_layout(n, views, frames, hh, ww)
        b = lay.batch
        if dispatch is not None and (dispatch.layout.batch, dispatch.layout.views, dispatch.layout.frames) != (b, views, frames):
            raise ValueError(f"the dispatch's layout {dispatch.layout} does not match this call's "
                             f"batch={b}, views={views}, frames={frames}; build the dispatch from model.token_layout")
        dtype = self.out[2].weight.dtype
        clip = _frame_context(context, b, frames, views, cfg.context_dim).to(dtype)
        if y is None or tuple(y.shape) != (n, cfg.adm_in_channels):
            raise ValueError(f"y must be ({n}, {cfg.adm_in_channels}) (noise-level + polar + azimuth embeddings "
                             f"per image), got {None if y is None else tuple(y.shape)}")
        if cond_view is None or cond_view.dim() != 4 or cond_view.shape[0] != b * views \
                or cond_view.shape[1] != cfg.motion_context_dim:
            raise ValueError(
                f"cond_view must be (batch*views={b * views}, {cfg.motion_context_dim}, H, W): the latents of the "
                f"{views} views at the chunk's first frame, per batch item; got "
                f"{None if cond_view is None else tuple(cond_view.shape)}")
        t = torch.as_tensor(timesteps, device=x.device).float().reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        if t.numel() != n:
            raise ValueError(f"timesteps must be a scalar or ({n},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype)) + self.label_emb(y.to(dtype))
        return SV4DCall(cfg, b, frames, views, clip, emb, cond_view, dispatch, dtype)

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor, y: torch.Tensor,
                cond_view: torch.Tensor, views: int, frames: int,
                dispatch: Optional[SCMDispatch] = None, memory: Optional[MemoryConfig] = None) -> torch.Tensor:
        """x (N, 8, h, w), N = b*frames*views stacked (b, frame, view); timesteps (N,) or scalar
        c_noise; context (b, frames, 1024) or per image (N, 1, 1024) / (N, 1024); y (N, 1280);
        cond_view (b*views, 4, H', W'). Returns (N, 4, h, w) in the model's dtype.

        `memory` (turbo_core.memory): run the sub-attentions' sequences and the res blocks' batch
        items a piece at a time as the free memory requires, retrying a piece that runs out of
        memory smaller; the result is the same as in one piece."""
        if memory is not None:
            d = dispatch if dispatch is not None else FullCompute(self.token_layout(x.shape[0], views, frames,
                                                                                   *x.shape[-2:]))
            n, _, hh, ww = x.shape
            largest = n * hh * ww * self.cfg.model_channels * TRANSFORMER_ELEMENTS * self.out[2].weight.element_size()
            dispatch = d.in_pieces(memory, x.device, largest)
        if dispatch is not None:
            dispatch = dispatch.with_spans(self.spans(tuple(x.shape)) + self.token_spans(tuple(x.shape), views))
        call = self.condition(x, timesteps, context, y, cond_view, views, frames, dispatch)
        emb, per_item = call.emb, frames * views

        def run(layers, h):
            for m in layers:
                if isinstance(m, VideoResBlock):
                    h = m(h, emb, per_item) if memory is None else _res_block_in_pieces(m, h, emb, per_item, memory)
                elif isinstance(m, SV4DAttentionLayer):
                    h = m(h, call)
                else:
                    h = m(h)
            return h

        # The same blocks in the same order as a flat walk down and up the UNet, grouped into the
        # nested spans (see `spans`): span k takes the stream after input block starts[k-1] and
        # returns it after the output block that consumes that block's skip connection.
        starts, m_in = self._span_starts(), len(self.input_blocks)

        def span_fn(k):
            def fn(x_span):
                a = starts[k - 1]
                h, hs = x_span, [x_span]
                if k < len(starts):
                    b = starts[k]
                    for i in range(a + 1, b + 1):
                        h = run(self.input_blocks[i], h)
                        if i < b:
                            hs.append(h)
                    h = through(k + 1, h)   # its input (input block b's output) is its own skip
                    first = m_in - b
                else:
                    h = run(self.middle_block, h)
                    first = 0
                for j in range(first, m_in - a):
                    h = run(self.output_blocks[j], torch.cat([h, hs.pop()], dim=1))
                return h
            return fn

        def through(k, h):
            return span_fn(k)(h) if dispatch is None else dispatch.span(("unet", k), h, span_fn(k))

        a = starts[0]
        h, hs = x.to(call.dtype), []
        for i in range(a + 1):
            h = run(self.input_blocks[i], h)
            if i < a:
                hs.append(h)
        try:
            h = through(1, h)
        finally:
            # span_fn and through refer to each other: a reference cycle holding this call's
            # conditioning and dispatch until the next garbage collection; unlinked, they go with it.
            through = None
        for j in range(m_in - a, m_in):
            h = run(self.output_blocks[j], torch.cat([h, hs.pop()], dim=1))
        return self.out(h)

    @staticmethod
    def token_group(cfg: SV4DConfig, views: int) -> int:
        """Tokens per unit of token reuse: SV4D 2.0's camera attention (use_3d_attention) runs over
        runs of V consecutive tokens of an image (sv4d_blocks.CameraAxis), which a kept unit must
        hold whole; otherwise one (a camera sequence is one pixel's V views)."""
        return views if cfg.use_3d_attention else 1

    def token_spans(self, x_shape: tuple, views: int) -> list[Span]:
        """The attention layers as token spans (dispatch.Span form "tokens", key ("tokens", block)),
        each on its own stream (images, units, group * width) of its level: the token level's
        units, deepest levels first (the projections and feed-forwards cost about the same per layer
        at every level, and a deeper level's stream is half the size, so its cache saves the most
        per byte). A level whose token count the group does not divide (SV4D 2.0's 9 x 9 middle at
        4 views, where pixel groups straddle views) has none: it runs whole."""
        n, _, hh, ww = x_shape
        g = self.token_group(self.cfg, views)
        out = []
        for block, (ds, width) in enumerate(self.attention_levels()):
            t = (hh // ds) * (ww // ds)
            if t % g == 0:
                out.append((-ds, block, Span(("tokens", block), (block,), 0, (n, t // g, g * width), "tokens")))
        return [s for _, _, s in sorted(out, key=lambda z: z[:2])]

    def _span_starts(self) -> list[int]:
        """For span k = 1 .. levels: the input block whose output is its input (the last res block
        of level k - 1; for the deepest, the last input block)."""
        nrb = self.cfg.num_res_blocks
        return [(k - 1) * (nrb + 1) + nrb for k in range(1, len(self.cfg.channel_mult) + 1)]

    def spans(self, x_shape: Optional[tuple] = None) -> list[Span]:
        """The UNet's spans for block reuse, outermost first: span k ("unet", k) is everything at
        level k and below (the input blocks from level k - 1's downsampling on, the middle block,
        the output blocks down to the one that consumes level k - 1's last skip connection), a
        function of the stream after level k - 1's last input block that returns the stream, of the
        same shape, after that output block. They nest (span k + 1 inside span k), so a reuse of
        span k skips every level below k - 1, and each has a residual of its own level's shape
        (span 1 at the top grid with model_channels channels, span 2 a quarter of its pixels at
        twice the channels: half its size, ...), which is what the accelerator caches. The
        shallowest level (its input blocks and its last output blocks) is never inside a span:
        DeepCache's observation that the high-resolution path is what the output's detail needs.
        `x_shape` (the call's input (N, C, h, w)) gives each span's stream shape."""
        starts, m_in = self._span_starts(), len(self.input_blocks)
        out = []
        for k, a in enumerate(starts, 1):
            mods = ([m for blk in self.input_blocks[a + 1:] for m in blk] + list(self.middle_block)
                    + [m for blk in self.output_blocks[:m_in - a] for m in blk])
            shape = ()
            if x_shape is not None:
                ds = 2 ** (k - 1)
                shape = (x_shape[0], self.cfg.model_channels * self.cfg.channel_mult[k - 1],
                         x_shape[2] // ds, x_shape[3] // ds)
            out.append(Span(("unet", k), tuple(sorted(m.index for m in mods if isinstance(m, SV4DAttentionLayer))),
                            sum(1 for m in mods if not isinstance(m, SV4DAttentionLayer)), shape))
        return out


# Transient activation elements per token of a VideoResBlock, per input and per output channel:
# GroupNorm32 computes in float32 (x.float(), its output: 4 bf16-sized units per input channel,
# then SiLU and the cast), the 2D and temporal halves each allocate several output-sized tensors.
RES_IN_ELEMENTS, RES_OUT_ELEMENTS = 6, 26


def _res_block_in_pieces(m: VideoResBlock, h: torch.Tensor, emb: torch.Tensor, per_item: int,
                         memory: MemoryConfig) -> torch.Tensor:
    """A VideoResBlock a few batch items at a time (its temporal half, GroupNorm included, spans
    all images of one batch item, so a batch item is the smallest independent piece)."""
    items = h.shape[0] // per_item
    c_out = m.emb_layers[1].out_features
    per = per_item * h.shape[2] * h.shape[3] * (RES_IN_ELEMENTS * h.shape[1] + RES_OUT_ELEMENTS * c_out)
    piece = units_per_piece(piece_budget(memory, h.device), per * h.element_size(), items, memory.min_piece)

    def part(a, b):
        return m(h[a * per_item:b * per_item], emb[a * per_item:b * per_item], per_item)

    return run_in_pieces(part, items, piece, "a res block", memory, key=("res", tuple(h.shape)))


def _frame_context(context, b, frames, views, dim) -> torch.Tensor:
    """The per-frame CLIP table (b*frames, dim) from (b, frames, dim) or a per-image tensor."""
    if context is None:
        raise ValueError(f"context (the CLIP image embedding of each input frame, (batch, frames, {dim})) is required")
    n = b * frames * views
    if context.dim() == 3 and tuple(context.shape) == (b, frames, dim):
        return context.reshape(b * frames, dim)
    if context.shape[0] == n and context.shape[-1] == dim and context.numel() == n * dim:
        per_view = context.reshape(b * frames, views, dim)
        if not torch.equal(per_view, per_view[:, :1].expand_as(per_view)):
            raise ValueError("SV4D conditions on one CLIP token per frame, but the per-image context differs "
                             "between the views of a frame; pass (batch, frames, dim) instead")
        return per_view[:, 0]
    raise ValueError(f"context must be (batch={b}, frames={frames}, {dim}) or per image ({n}, 1, {dim}); "
                     f"got {tuple(context.shape)}")


# --- checkpoints ---------------------------------------------------------------------------------
def build_sv4d(cfg: SV4DConfig, device=None) -> SV4DUNet:
    """SV4DUNet on `device`; "meta" builds the full-size model instantly and without memory."""
    with torch.device(device or "cpu"):
        return SV4DUNet(cfg)


def detect_sv4d(keys) -> Optional[str]:
    """"sv4d" / "sv4d2" if the key names are an SV4D UNet's (with or without PREFIX), else None.
    SV4D 2.0 is told by its separate motion blend (`time_mixer_motion`)."""
    motion = mixer2 = False
    for k in keys:
        if ".motion_blocks.0." in k:
            motion = True
        if k.endswith(".time_mixer_motion.mix_factor"):
            mixer2 = True
    if not motion:
        return None
    return "sv4d2" if mixer2 else "sv4d"


def _unet_shapes(shapes: dict) -> dict:
    """The UNet's entries of a checkpoint, without PREFIX: a full SV4D file also holds the
    conditioner and the VAE, which are not the UNet's."""
    if any(k.startswith(PREFIX) for k in shapes):
        return {k[len(PREFIX):]: s for k, s in shapes.items() if k.startswith(PREFIX)}
    return dict(shapes)


def sv4d_config_from_shapes(shapes: dict, use_3d_attention: Optional[bool] = None,
                            head_dim: Optional[int] = None, name: str = "checkpoint") -> SV4DConfig:
    """The config of an SV4D checkpoint from its key names and shapes ({key: shape}); width, context
    sizes and channels are read from the shapes. Raises CheckpointError naming the first missing and
    first unexpected key when the file is not an SV4D / SV4D 2.0 UNet of the standard structure."""
    unet = _unet_shapes(shapes)
    version = detect_sv4d(unet) or "sv4d2"
    base = {"version": version}
    try:
        base["model_channels"] = int(unet["input_blocks.0.0.weight"][0])
        base["in_channels"] = int(unet["input_blocks.0.0.weight"][1])
        base["out_channels"] = int(unet["out.2.weight"][0])
        base["adm_in_channels"] = int(unet["label_emb.0.0.weight"][1])
        base["context_dim"] = int(unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1])
        base["motion_context_dim"] = int(unet["input_blocks.1.1.motion_blocks.0.attn2.to_k.weight"][1])
        base["time_kernel"] = int(unet["input_blocks.1.0.time_mix_blocks.in_layers.2.weight"][2])
    except (KeyError, IndexError, TypeError):
        pass  # not SV4D-shaped: the key comparison below names what is wrong
    if head_dim is None:
        head_dim = 64 if base.get("model_channels", 320) % 64 == 0 else 32
    try:
        cfg = SV4DConfig(head_dim=head_dim, use_3d_attention=use_3d_attention if version == "sv4d2" else False,
                         **base)
    except ValueError as e:
        raise CheckpointError(f"{name}: its shapes give an SV4D config that cannot be built ({e})") from e
    expected = {k[len(PREFIX):]: tuple(v.shape) for k, v in sv4d_state_shapes(cfg).items()}
    missing = [k for k in expected if k not in unet]
    unexpected = [k for k in unet if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{name} is not an SV4D / SV4D 2.0 UNet: {len(missing)} keys missing (first: "
            f"{PREFIX + missing[0] if missing else None!r}), {len(unexpected)} unexpected (first: "
            f"{PREFIX + unexpected[0] if unexpected else None!r}). Pick sv4d.safetensors or sv4d2.safetensors "
            f"(or a UNet saved from one), or use the loader for this model's own family.")
    for k, shape in expected.items():
        if tuple(unet[k]) != shape:
            raise CheckpointError(f"{name}: {PREFIX + k} has shape {tuple(unet[k])}, expected {shape} for an "
                                  f"{version} UNet of width {cfg.model_channels}; the file is damaged or of another model")
    return cfg


def sv4d_state_shapes(cfg: SV4DConfig) -> dict:
    """{PREFIX + key: meta tensor} of the UNet for `cfg`, built without memory."""
    return {PREFIX + k: v for k, v in build_sv4d(cfg, "meta").state_dict().items()}


def save_sv4d(net: SV4DUNet, path: str, dtype: Optional[torch.dtype] = None) -> None:
    """The UNet under PREFIX, as in SV4D's own checkpoints, with its config in the metadata."""
    from safetensors.torch import save_file

    sd = {PREFIX + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in net.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={"format": FORMAT, "config": json.dumps(net.cfg.to_dict())})


# The loader's `variant` choice. SV4D and SV4D 2.0 differ in their tensors (SV4D 2.0 has
# `time_mixer_motion`); SV4D 2.0's 8-view model has exactly SV4D 2.0's tensors, names and shapes
# (sv4d2.yaml and sv4d2_8views.yaml differ in use_3d_attention only, a reshape without weights), so
# no tensor tells the two apart: "auto" reads a Turbo4D file's stored config, else the file name.
LOADER_VARIANTS = ("auto", "sv4d", "sv4d2", "sv4d2_8views")
_VERSION_OF = {"sv4d": "sv4d", "sv4d2": "sv4d2", "sv4d2_8views": "sv4d2"}
_TITLES = {"sv4d": "SV4D", "sv4d2": "SV4D 2.0 (4 views)", "sv4d2_8views": "SV4D 2.0 8-view"}


def is_8view_name(name: str) -> bool:
    """Whether a file name says SV4D 2.0's 8-view model (sv4d2_8views.safetensors, "8view" in it)."""
    return "8view" in name.replace("_", "").replace("-", "").lower()


def resolve_variant(variant: str, version: Optional[str], stored_3d: Optional[bool],
                    name: str) -> tuple[Optional[bool], str]:
    """(use_3d_attention, how the variant was decided) for a file whose tensors say `version`
    ("sv4d" / "sv4d2", None when not SV4D: the key check names what is wrong), whose Turbo4D
    metadata stores `stored_3d` (None without), named `name`. Raises CheckpointError when the chosen
    variant contradicts the tensors or the stored config, ValueError for an unknown choice."""
    if variant not in LOADER_VARIANTS:
        raise ValueError(f"variant={variant!r}: pick one of {list(LOADER_VARIANTS)}")
    if version is None:
        return None, ""
    if variant != "auto" and _VERSION_OF[variant] != version:
        told = ("SV4D 2.0 (it has time_mixer_motion tensors)" if version == "sv4d2"
                else "SV4D (it has no time_mixer_motion tensors, which SV4D 2.0 has)")
        fits = "'auto', 'sv4d2' or 'sv4d2_8views'" if version == "sv4d2" else "'auto' or 'sv4d'"
        raise CheckpointError(f"{name}: variant={variant!r} asks for {_TITLES[variant]}, but the file's tensors are "
                              f"{told}. Set variant to {fits}, or pick a {_TITLES[variant]} file.")
    if version == "sv4d":
        return False, "SV4D, by its tensors"
    if variant != "auto":
        use_3d = variant == "sv4d2"
        if stored_3d is not None and bool(stored_3d) != use_3d:
            saved = "sv4d2" if stored_3d else "sv4d2_8views"
            raise CheckpointError(f"{name}: variant={variant!r}, but the file was saved by Turbo4D as {saved!r} (its "
                                  f"metadata stores use_3d_attention={bool(stored_3d)}). Set variant to 'auto' or "
                                  f"{saved!r}.")
        how = f"{_TITLES[variant]}, by the variant choice"
        if is_8view_name(name) != (variant == "sv4d2_8views"):
            how += f" (the file name suggests {_TITLES['sv4d2' if use_3d else 'sv4d2_8views']}; the choice wins)"
        return use_3d, how
    if stored_3d is not None:
        return bool(stored_3d), f"{_TITLES['sv4d2' if stored_3d else 'sv4d2_8views']}, by the file's Turbo4D metadata"
    if is_8view_name(name):
        return False, "SV4D 2.0 8-view, by the file name ('8view' in it)"
    return True, ("SV4D 2.0 (4 views), by the file name: the 8-view model has the same tensors, so if this file is "
                  "sv4d2_8views renamed, set the loader's variant to sv4d2_8views")


def _read_header(path: str) -> tuple[dict, Optional[int], Optional[bool]]:
    """({key: shape}, stored head_dim, stored use_3d_attention) of a safetensors file, from its
    header alone (no tensor is read)."""
    from safetensors import safe_open

    meta = read_metadata(path)  # refuses pickles and unreadable files with a clear message
    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    head_dim, stored_3d = None, None
    if meta.get("format") == FORMAT and "config" in meta:
        try:
            stored = json.loads(meta["config"])
            head_dim, stored_3d = stored.get("head_dim"), stored.get("use_3d_attention")
        except ValueError:
            pass
    return shapes, head_dim, stored_3d


def sv4d_variant_note(path: str, variant: str = "auto") -> str:
    """How `variant` resolves for the file at `path` (for the log): "SV4D 2.0 8-view, by ..."."""
    shapes, _, stored_3d = _read_header(path)
    return resolve_variant(variant, detect_sv4d(_unet_shapes(shapes)), stored_3d, os.path.basename(path))[1]


def read_sv4d_config(path: str, use_3d_attention: Optional[bool] = None, variant: str = "auto") -> SV4DConfig:
    """Config of an SV4D safetensors file from its header alone (no tensor is read). The camera
    mode of SV4D 2.0 is `use_3d_attention` when given, else the loader's `variant` choice
    (resolve_variant: "auto" = the stored Turbo4D config, else the file name)."""
    shapes, head_dim, stored_3d = _read_header(path)
    name = os.path.basename(path)
    version = detect_sv4d(_unet_shapes(shapes))
    chosen, _how = resolve_variant(variant, version, stored_3d, name)
    if use_3d_attention is None:
        use_3d_attention = chosen
    return sv4d_config_from_shapes(shapes, use_3d_attention=use_3d_attention, head_dim=head_dim, name=name)


def load_sv4d(path: str, device="cpu", dtype: Optional[torch.dtype] = None,
              use_3d_attention: Optional[bool] = None, variant: str = "auto") -> SV4DUNet:
    """An SV4D or SV4D 2.0 UNet from a .safetensors file: the full Stability checkpoint (only the
    `model.diffusion_model.` tensors are read) or a UNet saved by `save_sv4d`. The version comes from
    the keys and the width from the shapes. SV4D 2.0's 8-view model has SV4D 2.0's keys but no
    pixel-group camera reshape: pass variant="sv4d2_8views" (or use_3d_attention=False); with
    "auto" it is recognised by "8view" in the file name."""
    from safetensors import safe_open

    cfg = read_sv4d_config(path, use_3d_attention, variant)
    name = os.path.basename(path)
    with torch.device("meta"):
        net = SV4DUNet(cfg)
    target = dtype or torch.float32
    sd = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            prefixed = any(k.startswith(PREFIX) for k in keys)
            for k in net.state_dict():
                t = f.get_tensor(PREFIX + k if prefixed else k)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise CheckpointError(f"{name}: tensor {PREFIX + k} holds NaN or Inf values; the file is damaged.")
                sd[k] = t.to(device=device, dtype=target)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{name} is truncated or corrupt ({e}); download it again.") from e
    net.load_state_dict(sd, assign=True)
    return net.eval()


def parameter_count(cfg: SV4DConfig) -> int:
    return sum(t.numel() for t in build_sv4d(cfg, "meta").parameters())
