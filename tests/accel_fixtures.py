"""Shared pieces of the accelerator tests: a tiny network that really computes, its inputs, a
counting attention backend, and a sampling helper."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from turbo_core.accel.script import sample_accelerated
from turbo_core.diffusion import EDM, karras_sigmas
from turbo_core.dispatch import sdpa
from turbo_core.models import CONFIGS, SCMNet

V, F = 3, 4          # camera sequences have length 3, motion 4, spatial 64 (tiny: 8 x 8 tokens)
STEPS = 12
EDM_ = EDM()


def random_net(name="tiny", seed=0, std=0.08, dtype=torch.float32):
    """SCMNet zero-inits its output projections (each block starts as the identity), so a test
    with the stock init would test a no-op: re-draw every parameter."""
    torch.manual_seed(seed)
    net = SCMNet(CONFIGS[name])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net.to(dtype).eval()


def grid_inputs(net, views=V, frames=F, batch=1, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = batch * views * frames
    s = net.cfg.image_size
    noise = torch.randn(n, 3, s, s, generator=g, dtype=torch.float64).to(dtype)
    cond = torch.randn(n, 3, s, s, generator=g, dtype=torch.float64).to(dtype)
    cam = torch.rand(n, 2, generator=g)
    return noise, cond, cam


class CountingAttention:
    """An attention backend that counts the sequences it computes, by sequence length (spatial
    64, camera V, motion F in these tests): an account of the work independent of RunStats."""

    def __init__(self):
        self.sequences = defaultdict(int)

    def __call__(self, q, k, v):
        self.sequences[q.shape[-2]] += q.shape[0]
        return sdpa(q, k, v)

    def by_axis(self, net, views=V, frames=F):
        return {"spatial": self.sequences[net.cfg.grid ** 2], "camera": self.sequences[views],
                "motion": self.sequences[frames]}


def sample(net, specs, inputs=None, steps=STEPS, views=V, frames=F, **kw):
    noise, cond, cam = inputs if inputs is not None else grid_inputs(net, views, frames)
    sigmas = karras_sigmas(steps)
    return sample_accelerated(net, EDM_, specs, noise, sigmas, cond, cam, views, frames, **kw)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def net():
    """A small network with non-zero weights, shared by a test module."""
    return random_net()


@pytest.fixture(scope="module")
def full(net):
    """Its full-compute sample of the default inputs, the reference every accelerator is held to."""
    return sample(net, [])[0]
