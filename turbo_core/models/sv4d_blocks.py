"""The parts SV4D's UNet is built from, named so that their parameters get the original
checkpoint's key names (`in_layers.2`, `attn1.to_q`, `ff.net.0.proj`, `time_mixer.mix_factor`, ...).

Plain PyTorch: this module, like all of `turbo_core`, must import without ComfyUI, so that the
model runs on a bare GPU benchmark machine and in scripts.

Cross-attention in SV4D always attends to exactly one context token (a frame's CLIP embedding, or
one pixel of the reference view's latent). Softmax over one key is exactly 1, so the output is the
projected value of that token, whatever the query: `to_out(to_v(context))`. The blocks use that
identity (`CrossAttention.single_token`) instead of running an attention kernel over a length-1
key; `to_q`, `to_k` and the `norm2` before them keep their checkpoint weights but cannot change the
result. tests/test_sv4d.py checks the identity against a full softmax attention.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import SCMLayout

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first then sines (SV4D's order), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """The res blocks' and output's GroupNorm, computed in float32 as the original does."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear, SiLU, Linear: keys `.0` and `.2`."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


# --- attention blocks ---------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Identity())  # .1 was a Dropout

    def forward(self, x: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Self-attention over the sequences (S, L, dim)."""
        s, l, _ = x.shape
        q, k, v = (p(x).view(s, l, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        o = attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(s, l, -1))

    def forward_queries(self, xq: torch.Tensor, xkv: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Self-attention of the queries xq (S, k, dim) against the keys and values of xkv (S, L, dim),
        the sequences xq's tokens belong to: token reuse's kept tokens attending to all of their image."""
        s, k, _ = xq.shape
        q = self.to_q(xq).view(s, k, self.heads, -1).transpose(1, 2)
        kk, v = (p(xkv).view(s, xkv.shape[1], self.heads, -1).transpose(1, 2) for p in (self.to_k, self.to_v))
        o = attention(q, kk, v)
        return self.to_out(o.transpose(1, 2).reshape(s, k, -1))

    def forward_grid(self, x: torch.Tensor, attend) -> torch.Tensor:
        """The same on image-major tokens (N, n, dim) where they lie: projections per token, and
        `attend(q, k, v, heads)` (a dispatch's `grid_attention`) lays the sequences over them."""
        return self.to_out(attend(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))

    def single_token(self, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention output for a one-token context (R, context_dim) -> (R, dim): the same
        for every query of the sequence (softmax over one key is 1)."""
        return self.to_out(self.to_v(context))


class GEGLU(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, 2 * d_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x inner width: keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class SpatialBlock(nn.Module):
    """`transformer_blocks.0`: self-attention over one image's tokens, cross-attention to the
    image's frame CLIP token, feed-forward; pre-norm, residual each."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        # Registration order = the checkpoint's key order.
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cross: torch.Tensor, attention: Attention) -> torch.Tensor:
        """x (S, L, dim); cross (S, dim) = attn2.single_token of each sequence's context."""
        x = x + self.attn1(self.norm1(x), attention)
        x = x + cross[:, None].to(x.dtype)
        return x + self.ff(self.norm3(x))


class MixBlock(nn.Module):
    """`time_mix_blocks.0` (camera) and `motion_blocks.0` (motion): feed-forward in, self-attention
    along the sequence, cross-attention to one context token, feed-forward; residual each."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cross: torch.Tensor, attention: Attention) -> torch.Tensor:
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x), attention)
        x = x + cross[:, None].to(x.dtype)
        return x + self.ff(self.norm3(x))

    def forward_grid(self, x: torch.Tensor, cross: torch.Tensor, view, attend) -> torch.Tensor:
        """`forward` on image-major tokens (N, n, dim), no sequence copy: `view` lays the
        sequences over them as (G, L, R, dim), `cross` holds one row per sequence in (g, r) order
        (the sequence path's order), `attend` is the dispatch's `grid_attention(view)`."""
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1.forward_grid(self.norm1(x), attend)
        xv = view(x)
        g, _, r, c = xv.shape
        xv += cross.view(g, 1, r, c).to(x.dtype)  # x is this block's own tensor: in place is safe
        return x + self.ff(self.norm3(x))


class AlphaBlender(nn.Module):
    """`mix_factor`: out = a * x_spatial + (1 - a) * x_temporal with a = sigmoid(mix_factor).
    (SV4D's image_only_indicator is always zeroed inside these layers, so a never becomes 1.)"""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def alpha(self, dtype) -> torch.Tensor:
        return torch.sigmoid(self.mix_factor.float()).to(dtype)


# --- res blocks -------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """2D (kernel 3x3) or temporal 3D (kernel 3x1x1) res block; keys in_layers.{0,2},
    emb_layers.1, out_layers.{0,3}, skip_connection."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, temporal: bool = False, kernel_t: int = 3):
        super().__init__()
        conv, k, pad = ((nn.Conv3d, (kernel_t, 1, 1), (kernel_t // 2, 0, 0)) if temporal else (nn.Conv2d, 3, 1))
        self.temporal = temporal
        self.in_layers = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), conv(ch, out_ch, k, padding=pad))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_ch), nn.SiLU(), nn.Identity(),
                                        conv(out_ch, out_ch, k, padding=pad))
        self.skip_connection = nn.Identity() if out_ch == ch else conv(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """2D: x (N, C, h, w), emb (N, E). 3D: x (B, C, L, h, w), emb (B, L, E)."""
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)
        e = e.permute(0, 2, 1)[..., None, None] if self.temporal else e[..., None, None]
        return self.skip_connection(x) + self.out_layers(h + e)


class VideoResBlock(ResBlock):
    """2D res block, then a temporal 3D res block over the image sequence of each batch item,
    blended by `time_mixer`. The temporal axis is all frames x views of a batch item in their
    stacked (t, v) order, as SV4D passes num_video_frames = T * V: the 3-tap kernel mixes
    neighbouring views of a frame, and the last view of a frame with the first of the next."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, kernel_t: int = 3):
        super().__init__(ch, emb_dim, out_ch)
        self.time_mix_blocks = ResBlock(out_ch, emb_dim, out_ch, temporal=True, kernel_t=kernel_t)
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, images_per_item: int) -> torch.Tensor:
        h = super().forward(x, emb)
        n, c, hh, ww = h.shape
        b = n // images_per_item
        s = h.view(b, images_per_item, c, hh, ww).transpose(1, 2)               # (b, C, T*V, h, w)
        t = self.time_mix_blocks(s, emb.view(b, images_per_item, -1))
        a = self.time_mixer.alpha(h.dtype)
        return (a * s + (1 - a) * t).transpose(1, 2).reshape(n, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# --- camera axis --------------------------------------------------------------------------------
class CameraAxis:
    """The camera sub-attention's sequences at one resolution level, and which context token and
    which view-embedding row each of their elements takes.

    `pixel_groups=False` (SV4D, SV4D 2.0 8-view): the layout's camera axis, one sequence per
    (batch, frame, pixel) over the V views, context = that frame's CLIP token.

    `pixel_groups=True` (SV4D 2.0's default `use_3d_attention`): what SV4D 2.0's code really
    computes. It lays the tokens out as rows (batch, view, pixel) with the T frames along each row,
    then the transformer block regroups rows in runs of V consecutive rows. So each sequence is V
    *consecutive pixels of one view's image* at one frame (pixels g*V .. g*V+V-1 of the
    (view, pixel) flattening, which straddles two views when h*w is not a multiple of V, e.g. the
    9 x 9 middle block with 4 views), not the V views of one pixel. Each element keeps the view
    embedding of its own view; each sequence's CLIP token is row (g*T + frame) // (h*w) of the
    (batch, frame) table, where g is its group within the batch item: the context rows follow the
    original's (batch, frame, pixel) ordering while the sequences are (batch, group, frame). We
    order the sequences (batch, frame, group), so that the layout's frame grouping of camera
    sequences (rolling refresh) still holds; results do not depend on the order.
    """

    def __init__(self, layout: SCMLayout, pixel_groups: bool):
        self.layout = layout
        self.pixel_groups = pixel_groups
        self._rows = {}

    def to_axis(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if not self.pixel_groups:
            return lay.to_axis(x, "camera")
        b, t, v, n = lay.batch, lay.frames, lay.views, lay.tokens
        c = x.shape[-1]
        g = x.view(b, t, v, n, c).permute(0, 2, 3, 1, 4).reshape(b, v * n, t, c)  # rows (view, pixel)
        g = g.view(b, n, v, t, c).permute(0, 3, 1, 2, 4)                           # runs of V rows
        return g.reshape(b * t * n, v, c)

    def from_axis(self, s: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if not self.pixel_groups:
            return lay.from_axis(s, "camera")
        b, t, v, n = lay.batch, lay.frames, lay.views, lay.tokens
        c = s.shape[-1]
        g = s.view(b, t, n, v, c).permute(0, 2, 3, 1, 4).reshape(b, v, n, t, c)
        return g.permute(0, 3, 1, 2, 4).reshape(b * t * v, n, c)

    def axis_view(self, x: torch.Tensor) -> torch.Tensor:
        """The camera sequences of image-major tokens (N, h*w, c) as a strided (G, V, R, c) view,
        no copy, in `to_axis`'s sequence order (see SCMLayout.axis_view). With pixel groups each
        sequence is V consecutive tokens of a (batch, frame)'s (view, pixel) flattening."""
        lay = self.layout
        if not self.pixel_groups:
            return lay.axis_view(x, "camera")
        lay._grid(x)
        b, t, v, n, c = lay.batch, lay.frames, lay.views, lay.tokens, x.shape[-1]
        return x.view(b * t, n, v, c).transpose(1, 2)

    def rows(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(context_rows (S,), view_rows (S, V)): for each sequence, its row of the (batch*frames)
        context table; for each element, its row of the (batch*views) view-embedding table."""
        key = str(device)
        if key not in self._rows:
            lay = self.layout
            b, t, v, n = lay.batch, lay.frames, lay.views, lay.tokens
            q = torch.arange(b * t * n, device=device)
            batch = q // (t * n)
            j = torch.arange(v, device=device)
            if not self.pixel_groups:
                ctx = q // n
                view = batch[:, None] * v + j[None]
            else:
                frame, group = (q // n) % t, q % n
                ctx = batch * t + (group * t + frame) // n
                view = batch[:, None] * v + (group[:, None] * v + j[None]) // n
            self._rows[key] = (ctx, view)
        return self._rows[key]
