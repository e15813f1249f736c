"""The reference 4D network in the SV4D mould, in pixel space.

Each block adds the noise-level embedding, then runs spatial self-attention (inside each image),
camera attention (across the V views, with a per-view camera embedding), motion attention (across
the F frames, with a per-frame embedding), each with its residual, then the MLP. The reference
view's frame is concatenated to every image's input channels, as SV4D concatenates the input
frame's latent.

The network is the raw F_theta of EDM: it receives c_in * x (plus the condition channels) and
c_noise = log(sigma) / 4, and predicts what `diffusion.EDM` turns into the denoised image. That is
the contract ComfyUI's `ModelType.EDM` uses as well, so the same weights sample the same in both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import FullCompute, SCMDispatch
from ..kernels import token_fuse
from ..layout import SCMLayout
from ..plain import PlainData


@dataclass(frozen=True)
class SCMNetConfig(PlainData):
    image_size: int = 32       # pixels, square
    patch_size: int = 2        # pixels per token side
    out_channels: int = 3      # the denoised image
    cond_channels: int = 3     # the reference view's frame, concatenated
    width: int = 192
    depth: int = 8
    heads: int = 6
    mlp_ratio: float = 4.0
    max_views: int = 8
    max_frames: int = 16
    sigma_data: float = 0.5    # EDM's data scale; pixels in [-1, 1]

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    @property
    def in_channels(self) -> int:
        return self.out_channels + self.cond_channels

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


CONFIGS = {
    # The embedded default: 6.5 M parameters, 13 MB in fp16 (under the 16 MB limit for embedded
    # weights), a CPU workflow in seconds, and its training state in 16 bits (`train --compact`)
    # fits one transfer between machines. Width 192 beat the earlier width-128 default at equal GPU
    # time (MODEL_CARD.md).
    "default": SCMNetConfig(),
    # The default's network at a realistic token count per image: 64 x 64 px, patch 2 = 32 x 32
    # tokens (4x the default's), so the per-call levels are measured where spatial attention and
    # the token count weigh as they do in production models. 13 MB in fp16 like the default.
    "px64": SCMNetConfig(image_size=64),
    # A toy for tests.
    "tiny": SCMNetConfig(image_size=16, patch_size=2, width=32, depth=2, heads=2),
    # Production scale for benchmarks: 72 x 72 tokens per image at width 320 (SV4D 2.0's top level).
    "large": SCMNetConfig(image_size=144, patch_size=2, width=320, depth=8, heads=5, max_views=16, max_frames=24),
}


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    a = x.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=-1)


class AxisAttention(nn.Module):
    """Pre-norm multi-head self-attention over (sequences, length, channels)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight)  # each block starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, seqs: torch.Tensor, attention) -> torch.Tensor:
        s, l, c = seqs.shape
        qkv = self.qkv(token_fuse.add_layernorm(seqs, None, self.norm)).view(s, l, 3, self.heads, c // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        o = attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o.transpose(1, 2).reshape(s, l, c))

    def forward_queries(self, x: torch.Tensor, rows: torch.Tensor, attention, normed: bool = False) -> torch.Tensor:
        """`forward` for the queries at `rows` of the flattened x (S * L, c) only, against the keys
        and values of every token of x (S, L, c): the kept tokens of token-level reuse attend to
        all of their image. The norm runs once per token, the projections split, so no query of an
        unkept token is computed. Returns (S, k, c), k = rows per sequence. `normed`: x is already
        self.norm's output (token_fuse.add_layernorm)."""
        s, l, c = x.shape
        hd = c // self.heads
        w, b = self.qkv.weight, self.qkv.bias
        nx = x if normed else token_fuse.add_layernorm(x, None, self.norm)
        nq = nx.reshape(s * l, c).index_select(0, rows).view(s, -1, c)
        k = nq.shape[1]
        q = F.linear(nq, w[:c], b[:c]).view(s, k, self.heads, hd).transpose(1, 2)
        kv = F.linear(nx, w[c:], b[c:]).view(s, l, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        o = attention(q, kv[0], kv[1])
        return self.proj(o.transpose(1, 2).reshape(s, k, c))

    def forward_grid(self, x: torch.Tensor, attend, normed: bool = False) -> torch.Tensor:
        """The same on image-major tokens (N, n, channels) where they lie; `attend(q, k, v, heads)`
        (a dispatch's `grid_attention`) lays the sequences over them. `normed`: x is already
        self.norm's output."""
        q, k, v = self.qkv(x if normed else token_fuse.add_layernorm(x, None, self.norm)).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x, normed: bool = False):
        return self.fc2(self.act(self.fc1(x if normed else token_fuse.add_layernorm(x, None, self.norm))))


class SCMBlock(nn.Module):
    def __init__(self, cfg: SCMNetConfig, index: int):
        super().__init__()
        self.index = index
        w = cfg.width
        self.time = nn.Linear(w, w)
        self.spatial = AxisAttention(w, cfg.heads)
        self.camera = AxisAttention(w, cfg.heads)
        self.motion = AxisAttention(w, cfg.heads)
        self.mlp = MLP(w, cfg.mlp_ratio)

    def forward(self, x, temb, cam, frm, layout: SCMLayout, d: SCMDispatch):
        i, attn = self.index, d.attention

        def cam_view(t):
            return layout.axis_view(t, "camera")

        def mot_view(t):
            return layout.axis_view(t, "motion")

        def chain(h):
            h = h + self.time(temb)[:, None]
            h = h + d.attend(i, "spatial", h, lambda s, idx: self.spatial(s, attn))
            h = h + d.attend_grid(i, "camera", h + cam[:, None], lambda s, idx: self.camera(s, attn),
                                  lambda x: self.camera.forward_grid(x, d.grid_attention(cam_view)))
            h = h + d.attend_grid(i, "motion", h + frm[:, None], lambda s, idx: self.motion(s, attn),
                                  lambda x: self.motion.forward_grid(x, d.grid_attention(mot_view)))
            return h + self.mlp(h)

        def tokens(x, pos):
            return self.forward_tokens(x, pos, temb, cam, frm, layout, d)

        return d.chain(i, x, chain, tokens, stream=True)  # blocks feed each other the stream

    def forward_tokens(self, x, pos, temb, cam, frm, layout: SCMLayout, d: SCMDispatch) -> torch.Tensor:
        """The block's output at token positions pos ((batch, k), the same in every image of a
        batch item), as (images, k, channels). Camera and motion sequences are whole at those
        positions (every view, every frame), so they and the MLP run on the kept tokens alone;
        spatial attention runs the kept queries against the keys and values of all of x.

        Each norm and the embedding added before it are one pass (token_fuse.add_layernorm: a
        Triton kernel on a GPU, the same add and LayerNorm module elsewhere); the noise-level
        embedding is added to the kept tokens alone, the norm reads x with it added on the fly."""
        n, t, c = x.shape
        k = pos.shape[1]
        rows = layout.token_rows(pos)
        tproj = self.time(temb)
        nx = token_fuse.add_layernorm(x, tproj, self.spatial.norm)      # keys and values read every token
        h = x.reshape(n * t, c).index_select(0, rows).view(n, k, c) + tproj[:, None]
        h = h + self.spatial.forward_queries(nx, rows, d.attention, normed=True)
        sub = SCMLayout(layout.batch, layout.views, layout.frames, k, 1)

        def cam_view(u):
            return sub.axis_view(u, "camera")

        def mot_view(u):
            return sub.axis_view(u, "motion")

        h = h + self.camera.forward_grid(token_fuse.add_layernorm(h, cam, self.camera.norm),
                                         d.grid_attention(cam_view), normed=True)
        h = h + self.motion.forward_grid(token_fuse.add_layernorm(h, frm, self.motion.norm),
                                         d.grid_attention(mot_view), normed=True)
        return h + self.mlp(token_fuse.add_layernorm(h, None, self.mlp.norm), normed=True)


class SCMNet(nn.Module):
    """F_theta of EDM for a V x F grid. Inputs are stacked frame-major (batch, frame, view)."""

    def __init__(self, cfg: SCMNetConfig = SCMNetConfig()):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.patch = nn.Conv2d(cfg.in_channels, w, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, w) * 0.02)
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        # Camera: (sin, cos) of azimuth and elevation, and of twice the azimuth, so that nearby
        # views get nearby embeddings on the whole circle.
        self.camera_embed = nn.Sequential(nn.Linear(6, w), nn.SiLU(), nn.Linear(w, w))
        self.frame_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(SCMBlock(cfg, i) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, p * p * cfg.out_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def depth(self) -> int:
        return self.cfg.depth

    def token_layout(self, n_images: int, views: int, frames: int) -> SCMLayout:
        if views > self.cfg.max_views or frames > self.cfg.max_frames:
            raise ValueError(
                f"this model supports at most {self.cfg.max_views} views and {self.cfg.max_frames} frames; "
                f"got views={views}, frames={frames}. Lower V or F, or sample in chunks.")
        g = self.cfg.grid
        return SCMLayout.from_images(n_images, views, frames, g, g)

    def cost(self, layout: SCMLayout) -> dict:
        """FLOPs per sequence of each axis, and of one image's MLP + time projection."""
        w, r = self.cfg.width, self.cfg.mlp_ratio

        def attn(length):  # qkv + out projections, plus q k^T and weights @ v
            return 2 * length * 4 * w * w + 4 * length * length * w

        n = layout.tokens
        return {"spatial": attn(n), "camera": attn(layout.views), "motion": attn(layout.frames),
                "mlp": 2 * n * 2 * w * int(w * r)}

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, camera: torch.Tensor, views: int, frames: int,
                frame_index: Optional[torch.Tensor] = None, dispatch: Optional[SCMDispatch] = None,
                layout: Optional[SCMLayout] = None) -> torch.Tensor:
        """x: (N, out+cond channels, H, W) with N = batch*frames*views stacked frame-major;
        c_noise: (N,) or scalar; camera: (N, 2) [azimuth, elevation] radians;
        frame_index: (N,) position of each image's frame in the video (default 0..F-1)."""
        cfg = self.cfg
        n, ch, hh, ww = x.shape
        if ch != cfg.in_channels or hh != cfg.image_size or ww != cfg.image_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: it expects "
                f"(N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) "
                f"({cfg.out_channels} noisy + {cfg.cond_channels} reference-frame channels)")
        layout = layout or self.token_layout(n, views, frames)
        d = dispatch if dispatch is not None else FullCompute(layout)
        dtype = self.patch.weight.dtype
        # Contiguous, token-major: the patch embedding's transpose would otherwise carry channel-first
        # strides through every residual sum, and each LayerNorm and Linear would copy the stream.
        h = self.patch(x.to(dtype)).flatten(2).transpose(1, 2).contiguous() + self.pos.to(dtype)
        c_noise = torch.as_tensor(c_noise, device=x.device).float().reshape(-1).expand(n)
        temb = self.time_embed(sinusoidal(c_noise * 250.0, cfg.width).to(dtype))
        az, el = camera[:, 0].float(), camera[:, 1].float()
        cam_feat = torch.stack([az.sin(), az.cos(), el.sin(), el.cos(), (2 * az).sin(), (2 * az).cos()], -1)
        cam = self.camera_embed(cam_feat.to(dtype))
        if frame_index is None:
            frame_index = layout.frame_index(device=x.device)
        frm = self.frame_embed(sinusoidal(frame_index.float(), cfg.width, max_period=100.0).to(dtype))
        h = h + cam[:, None] + frm[:, None]
        for blk in self.blocks:
            h = blk(h, temb, cam, frm, layout, d)
        h = self.out(token_fuse.add_layernorm(h, None, self.norm_out))
        p, g = cfg.patch_size, cfg.grid
        h = h.view(n, g, g, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(n, cfg.out_channels, cfg.image_size, cfg.image_size)
