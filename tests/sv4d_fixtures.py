"""The SV4D / SV4D 2.0 pieces of the per-call reuse tests (test_sv4d_block_reuse.py,
test_sv4d_token_reuse.py): reduced-width UNets of both versions (module fixtures `unet` and its
full-compute sample `unet_full`; import both into a test module), a sampler that calls the network
as SV4D samples, and the reuse settings both tests start from."""
from __future__ import annotations

import math

import pytest
import torch

from accel_fixtures import rel_err  # noqa: F401 (part of this helper's interface)
from per_call_fixtures import NoHostSync
from test_sv4d import random_net
from turbo_core.accel.registry import build_run
from turbo_core.diffusion import v_prediction_space
from turbo_core.sampling_plans import edm_sigmas

FRAMES, VIEWS, SIDE = 2, 2, 16
BIG = 1000.0  # MiB: a bound that never binds


def sv4d_sample(net, specs=(), steps=6, run=None, backend="sdpa", guard=False, fail_at=None):
    """Euler EDM over `steps`, CFG batched ([uncond, cond], scale 2), SV4D's v-prediction EDM,
    every model call through run.model_call as the ComfyUI adapter makes it. Returns (x, stats,
    run). `fail_at`: raise inside the network at that call (an interrupt)."""
    g = torch.Generator().manual_seed(5)
    n = FRAMES * VIEWS
    ctx = torch.randn(1, FRAMES, 1024, generator=g)
    concat = torch.randn(n, 4, SIDE, SIDE, generator=g)
    y = torch.randn(n, 1280, generator=g)
    cv = torch.randn(VIEWS, 4, SIDE, SIDE, generator=g)
    y_u = y.clone()
    y_u[:, :256] = 0
    cond = dict(context=torch.cat([torch.zeros_like(ctx), ctx]), y=torch.cat([y_u, y]),
                cond_view=torch.cat([torch.zeros_like(cv), cv]))
    concat = torch.cat([torch.zeros_like(concat), concat])
    sigmas = edm_sigmas(steps).tolist()
    x = torch.randn(n, 4, SIDE, SIDE, generator=g) * sigmas[0]
    lay = net.token_layout(2 * n, VIEWS, FRAMES, SIDE, SIDE)
    work = net.block_work(lay)
    run = run if run is not None else build_run(list(specs), backend=backend)
    run.begin()
    calls = [0]
    try:
        with torch.no_grad():
            for i in range(steps):
                s, s_next = sigmas[i], sigmas[i + 1]
                c_in, c_skip, c_out = (s * s + 1) ** -0.5, 1 / (s * s + 1), -s * (s * s + 1) ** -0.5

                def denoise():
                    d = run.dispatch(lay, s, sigmas, blocks=net.blocks, work=work)
                    xin = torch.cat([torch.cat([x * c_in] * 2), concat], 1)

                    def network():
                        calls[0] += 1
                        if calls[0] == fail_at:
                            raise KeyboardInterrupt("interrupted")
                        t = torch.full((2 * n,), 0.25 * math.log(s))
                        if guard:
                            with NoHostSync():
                                return net(xin, t, dispatch=d, views=VIEWS, frames=FRAMES, **cond)
                        return net(xin, t, dispatch=d, views=VIEWS, frames=FRAMES, **cond)

                    f = run.model_call(d, xin, network, v_prediction_space(xin, torch.full((2 * n,), s), 4))
                    run.end_call(d)
                    u, c = (c_skip * torch.cat([x, x]) + c_out * f).chunk(2)
                    return u + 2.0 * (c - u)

                den = run.step(x, s, sigmas, denoise, 1.0)
                x = x + (x - den) / s * (s_next - s)
    finally:
        stats = run.end()
    return x, stats, run


def reuse_kwargs(**kw) -> dict:
    """The reuse settings of these tests (a bound that never binds, a high threshold), `kw` over them."""
    base = dict(threshold=10.0, drift_prior=0.05, max_cache_mb=BIG, weigh_output=False)
    base.update(kw)
    return base


@pytest.fixture(scope="module", params=["sv4d", "sv4d2"])
def unet(request):
    return random_net(request.param)


@pytest.fixture(scope="module")
def unet_full(unet):
    return sv4d_sample(unet)[0]
