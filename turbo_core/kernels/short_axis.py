"""Attention along a short axis (2..32 elements) read straight from the tokens' own layout.

The camera and motion sub-attentions run one softmax over V views or F frames for every token
position: hundreds of thousands of sequences of length 4..12 at SV4D's top level. PyTorch's SDPA
pads each sequence to a 64- or 128-row tile and needs the sequences contiguous, so the model used to
transpose q, k, v and the output between the image-major layout (b, t, v, h*w, channels) and
(sequences, length, channels), four copies of the activations per sub-attention.

Here q, k, v are *strided views* of the image-major projections, shaped (G, L, R, heads*d):
element (g, l, r) of sequence (g, r) lives at g*stride_g + l*stride_l + r*stride_r. All three SCM
axes are such views without a copy (`SCMLayout.axis_view`). One Triton program takes BLOCK_R
sequences of one head, loads their L x d tiles, computes the L x L softmax in fp32 and writes the
output through the same kind of view, so it lands in the image-major layout.

Two kernel variants compute the same function: `fma` (elementwise products and an online softmax
over the keys, on the CUDA cores, no padding of the key axis) and `dot` (batched tensor-core
products, each sequence padded to 16). bench/bench_kernels.py times both; `_choose` holds the pick
(fma up to length 4, dot above). Both run close to the memory floor (a copy of the same bytes),
several times faster than SDPA on these short sequences (BENCHMARKS.md).

Where the kernel does not apply (no Triton, a CPU tensor, gradients wanted, an unsupported
length, head size or dtype) the same views go through SDPA with explicit transposes: the same
function, the old path's cost. TURBO4D_SHORT_AXIS=torch forces that path, =triton insists on the
kernel (an error where it cannot run; on the CPU it needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .switch import MODES, env_mode, interpreting as _interpreting, tl, triton

ENV = "TURBO4D_SHORT_AXIS"
MAX_LENGTH = 32
HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mode() -> str:
    return env_mode(ENV)


def available(device) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, or any device under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _interpreting()


# --- the kernels -----------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _fma_kernel(Q, K, V, O,
                    q_sg, q_sl, q_sr, k_sg, k_sl, k_sr, v_sg, v_sl, v_sr, o_sg, o_sl, o_sr,
                    R, n_rblocks, heads, qk_scale,
                    L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_D: tl.constexpr):
        # Heads vary fastest between programs: neighbouring programs read neighbouring channels
        # of the same token rows.
        pid = tl.program_id(0)
        h = pid % heads
        rest = pid // heads
        rb = rest % n_rblocks
        g = (rest // n_rblocks).to(tl.int64)
        offs_l = tl.arange(0, BLOCK_L)
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        l3 = offs_l[:, None, None]
        r3 = offs_r[None, :, None].to(tl.int64)
        d3 = h * HEAD_D + tl.arange(0, HEAD_D)[None, None, :]
        rmask = r3 < R
        qmask = (l3 < L) & rmask
        q = tl.load(Q + g * q_sg + l3 * q_sl + r3 * q_sr + d3, mask=qmask, other=0.0).to(tl.float32)
        q = q * qk_scale  # d^-1/2 * log2(e): the softmax runs on exp2
        m_i = tl.full([BLOCK_L, BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_L, BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_L, BLOCK_R, HEAD_D], tl.float32)
        k_base = K + g * k_sg + r3 * k_sr + d3
        v_base = V + g * v_sg + r3 * v_sr + d3
        for j in tl.static_range(L):  # unrolled over the real keys only: no padded key is computed
            kj = tl.load(k_base + j * k_sl, mask=rmask, other=0.0).to(tl.float32)
            vj = tl.load(v_base + j * v_sl, mask=rmask, other=0.0).to(tl.float32)
            s = tl.sum(q * kj, axis=2)
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, :, None] + p[:, :, None] * vj
            m_i = m_new
        o = acc / l_i[:, :, None]
        tl.store(O + g * o_sg + l3 * o_sl + r3 * o_sr + d3, o.to(O.dtype.element_ty), mask=qmask)

    @triton.jit
    def _dot_kernel(Q, K, V, O,
                    q_sg, q_sl, q_sr, k_sg, k_sl, k_sr, v_sg, v_sl, v_sr, o_sg, o_sl, o_sr,
                    R, n_rblocks, heads, qk_scale,
                    L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_D: tl.constexpr):
        pid = tl.program_id(0)
        h = pid % heads
        rest = pid // heads
        rb = rest % n_rblocks
        g = (rest // n_rblocks).to(tl.int64)
        offs_l = tl.arange(0, BLOCK_L)
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r3 = offs_r[:, None, None].to(tl.int64)  # (rows, length, d): rows are the batch of the products
        l3 = offs_l[None, :, None]
        d3 = h * HEAD_D + tl.arange(0, HEAD_D)[None, None, :]
        mask = (l3 < L) & (r3 < R)
        q = tl.load(Q + g * q_sg + r3 * q_sr + l3 * q_sl + d3, mask=mask, other=0.0)
        k = tl.load(K + g * k_sg + r3 * k_sr + l3 * k_sl + d3, mask=mask, other=0.0)
        v = tl.load(V + g * v_sg + r3 * v_sr + l3 * v_sl + d3, mask=mask, other=0.0)
        s = tl.dot(q, tl.permute(k, (0, 2, 1))) * qk_scale
        s = tl.where(offs_l[None, None, :] < L, s, float("-inf"))
        m = tl.max(s, axis=2)
        p = tl.exp2(s - m[:, :, None])
        den = tl.sum(p, axis=2)
        o = tl.dot(p.to(v.dtype), v) / den[:, :, None]
        tl.store(O + g * o_sg + r3 * o_sr + l3 * o_sl + d3, o.to(O.dtype.element_ty), mask=mask)

    _KERNELS = {"fma": _fma_kernel, "dot": _dot_kernel}
else:  # pragma: no cover
    _KERNELS = {}

VARIANTS = ("fma", "dot")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _choose(length: int, head_dim: int, dtype: torch.dtype, variant: Optional[str]) -> dict:
    """Kernel variant and tile for a length / head size, from bench/bench_kernels.py's sweep on a GPU
    (bf16, d = 64; bench/results/kernels_sweep_h100.json): `fma` with 8 sequences x 2 warps a
    program was fastest up to length 4, `dot` with 4 sequences x 4 warps for lengths 5..12 (the fma
    variant's fp32 registers grow with length^2). fp32 stays on `fma`: the tensor-core products
    would round to tf32."""
    if variant is None:
        variant = "fma" if length <= 4 or dtype == torch.float32 else "dot"
    if variant == "dot" and dtype == torch.float32:
        variant = "fma"
    if variant == "dot":
        return dict(variant="dot", BLOCK_L=max(16, _pow2(length)), BLOCK_R=4, num_warps=4)
    block_l = _pow2(length)
    return dict(variant="fma", BLOCK_L=block_l, BLOCK_R=max(1, 2048 // (block_l * head_dim)), num_warps=2)


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _launch(q, k, v, o, heads: int, config: dict) -> None:
    """q, k, v, o: (G, L, R, heads*d) views with unit channel stride."""
    g, length, r, c = q.shape
    d = c // heads
    kern = _KERNELS[config["variant"]]
    block_r = config["BLOCK_R"]
    n_rblocks = triton.cdiv(r, block_r)
    grid = (g * n_rblocks * heads,)
    kern[grid](q, k, v, o, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
               r, n_rblocks, heads, d ** -0.5 * _LOG2E,
               L=length, BLOCK_L=config["BLOCK_L"], BLOCK_R=block_r, HEAD_D=d,
               num_warps=config["num_warps"])


# --- applicability -----------------------------------------------------------------------------
def kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> Optional[str]:
    """None when the Triton kernel can compute these (G, L, R, heads*d) views, else the reason."""
    if triton is None:
        return "Triton is not installed"
    if not available(q.device):
        return f"tensors on {q.device.type} (the kernel runs on CUDA, or anywhere under TRITON_INTERPRET=1)"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "gradients are wanted (the kernel is forward-only)"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} / {k.dtype} / {v.dtype} (fp16, bf16, fp32, all alike)"
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        return "q, k, v must be (G, L, R, heads*d) views of one shape"
    length, c = q.shape[1], q.shape[3]
    if not 2 <= length <= MAX_LENGTH:
        return f"sequence length {length} (2..{MAX_LENGTH})"
    if c % heads or c // heads not in HEAD_DIMS:
        return f"head size {c / heads:g} (one of {HEAD_DIMS})"
    if any(t.stride(3) != 1 for t in (q, k, v)):
        return "channels are not contiguous"
    return None


# --- the paths ---------------------------------------------------------------------------------
def _torch_path(q, k, v, heads: int, out: Optional[torch.Tensor], attention: Attention) -> torch.Tensor:
    """The same function through `attention` on (sequences, heads, L, d), with the transposes."""
    g, length, r, c = q.shape

    def seqs(t):
        return t.permute(0, 2, 1, 3).reshape(g * r, length, heads, c // heads).transpose(1, 2)

    o = attention(seqs(q), seqs(k), seqs(v))
    o = o.transpose(1, 2).reshape(g, r, length, c).permute(0, 2, 1, 3)
    if out is None:
        return o
    out.copy_(o)
    return out


def short_axis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         out: Optional[torch.Tensor] = None, *, fallback: Optional[Attention] = None,
                         impl: Optional[str] = None, variant: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v along dim 1 of (G, L, R, heads*d) views, for each (g, r, head).

    `out` (same shape, e.g. a view of an image-major buffer) receives the result; without it a
    tensor is allocated in q's memory order. `fallback` is the (S, heads, L, d) attention of the
    non-kernel path (default SDPA). `impl` overrides TURBO4D_SHORT_AXIS for this call."""
    impl = impl or mode()
    if impl not in MODES:
        raise ValueError(f"impl must be one of {MODES}, got {impl!r}")
    if q.dim() != 4 or q.shape[3] % heads:
        raise ValueError(f"q must be (G, L, R, heads*d) with heads={heads} dividing its last dim, got {tuple(q.shape)}")
    why = None if impl == "torch" else kernel_applies(q, k, v, heads)
    if impl == "torch" or why is not None:
        if impl == "triton":
            raise RuntimeError(f"{ENV}=triton but the short-axis kernel cannot run here: {why}")
        return _torch_path(q, k, v, heads, out, fallback or F.scaled_dot_product_attention)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.preserve_format)
    if out.shape != q.shape or out.stride(3) != 1 or out.dtype != q.dtype:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} view with contiguous channels")
    _launch(q, k, v, out, heads, _choose(q.shape[1], q.shape[3] // heads, q.dtype, variant))
    return out


def short_axis_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An (S, heads, L, d) attention backend: the short-axis kernel for sequences of 2..32 where
    it applies (q, k, v the usual head-split views of (S, L, heads*d) projections), SDPA otherwise."""
    s, heads, length, d = q.shape
    if (mode() != "torch" and length <= MAX_LENGTH and q.shape == k.shape == v.shape
            and all(t.stride(1) == d and t.stride(3) == 1 for t in (q, k, v))):
        # (S, heads, L, d) with packed heads = (G=1, L, R=S, heads*d) strided views of the same storage
        views = [t.as_strided((1, length, s, heads * d), (0, t.stride(2), t.stride(0), 1)) for t in (q, k, v)]
        if kernel_applies(*views, heads) is None:
            o = torch.empty(s, length, heads, d, device=q.device, dtype=q.dtype)
            short_axis_attention(*views, heads, out=o.view(s, length, heads * d).transpose(0, 1).unsqueeze(0),
                                 impl="triton")
            return o.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def grid_attention(view: Callable[[torch.Tensor], torch.Tensor], fallback: Attention, kernel: bool = True):
    """A `(q, k, v, heads) -> o` attention over image-major projections (N, n, heads*d): `view`
    lays the axis's sequences over them as (G, L, R, heads*d); the output is image-major like q.
    `kernel=False` keeps the `fallback` path whatever Triton can do (a custom backend)."""

    def attend(q, k, v, heads):
        o = torch.empty_like(q)
        short_axis_attention(view(q), view(k), view(v), heads, out=view(o), fallback=fallback,
                             impl=None if kernel else "torch")
        return o

    return attend
