"""Fused steps of a token-level block call (token reuse): the norm with the add before it, and the
scatter of the kept tokens over the reused ones.

A block run at k of its t token positions (`SCMBlock.forward_tokens`, token_reuse.py) spends a
share of its time outside the products, in steps that PyTorch runs as separate passes over the
activations: `LayerNorm(x + e)` (e one vector per image: the noise-level, camera or frame
embedding) as an add then a norm, PyTorch's LayerNorm kernel being slow at these widths (one row
of 192-320 channels per thread block), and the unkept tokens' state `x + a * r` (r the span's
cached 16-bit residual) followed by an index_copy of the kept tokens' output. Here each is one pass:

- `add_layernorm(x, e, norm)`: LayerNorm(x + e[image]) with the sum rounded to x's dtype first,
  as the separate add rounds it, then the norm in fp32.
- `fill_rows(x, r, a, h, rows, inv)`: out = x + a * r at every row, h at the kept `rows`
  (`inv`, row -> its index in h or -1, from `inverse_rows`).

SCMNet's full forward runs its norms through `add_layernorm` too, so full compute and every
accelerator are measured with the same norm kernel (not only the token-level calls).

Where the kernels do not apply (no Triton, a CPU tensor, gradients wanted) the same functions run
as the PyTorch operations they replace (the modules themselves, so hooks on them still count), the
reference the kernels are checked against (bench/check_token_fuse.py on a GPU).
TURBO4D_TOKEN_FUSE=torch forces that path, =triton insists on the kernels (an error where they
cannot run; on the CPU they need TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .switch import MODES, env_mode, interpreting as _interpreting, tl, triton  # noqa: F401 (MODES: this module's too)

ENV = "TURBO4D_TOKEN_FUSE"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 4096


def mode() -> str:
    return env_mode(ENV)


def why_not(x: torch.Tensor) -> Optional[str]:
    """None when the kernels can run on x, else the reason."""
    if triton is None:
        return "Triton is not installed"
    if x.device.type != "cuda" and not _interpreting():
        return f"tensors on {x.device.type} (the kernels run on CUDA, or anywhere under TRITON_INTERPRET=1)"
    if torch.is_grad_enabled() and x.requires_grad:
        return "gradients are wanted (the kernels are forward-only)"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (fp16, bf16, fp32)"
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} (at most {MAX_WIDTH})"
    return None


def fused(x: torch.Tensor) -> bool:
    """Whether this call takes the kernels (TURBO4D_TOKEN_FUSE and where x lies)."""
    m = mode()
    if m == "torch":
        return False
    reason = why_not(x)
    if m == "triton" and reason is not None:
        raise RuntimeError(f"{ENV}=triton but the token kernels cannot run: {reason}; unset {ENV} or set it to torch")
    return reason is None


# --- the kernels -----------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_ln_kernel(X, E, W, B, Y, n_rows, group, C, eps,
                       HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * C + cols[None, :], mask=mask, other=0.0)
        if HAS_ADD:
            img = (rows // group).to(tl.int64)[:, None]
            e = tl.load(E + img * C + cols[None, :], mask=mask, other=0.0)
            # The sum rounded to x's dtype, as the separate add of the reference rounds it.
            x = (x.to(tl.float32) + e.to(tl.float32)).to(X.dtype.element_ty)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + r64 * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _fill_kernel(X, R, H, INV, O, n_rows, C, alpha,
                     BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        inv = tl.load(INV + rows, mask=rmask, other=-1)
        src = tl.where(inv >= 0, inv, 0).to(tl.int64)[:, None]
        kept = (inv >= 0)[:, None]
        r64 = rows.to(tl.int64)[:, None]
        # Only what each row needs is read: the kept rows their new output, the others x and r.
        x = tl.load(X + r64 * C + cols[None, :], mask=mask & ~kept, other=0.0).to(tl.float32)
        r = tl.load(R + r64 * C + cols[None, :], mask=mask & ~kept, other=0.0).to(tl.float32)
        h = tl.load(H + src * C + cols[None, :], mask=mask & kept, other=0.0)
        reused = (x + alpha * r).to(O.dtype.element_ty)
        tl.store(O + r64 * C + cols[None, :], tl.where(kept, h.to(O.dtype.element_ty), reused), mask=mask)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tile(c: int) -> tuple[int, int, int]:
    """(BLOCK_C, rows a program, warps): about 4k elements a program."""
    block_c = max(16, _pow2(c))
    rows = max(1, 4096 // block_c)
    return block_c, rows, 4 if block_c * rows <= 4096 else 8


# --- the functions -----------------------------------------------------------------------------
def add_layernorm(x: torch.Tensor, e: Optional[torch.Tensor], norm: nn.LayerNorm) -> torch.Tensor:
    """norm(x + e[:, None]) for x (images, tokens, c) and e (images, c) or None."""
    if not fused(x) or norm.weight is None or norm.bias is None or norm.weight.dtype != x.dtype:
        return norm(x if e is None else x + e[:, None])
    n, t, c = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    block_c, rows, warps = _tile(c)
    n_rows = n * t
    ee = x if e is None else e.to(x.dtype).contiguous()
    _add_ln_kernel[(triton.cdiv(n_rows, rows),)](
        x, ee, norm.weight, norm.bias, y, n_rows, t, c, float(norm.eps),
        HAS_ADD=e is not None, BLOCK_C=block_c, ROWS=rows, num_warps=warps)
    return y


def inverse_rows(rows: torch.Tensor, total: int) -> torch.Tensor:
    """row -> its index among `rows` (int32), -1 for the rows not in it; on the device."""
    inv = torch.full((total,), -1, dtype=torch.int32, device=rows.device)
    return inv.scatter_(0, rows, torch.arange(rows.numel(), dtype=torch.int32, device=rows.device))


def fill_rows(x: torch.Tensor, r: torch.Tensor, alpha: float, h: torch.Tensor, rows: torch.Tensor,
              inv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x + alpha * r (x (n, t, c), r its 16-bit residual share) with the rows `rows` of the flattened
    result replaced by h ((len(rows), c) or any shape of those rows)."""
    n, t, c = x.shape
    if inv is None or not fused(x) or r.shape != x.shape:
        out = torch.add(x, r, alpha=alpha).contiguous()
        out.view(n * t, c).index_copy_(0, rows, h.reshape(-1, c).to(out.dtype))
        return out
    x, r, h = x.contiguous(), r.contiguous(), h.contiguous()
    out = torch.empty_like(x)
    block_c, per, warps = _tile(c)
    _fill_kernel[(triton.cdiv(n * t, per),)](x, r, h, inv, out, n * t, c, float(alpha),
                                              BLOCK_C=block_c, ROWS=per, num_warps=warps)
    return out


def reference_add_layernorm(x, e, norm):
    """The unfused operations add_layernorm replaces (for the checks)."""
    return F.layer_norm(x if e is None else x + e[:, None], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
