"""TrajectoryCrafter's transformer (`CrossTransformer3DModel`): the CogVideoX-Fun 5B InP DiT plus
the Ref-DiT perceiver cross-attention to the source video, with every attention through the
dispatch.

Plain PyTorch, no ComfyUI or diffusers import; parameter names are the checkpoint's (diffusers
layout), so its files load as they are.

Per call (49 frames at 384 x 672, CFG batch 2): 226 T5 tokens + 13 latent frames x 24 x 42
patches = 13,330 tokens in 42 blocks. Each block:

1. `norm1`: one LayerNorm over all tokens, modulated (shift, scale) per batch item from the time
   embedding, with separate modulations for the text and the video tokens (CogVideoX's
   LayerNormZero);
2. `attn1`, the **joint** axis: one self-attention over text + video tokens, q/k LayerNorm per
   head (over the 64 channels of each head), 3D RoPE on the video tokens only; the outputs are
   added back gated, text and video gates apart;
3. `norm2` and `ff` (GELU-tanh, 4x) on the joint tokens, gated the same way;
4. after blocks 0, 2, ..., 40: a `PerceiverCrossAttention`, the **perceiver** axis: the video
   tokens (after its own LayerNorm `norm2`) attend to the reference tokens (the first source
   frames' VAE latents through `ref_patch_embed`, after `norm1`), 16 heads x 128, no biases; its
   output is added to the video tokens.

The reference keys/values depend only on the reference latents and the weights, so
`TrajectoryCrafterTransformer.reference()` computes them once per run (`PerceiverReference`) and
every step and both CFG halves read them.

The dispatch sees each block's whole update as a chain (`dispatch.chain`) and its two attentions as
the axes of `layout.JointLayout`: "joint" (one sequence per batch item, text + video tokens) and
"perceiver" (one sequence per batch item, its video tokens as queries). `compute` returns the
attention's output before the gate (joint) or the perceiver's update (perceiver).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import FullCompute, SCMDispatch
from ..layout import JointLayout
from .diffusers_files import load_tensors, read_config, read_shapes, strip_prefix, weight_files
from .io import CheckpointError

# How the RoPE positions of a token grid that is not the base grid are placed inside it.
# "diffusers": diffusers >= 0.32 (torch.linspace(start, stop * (n - 1) / n, n)), what the
# reference's `pip install -r requirements.txt` (diffusers>=0.30.1) gets today;
# "diffusers<0.32": numpy.linspace(start, stop, n, endpoint=False). They agree when the grid
# starts at 0 (CogVideoX's own 480 x 720) and differ by up to 0.08 of a position when it is
# cropped from the base grid with an offset (384 x 672: rows 2..28 of 30).
ROPE_GRIDS = ("diffusers", "diffusers<0.32")


@dataclass(frozen=True)
class TrajectoryCrafterConfig:
    """Field names are the diffusers config.json's, so a checkpoint's config maps onto it."""

    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 33             # noisy latents 16 + mask 1 + render latents 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096        # T5 v1.1 XXL
    num_layers: int = 42
    patch_size: int = 2
    norm_eps: float = 1e-5
    attention_bias: bool = True
    ff_inner_dim: Optional[int] = None  # None: 4 x the width
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # The base token grid RoPE positions are cropped from: TrajectoryCrafter's pipeline fixes it at
    # 480 x 720 pixels / (VAE 8 x patch 2).
    rope_base_height: int = 30
    rope_base_width: int = 45
    rope_grid: str = "diffusers"
    # The Ref-DiT perceiver (False: plain CogVideoX-Fun InP, no reference input).
    is_train_cross: bool = True
    cross_attn_in_channels: int = 16
    cross_attn_interval: int = 2
    cross_attn_dim_head: int = 128
    cross_attn_num_heads: int = 16

    def __post_init__(self):
        hd = self.attention_head_dim
        if hd % 16:
            raise ValueError(f"attention_head_dim must be a multiple of 16 (3D RoPE splits each head 1/4 time, "
                             f"3/8 rows, 3/8 columns in channel pairs), got {hd}")
        if self.rope_grid not in ROPE_GRIDS:
            raise ValueError(f"rope_grid must be one of {ROPE_GRIDS}, got {self.rope_grid!r}")
        if self.is_train_cross and self.num_layers % self.cross_attn_interval:
            raise ValueError(f"num_layers {self.num_layers} is not a multiple of cross_attn_interval "
                             f"{self.cross_attn_interval}: the original then indexes past its last perceiver")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_perceivers(self) -> int:
        return self.num_layers // self.cross_attn_interval if self.is_train_cross else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrajectoryCrafterConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrajectoryCrafterConfig fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "TrajectoryCrafterConfig":
        """From a checkpoint's config.json (CrossTransformer3DModel or CogVideoXTransformer3DModel):
        the fields this network has are taken, the ones that only describe training or the
        pipeline are ignored, and a setting this network does not implement is an error."""
        unsupported = {
            "use_rotary_positional_embeddings": (True, "the sinusoidal-position CogVideoX 2B"),
            "use_learned_positional_embeddings": (False, "learned positional embeddings"),
            "patch_size_t": (None, "CogVideoX 1.5's temporal patches"),
            "ofs_embed_dim": (None, "CogVideoX 1.5's ofs embedding"),
            "activation_fn": ("gelu-approximate", "another feed-forward activation"),
            "timestep_activation_fn": ("silu", "another time-embedding activation"),
            "norm_elementwise_affine": (True, "LayerNorms without weights"),
            "patch_bias": (True, "a patch embedding without bias"),
        }
        for key, (want, what) in unsupported.items():
            if key in config and config[key] != want:
                raise ValueError(f"config.json sets {key}={config[key]!r} ({what}); this network implements "
                                 f"{key}={want!r} only (TrajectoryCrafter / CogVideoX-Fun 5B)")
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in config.items() if k in known}
        if "use_rotary_positional_embeddings" in config and "is_train_cross" not in config:
            d["is_train_cross"] = False  # a plain diffusers CogVideoX config: no perceiver
        d.update(overrides)
        return cls(**d)


CONFIGS = {
    # TrajectoryCrafter on CogVideoX-Fun-V1.1-5b-InP: 6,099,432,000 parameters.
    "full": TrajectoryCrafterConfig(),
    # Same structure and key names at a small width, for tests on a CPU.
    "tiny": TrajectoryCrafterConfig(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32,
                                    text_embed_dim=24, num_layers=4, cross_attn_dim_head=16, cross_attn_num_heads=2),
}


# --- embeddings ---------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                      max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the timesteps (B,) -> (B, dim) float32, CogVideoX's `Timesteps`
    (frequencies exp(-ln(P) i / (dim/2 - shift)); cosines first when flipped)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    a = t.float()[:, None] * torch.exp(exponent / (half - freq_shift))[None]
    emb = torch.cat([a.cos(), a.sin()] if flip_sin_to_cos else [a.sin(), a.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def rope_crop_region(height: int, width: int, base_height: int, base_width: int):
    """Where a (height, width) token grid lies in the base grid: resized to fit it with its aspect
    kept and centred, as ((top, left), (bottom, right)) in base-grid positions."""
    if height / width > base_height / base_width:
        rh, rw = base_height, int(round(base_height / height * width))
    else:
        rw, rh = base_width, int(round(base_width / width * height))
    top, left = int(round((base_height - rh) / 2.0)), int(round((base_width - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _grid_positions(start: float, stop: float, n: int, grid: str, device) -> torch.Tensor:
    if grid == "diffusers":
        return torch.linspace(start, stop * (n - 1) / n, n, dtype=torch.float32, device=device)
    # numpy.linspace(start, stop, n, endpoint=False): steps of (stop - start) / n in float64.
    step = (stop - start) / n
    return (torch.arange(n, dtype=torch.float64, device=device) * step + start).float()


def _rope_1d(dim: int, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (len(pos), dim) of positions, each frequency repeated for its channel pair."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    a = torch.outer(pos, freqs)
    return a.cos().repeat_interleave(2, dim=1).float(), a.sin().repeat_interleave(2, dim=1).float()


def rope_3d(frames: int, height: int, width: int, head_dim: int, base_height: int = 30, base_width: int = 45,
            grid: str = "diffusers", theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX's 3D RoPE for a (frames, height, width) token grid: cos, sin of shape
    (frames * height * width, head_dim), float32, tokens in (frame, row, column) order. A head's
    channels are split 1/4 frame, 3/8 row, 3/8 column; frames sit at 0..F-1, rows and columns
    at the grid's crop region of the base grid (`rope_crop_region`, `ROPE_GRIDS`)."""
    if grid not in ROPE_GRIDS:
        raise ValueError(f"grid must be one of {ROPE_GRIDS}, got {grid!r}")
    (top, left), (bottom, right) = rope_crop_region(height, width, base_height, base_width)
    if grid == "diffusers":
        pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32, device=device)
    else:
        pos_t = torch.arange(frames, dtype=torch.float32, device=device)
    pos_h = _grid_positions(top, bottom, height, grid, device)
    pos_w = _grid_positions(left, right, width, grid, device)
    dim_t, dim_s = head_dim // 4, head_dim // 8 * 3
    parts = (_rope_1d(dim_t, pos_t, theta), _rope_1d(dim_s, pos_h, theta), _rope_1d(dim_s, pos_w, theta))

    def grid3(t, h, w):
        return torch.cat([t[:, None, None].expand(-1, height, width, -1),
                          h[None, :, None].expand(frames, -1, width, -1),
                          w[None, None, :].expand(frames, height, -1, -1)], dim=-1).reshape(frames * height * width, -1)

    return grid3(*(p[0] for p in parts)), grid3(*(p[1] for p in parts))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each channel pair (x0, x1) of x (..., N, d) by the token's angle, in float32."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# --- modules (named so that their parameters get the checkpoint's keys) --------------------------
class PatchEmbed(nn.Module):
    """`patch_embed`: video latents -> 2x2 patches (`proj`), T5 states -> width (`text_proj`);
    the joint token sequence is [text, video in (frame, row, column) order]."""

    def __init__(self, cfg: TrajectoryCrafterConfig):
        super().__init__()
        p, w = cfg.patch_size, cfg.inner_dim
        self.proj = nn.Conv2d(cfg.in_channels, w, kernel_size=p, stride=p)
        self.text_proj = nn.Linear(cfg.text_embed_dim, w)

    def forward(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text_proj(text), patchify(self.proj, video)], dim=1)


class RefPatchEmbed(nn.Module):
    """`ref_patch_embed`: reference latents -> 2x2 patches, no positional embedding."""

    def __init__(self, cfg: TrajectoryCrafterConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.cross_attn_in_channels, cfg.inner_dim, kernel_size=cfg.patch_size,
                              stride=cfg.patch_size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return patchify(self.proj, video)


def patchify(conv: nn.Conv2d, video: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F * H/p * W/p, width), per frame, tokens frame-major."""
    b, f = video.shape[:2]
    return conv(video.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, -1, conv.out_channels)


class TimeEmbedding(nn.Module):
    """`time_embedding`: Linear, SiLU, Linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaNormZero(nn.Module):
    """`norm1` / `norm2`: one LayerNorm over the joint tokens, then (shift, scale) per batch item
    from the time embedding, one pair for the video tokens and one for the text tokens; also the
    two gates of the residual that follows. Chunk order: shift, scale, gate, then the text's."""

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor, text: int, temb: torch.Tensor):
        """-> (modulated tokens, video gate (B, 1, dim), text gate (B, 1, dim))."""
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb)).chunk(6, dim=1)
        n = self.norm(h)
        n = torch.cat([n[:, :text] * (1 + t_scale)[:, None] + t_shift[:, None],
                       n[:, text:] * (1 + scale)[:, None] + shift[:, None]], dim=1)
        return n, gate[:, None], t_gate[:, None]

    def at(self, h: torch.Tensor, is_text: torch.Tensor, temb: torch.Tensor):
        """`forward` for tokens picked from anywhere in the joint sequence: h (B, k, dim), is_text
        (B, k, 1) whether each is a text token. -> (modulated tokens, the gate of each token)."""
        shift, scale, gate, t_shift, t_scale, t_gate = (c[:, None] for c in self.linear(F.silu(temb)).chunk(6, dim=1))
        n = self.norm(h)
        return (n * (1 + torch.where(is_text, t_scale, scale)) + torch.where(is_text, t_shift, shift),
                torch.where(is_text, t_gate, gate))


class AdaNormOut(nn.Module):
    """`norm_out`: LayerNorm modulated by (shift, scale) from the time embedding, in that order."""

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None] + shift[:, None]


class JointAttention(nn.Module):
    """`attn1`: self-attention over text + video tokens with a LayerNorm per head on q and k
    (`norm_q`, `norm_k`, over the head's channels, eps 1e-6) and RoPE on the video tokens."""

    def __init__(self, cfg: TrajectoryCrafterConfig):
        super().__init__()
        dim, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        # Registration order = the checkpoint's key order.
        self.norm_q = nn.LayerNorm(hd, eps=1e-6)
        self.norm_k = nn.LayerNorm(hd, eps=1e-6)
        self.to_q = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_k = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_v = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # .1 was a Dropout

    def forward(self, x: torch.Tensor, text: int, rope: Optional[tuple], attention) -> torch.Tensor:
        """x (S, text + video tokens, dim), already normed and modulated -> the attention output."""
        s, n, _ = x.shape
        q, k, v = (p(x).view(s, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q = torch.cat([q[:, :, :text], apply_rope(q[:, :, text:], *rope)], dim=2)
            k = torch.cat([k[:, :, :text], apply_rope(k[:, :, text:], *rope)], dim=2)
        o = attention(q, k, v)
        return self.to_out[0](o.transpose(1, 2).reshape(s, n, -1))

    def forward_queries(self, x: torch.Tensor, pos: torch.Tensor, text: int, rope: Optional[tuple],
                        attention) -> torch.Tensor:
        """`forward` for the queries at positions pos (S, k) of x only, against the keys and values
        of every token of x (S, text + video tokens, dim): no query of another token is computed.
        -> (S, k, dim)."""
        s, n, c = x.shape
        kq = pos.shape[1]
        xq = torch.gather(x, 1, pos[..., None].expand(-1, -1, c))
        q = self.norm_q(self.to_q(xq).view(s, kq, self.heads, -1).transpose(1, 2))
        k, v = (p(x).view(s, n, self.heads, -1).transpose(1, 2) for p in (self.to_k, self.to_v))
        k = self.norm_k(k)
        if rope is not None:
            video = (pos >= text)[:, None, :, None]                          # (S, 1, k, 1)
            row = (pos - text).clamp_min(0)
            q = torch.where(video, apply_rope(q, rope[0][row][:, None], rope[1][row][:, None]), q)
            k = torch.cat([k[:, :, :text], apply_rope(k[:, :, text:], *rope)], dim=2)
        o = attention(q, k, v)
        return self.to_out[0](o.transpose(1, 2).reshape(s, kq, -1))


class GeluTanh(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`ff`: keys `net.0.proj`, `net.2` (`.1` was a Dropout)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.Sequential(GeluTanh(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class PerceiverCrossAttention(nn.Module):
    """`perceiver_cross_attention.j`: queries from the video tokens (after `norm2`), keys and values
    from the reference tokens (after `norm1`, fused `to_kv`: keys first), no biases."""

    def __init__(self, cfg: TrajectoryCrafterConfig):
        super().__init__()
        dim, inner = cfg.inner_dim, cfg.cross_attn_num_heads * cfg.cross_attn_dim_head
        self.heads = cfg.cross_attn_num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def keys_values(self, ref_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) reference tokens -> k, v (B, heads, L, head_dim)."""
        b, n, _ = ref_tokens.shape
        k, v = self.to_kv(self.norm1(ref_tokens)).chunk(2, dim=-1)
        return k.view(b, n, self.heads, -1).transpose(1, 2), v.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor:
        """x (S, video tokens, dim) -> the update of the video tokens."""
        s, n, _ = x.shape
        q = self.to_q(self.norm2(x)).view(s, n, self.heads, -1).transpose(1, 2)
        o = attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(s, n, -1))


class PerceiverReference:
    """The keys and values of every perceiver for one run's reference latents: computed once by
    `TrajectoryCrafterTransformer.reference()`, read by every call of the run. The reference
    batch holds each distinct reference once (usually 1); a call of batch B = m x that (both CFG
    halves stacked) reads row r % batch for its item r. At full size, one reference of 3 latent
    frames (3,024 tokens) holds 21 x 2 x 3,024 x 2,048 values, 0.52 GB in bf16."""

    def __init__(self, kv: list, batch: int, tokens: int, source: Optional[torch.Tensor] = None):
        self.kv = kv  # [(k, v)] per perceiver, each (batch, heads, tokens, head_dim)
        self.batch = batch
        self.tokens = tokens
        # The reference latents these came from (small: 0.4 MB at full size), so that another
        # process holding the same weights can compute its own copy (turbo_core.parallel).
        self.source = source
        self._items: dict = {}

    def items(self, start: int, stop: int) -> "PerceiverReference":
        """The reference of the batch items start..stop-1 of a call (item r reads row r % batch),
        as a reference of their own: what one process of a call split by batch items reads. One
        reference for every item (batch 1) is itself; otherwise the rows are copied once."""
        if self.batch == 1:
            return self
        key = (start, stop)
        if key not in self._items:
            rows = torch.arange(start, stop, device=self.kv[0][0].device) % self.batch
            kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv]
            src = None if self.source is None else self.source.index_select(0, rows.to(self.source.device))
            self._items[key] = PerceiverReference(kv, stop - start, self.tokens, src)
        return self._items[key]

    def rows(self, j: int, index: Optional[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of perceiver j for `n` sequences: all of the call's (index None) or its rows `index`."""
        k, v = self.kv[j]
        if self.batch == 1:  # one reference for every sequence: a broadcast view, no copy
            return k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
        if index is None:
            if n == self.batch:
                return k, v
            index = torch.arange(n, device=k.device)
        rows = index.to(k.device) % self.batch
        return k.index_select(0, rows), v.index_select(0, rows)


class DiTBlock(nn.Module):
    """`transformer_blocks.i`: joint attention and feed-forward, each pre-normed and gated."""

    def __init__(self, cfg: TrajectoryCrafterConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = AdaNormZero(cfg.time_embed_dim, dim, cfg.norm_eps)
        self.attn1 = JointAttention(cfg)
        self.norm2 = AdaNormZero(cfg.time_embed_dim, dim, cfg.norm_eps)
        self.ff = FeedForward(dim, cfg.ff_inner_dim or 4 * dim)

    def forward(self, h: torch.Tensor, text: int, temb: torch.Tensor, rope, d: SCMDispatch, index: int,
                perceiver=None) -> torch.Tensor:
        """h (B, text + video tokens, dim) -> h after this block and, where given, its perceiver
        `perceiver(video_tokens, rows, n) -> update` (rows/n as PerceiverReference.rows)."""
        n, gate, t_gate = self.norm1(h, text, temb)
        a = d.attend(index, "joint", n, lambda s, idx: self.attn1(s, text, rope, d.attention))
        h = torch.cat([h[:, :text] + t_gate * a[:, :text], h[:, text:] + gate * a[:, text:]], dim=1)
        n, gate, t_gate = self.norm2(h, text, temb)
        f = self.ff(n)
        video = h[:, text:] + gate * f[:, text:]
        if perceiver is not None:
            video = video + d.attend(index, "perceiver", video, lambda s, idx: perceiver(s, idx))
        return torch.cat([h[:, :text] + t_gate * f[:, :text], video], dim=1)

    def forward_tokens(self, h: torch.Tensor, pos: torch.Tensor, text: int, temb: torch.Tensor, rope,
                       d: SCMDispatch, perceiver=None) -> torch.Tensor:
        """The block's output at joint-token positions pos ((B, k), text and video alike) as
        (B, k, dim), for token-level reuse: the attention runs the kept tokens' queries against
        the keys and values of every token of h, and everything per token (gates, feed-forward,
        the perceiver's queries) on the kept tokens alone. Equal to forward(h) at those rows."""
        c = h.shape[-1]
        n_all, gate, t_gate = self.norm1(h, text, temb)              # every token: the keys and values
        is_text = (pos < text)[..., None]
        hk = torch.gather(h, 1, pos[..., None].expand(-1, -1, c))
        hk = hk + torch.where(is_text, t_gate, gate) * self.attn1.forward_queries(n_all, pos, text, rope, d.attention)
        n, gate = self.norm2.at(hk, is_text, temb)
        out = hk + gate * self.ff(n)
        if perceiver is not None:  # video tokens only; a kept text token's update is dropped
            out = out + perceiver(out, None) * (~is_text).to(out.dtype)
        return out


class TrajectoryCrafterTransformer(nn.Module):
    """CrossTransformer3DModel: predicts v (CogVideoX's v-prediction) for video latents."""

    def __init__(self, cfg: TrajectoryCrafterConfig = CONFIGS["full"]):
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        # Registration order = the checkpoint's key order.
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimeEmbedding(dim, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.norm_out = AdaNormOut(cfg.time_embed_dim, dim, cfg.norm_eps)
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        if cfg.is_train_cross:
            self.ref_patch_embed = RefPatchEmbed(cfg)
            self.perceiver_cross_attention = nn.ModuleList(PerceiverCrossAttention(cfg)
                                                           for _ in range(cfg.num_perceivers))
        self._rope: dict = {}

    @property
    def depth(self) -> int:
        return self.cfg.num_layers

    def perceiver_index(self, block: int) -> Optional[int]:
        """Which perceiver follows `block` (after blocks 0, interval, 2 x interval, ...), or None."""
        c = self.cfg
        return block // c.cross_attn_interval if c.is_train_cross and block % c.cross_attn_interval == 0 else None

    def token_layout(self, batch: int, text: int, frames: int, height: int, width: int,
                     ref_tokens: int = 0) -> JointLayout:
        """The layout of a call on latents of (frames, height, width) (latent pixels)."""
        p = self.cfg.patch_size
        return JointLayout(batch, text, frames, height // p, width // p, ref_tokens)

    def block_work(self, layout: JointLayout) -> dict:
        """{(block, axis): (sequences, FLOPs per sequence)} of one call at full compute, for the
        run's statistics: the joint chain counts its projections, attention and feed-forward over
        the text + video tokens; the perceiver its query/output projections and attention to the
        reference tokens (its keys/values are computed once per run)."""
        c = self.cfg
        dim, ff = c.inner_dim, c.ff_inner_dim or 4 * c.inner_dim
        n, v = layout.text + layout.video_tokens, layout.video_tokens
        joint = 2 * n * dim * 4 * dim + 4 * n * n * dim + 4 * n * dim * ff
        inner = c.cross_attn_num_heads * c.cross_attn_dim_head
        perceiver = 4 * v * dim * inner + 4 * v * layout.ref_tokens * inner
        out = {}
        for i in range(c.num_layers):
            out[(i, "joint")] = (layout.batch, float(joint))
            if self.perceiver_index(i) is not None:
                out[(i, "perceiver")] = (layout.batch, float(perceiver))
        return out

    def rope(self, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the 3D RoPE for a (frames, height, width) token grid; computed once per
        grid and device (they depend on nothing else)."""
        key = (frames, height, width, str(device))
        if key not in self._rope:
            c = self.cfg
            self._rope[key] = rope_3d(frames, height, width, c.attention_head_dim, c.rope_base_height,
                                      c.rope_base_width, c.rope_grid, device=device)
        return self._rope[key]

    def reference(self, ref_latents: torch.Tensor) -> PerceiverReference:
        """The perceiver keys/values for reference latents (B_ref, F_ref, C, H, W) (the source
        video's first frames through the VAE, times its scaling factor): once per run."""
        c = self.cfg
        if not c.is_train_cross:
            raise ValueError("this transformer has no perceiver (is_train_cross=False): it takes no reference")
        if ref_latents.dim() != 5 or ref_latents.shape[2] != c.cross_attn_in_channels:
            raise ValueError(f"reference latents must be (batch, frames, {c.cross_attn_in_channels}, height, "
                             f"width), got {tuple(ref_latents.shape)}")
        dtype = self.ref_patch_embed.proj.weight.dtype
        tokens = self.ref_patch_embed(ref_latents.to(dtype))
        kv = [m.keys_values(tokens) for m in self.perceiver_cross_attention]
        return PerceiverReference(kv, tokens.shape[0], tokens.shape[1], ref_latents)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep, inpaint: Optional[torch.Tensor] = None,
                reference=None, dispatch: Optional[SCMDispatch] = None,
                rope: Optional[tuple] = None) -> torch.Tensor:
        """latents (B, F, 16, H, W) noisy latents; inpaint (B, F, 17, H, W) mask + render latents
        (None: latents already hold all in_channels); text (B, T, text_embed_dim) T5 states;
        timestep (B,) or scalar; reference: a PerceiverReference (or reference latents, whose
        keys/values are then computed for this call alone). Returns (B, F, out_channels, H, W)."""
        c = self.cfg
        x = latents if inpaint is None else torch.cat([latents, inpaint], dim=2)
        if x.dim() != 5 or x.shape[2] != c.in_channels:
            raise ValueError(f"latents (+ inpaint) must be (batch, frames, {c.in_channels}, height, width) "
                             f"(16 noisy + 1 mask + 16 render channels), got {tuple(x.shape)}")
        b, f, _, hh, ww = x.shape
        p = c.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {hh} x {ww}")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != c.text_embed_dim:
            raise ValueError(f"text must be ({b}, tokens, {c.text_embed_dim}) T5 states, got {tuple(text.shape)}")
        if c.is_train_cross:
            if reference is None:
                raise ValueError("TrajectoryCrafter needs a reference: the source video's first frames' latents "
                                 "(model.reference(ref_latents) once per run)")
            if not isinstance(reference, PerceiverReference):
                reference = self.reference(reference)
            if b % reference.batch:
                raise ValueError(f"a call of batch {b} cannot use a reference of batch {reference.batch}: the batch "
                                 f"must be a multiple of it (e.g. one reference for both CFG halves)")
        dtype = self.proj_out.weight.dtype
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_features(t, c.inner_dim, c.flip_sin_to_cos, c.freq_shift).to(dtype))
        h = self.patch_embed(text.to(dtype), x.to(dtype))
        n_text = text.shape[1]
        gh, gw = hh // p, ww // p
        rope = rope if rope is not None else self.rope(f, gh, gw, x.device)
        layout = JointLayout(b, n_text, f, gh, gw, reference.tokens if c.is_train_cross else 0)
        d = dispatch if dispatch is not None else FullCompute(layout)
        if d.layout != layout:
            raise ValueError(f"the dispatch's layout {d.layout} does not match this call's {layout}; "
                             f"build it from model.token_layout")
        for i, blk in enumerate(self.transformer_blocks):
            j = self.perceiver_index(i)
            perceiver = None
            if j is not None:
                def perceiver(s, idx, j=j):
                    k, v = reference.rows(j, idx, s.shape[0])
                    return self.perceiver_cross_attention[j](s, k, v, d.attention)
            h = d.chain(i, h, lambda z, blk=blk, i=i, perceiver=perceiver: blk(z, n_text, temb, rope, d, i, perceiver),
                        lambda z, pos, blk=blk, perceiver=perceiver:
                        blk.forward_tokens(z, pos, n_text, temb, rope, d, perceiver),
                        stream=True)  # the joint stream goes block to block, nothing between
        out = self.proj_out(self.norm_out(self.norm_final(h[:, n_text:]), temb))
        out = out.view(b, f, gh, gw, c.out_channels, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, f, c.out_channels, hh, ww)


def build_trajectorycrafter(cfg: TrajectoryCrafterConfig, device=None) -> TrajectoryCrafterTransformer:
    """The network on `device` ("meta": shapes only, no memory)."""
    with torch.device(device or "cpu"):
        return TrajectoryCrafterTransformer(cfg)


def parameter_count(cfg: TrajectoryCrafterConfig) -> int:
    return sum(t.numel() for t in build_trajectorycrafter(cfg, "meta").parameters())


# --- checkpoints in diffusers' layout -----------------------------------------------------------
PREFIX = "transformer."
MARKER = "patch_embed.proj.weight"


def config_from_shapes(shapes: dict, config_json: Optional[dict] = None, name: str = "the checkpoint"
                       ) -> TrajectoryCrafterConfig:
    """The config a state dict's shapes imply, over the checkpoint's config.json when there is one.
    The shapes decide the structure (a config.json may describe the 16-channel base model while the
    weights are the 33-channel InP); what they cannot tell comes from config.json, else from
    TrajectoryCrafter's: the perceiver's head count (its width is heads x head_dim; the original's
    head is 128 channels, else the DiT's head width), its interval (after every 2nd block) and the
    RoPE grid."""
    try:
        base = TrajectoryCrafterConfig.from_diffusers(config_json).to_dict() if config_json else {}
        inner, in_ch, p, _ = shapes["patch_embed.proj.weight"]
        head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]
        layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
        ff = shapes["transformer_blocks.0.ff.net.0.proj.weight"][0]
        d = dict(base, num_attention_heads=inner // head_dim, attention_head_dim=head_dim, in_channels=in_ch,
                 patch_size=p, num_layers=layers, time_embed_dim=shapes["time_embedding.linear_1.weight"][0],
                 text_embed_dim=shapes["patch_embed.text_proj.weight"][1],
                 out_channels=shapes["proj_out.weight"][0] // (p * p),
                 ff_inner_dim=None if ff == 4 * inner else ff,
                 attention_bias="transformer_blocks.0.attn1.to_q.bias" in shapes)
        perceivers = {int(k.split(".")[1]) for k in shapes if k.startswith("perceiver_cross_attention.")}
        d["is_train_cross"] = bool(perceivers)
        if perceivers:
            cross_inner = shapes["perceiver_cross_attention.0.to_q.weight"][0]
            told = bool(base.get("is_train_cross"))  # config.json describes the perceiver
            dim_head = base["cross_attn_dim_head"] if told else (128 if cross_inner % 128 == 0 else head_dim)
            # Not from the count of perceivers: a file missing one would pass as another interval.
            interval = base["cross_attn_interval"] if told else TrajectoryCrafterConfig.cross_attn_interval
            d.update(cross_attn_interval=interval, cross_attn_dim_head=dim_head,
                     cross_attn_num_heads=cross_inner // dim_head,
                     cross_attn_in_channels=shapes["ref_patch_embed.proj.weight"][1])
        return TrajectoryCrafterConfig.from_dict(d)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{name} is not a TrajectoryCrafter / CogVideoX transformer in diffusers' "
                              f"layout ({type(e).__name__}: {e})") from e


def load_trajectorycrafter(path: str, dtype: Optional[torch.dtype] = None, device="cpu"
                           ) -> TrajectoryCrafterTransformer:
    """The transformer from safetensors in diffusers' layout: one file, or shards with their
    `diffusion_pytorch_model.safetensors.index.json` (pass the index, any shard, or the folder),
    keys under `transformer.` or none, fp32 / bf16 / fp16; the config.json beside the weights is
    read when present. dtype None keeps the stored dtype."""
    files = weight_files(path)
    name = os.path.basename(path.rstrip("/"))
    shapes = read_shapes(files)
    prefix = strip_prefix(shapes, PREFIX, MARKER)
    own = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    cfg = config_from_shapes(own, read_config(files), name)
    net = build_trajectorycrafter(cfg, "meta")
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in own]
    unexpected = [k for k in own if k not in expected]
    wrong = [k for k in expected if k in own and own[k] != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{name} is not a complete TrajectoryCrafter transformer: {len(missing)} tensors missing (first: "
            f"{[prefix + k for k in missing[:1]]}), {len(unexpected)} unexpected (first: "
            f"{[prefix + k for k in unexpected[:1]]}), {len(wrong)} of another shape (first: "
            f"{[prefix + k for k in wrong[:1]]}). Pick the transformer's own files (all shards); a model "
            f"with another perceiver interval needs its config.json beside the weights.")
    sd = load_tensors(files, expected, prefix, dtype, device)
    if dtype is None:  # as stored; one dtype for all, the patch embedding's
        sd = {k: v.to(sd[MARKER].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    net.load_state_dict(sd, assign=True)
    return net.eval()


def is_trajectorycrafter_file(path: str) -> bool:
    """Whether a .safetensors file (or one shard of a sharded model) holds a CogVideoX-family
    transformer in diffusers' layout, judged from the tensor names in its headers (no tensor read)."""
    try:
        keys = set(read_shapes(weight_files(path)))
    except CheckpointError:
        return False
    return any(p + MARKER in keys and p + "transformer_blocks.0.attn1.norm_q.weight" in keys for p in ("", PREFIX))
