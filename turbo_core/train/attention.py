"""Attention for training steps: the fastest of several equal computations, per sequence length."""
from __future__ import annotations

import torch

from ..dispatch import FullCompute, chunked_sdpa


def matmul_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with batched matmuls, softmax in fp32."""
    w = (torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5).float().softmax(-1)
    return torch.matmul(w.to(v.dtype), v)


def broadcast_attention(q, k, v):
    """The same with elementwise products and sums: no matmul kernel at all, which can win for the
    camera and motion axes' sequences of 2..12 tokens, where fused kernels pad each one to a
    64- or 128-row tile."""
    s = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5      # (S, h, L, L)
    w = s.float().softmax(-1).to(v.dtype)
    return (w.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)                            # (S, h, L, d)


ATTENTION_CANDIDATES = {"sdpa": chunked_sdpa, "matmul": matmul_attention, "broadcast": broadcast_attention}


class TrainingAttention:
    """Attention for training steps: per sequence length, the fastest of ATTENTION_CANDIDATES as timed
    on this device at the start (forward + backward at a step's real shapes); sdpa where untimed.
    All candidates compute the same function, so the choice changes speed, not the model."""

    def __init__(self):
        self.choice: dict[int, str] = {}
        self.timings: dict[int, dict] = {}

    def __call__(self, q, k, v):
        return ATTENTION_CANDIDATES[self.choice.get(q.shape[2], "sdpa")](q, k, v)

    def tune(self, lengths, images: int, tokens: int, heads: int, dim: int, device, dtype, repeats: int = 3):
        from ..metrics import measure

        for L in sorted(set(lengths)):
            S = max(1, images * tokens // L)
            q, k, v = (torch.randn(S, heads, L, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(S, heads, L, dim, device=device, dtype=dtype)
            times = {}
            for name, fn in ATTENTION_CANDIDATES.items():
                try:
                    fn(q, k, v).backward(g)  # warm-up
                    with measure(device) as m:
                        for _ in range(repeats):
                            fn(q, k, v).backward(g)
                    times[name] = m.seconds / repeats
                except RuntimeError as e:  # a backend that refuses these shapes is just not chosen
                    times[name] = float("inf")
                    print(f"attention candidate {name} failed at L={L}: {e}", flush=True)
            self.timings[L] = {n: round(t * 1e3, 3) for n, t in times.items()}
            self.choice[L] = min(times, key=times.get)
            del q, k, v, g
        return self.choice


def training_dispatch(net, n_images: int, views: int, frames: int, attention=None) -> FullCompute:
    return FullCompute(net.token_layout(n_images, views, frames), backend=attention or chunked_sdpa)
