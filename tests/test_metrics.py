"""PSNR and SSIM against known values and an independent numpy computation; cost helpers."""
import math

import numpy as np
import pytest
import torch

from turbo_core.metrics import finite_mean, measure, psnr, ssim, time_call


def test_psnr_identical_is_inf_and_known_noise_gives_expected_db():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 3, 32, 32, generator=g) * 2 - 1
    assert torch.isinf(psnr(a, a)).all() and psnr(a, a).shape == (2, 3)
    # a constant offset of 0.1 on a data range of 2: MSE = 0.01, PSNR = 10 log10(4 / 0.01) = 26.0206 dB
    assert torch.allclose(psnr(a, a + 0.1), torch.full((2, 3), 10 * math.log10(400.0)), atol=1e-4)
    # gaussian noise of std 0.05: PSNR ~ 10 log10(4 / 0.0025) = 32.04 dB
    noisy = a + 0.05 * torch.randn(a.shape, generator=g)
    assert abs(float(psnr(a, noisy).mean()) - 10 * math.log10(4 / 0.0025)) < 0.15
    # data range 1 on the same error: 6.02 dB less
    assert torch.allclose(psnr(a, a + 0.1, data_range=1.0), torch.full((2, 3), 20.0), atol=1e-4)


def numpy_ssim(x, y, data_range, size=11, sigma=1.5):
    """Independent reference: explicit loops over every valid window position and channel."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                px, py = x[ch, i:i + size, j:j + size], y[ch, i:i + size, j:j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_independent_numpy_and_known_cases():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 16, 14, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    got = ssim(a, b)
    assert got.shape == (2,)
    for i in range(2):
        ref = numpy_ssim(a[i].double().numpy(), b[i].double().numpy(), 2.0)
        assert abs(float(got[i]) - ref) < 1e-5, (float(got[i]), ref)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert (got < 0.9).all()  # heavy noise must show
    # contrast inverted around the same mean brightness: structure anti-correlated, SSIM below zero
    c = a * 0.25 + 0.5
    assert (ssim(c, 1 - c) < -0.5).all()


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_cost_helpers_time_and_average():
    with measure("cpu") as m:
        sum(range(10000))
    assert m.seconds > 0 and m.peak_bytes is None
    out = time_call(lambda: torch.ones(64, 64) @ torch.ones(64, 64), "cpu", warmup=1, repeats=2)
    assert len(out["times_s"]) == 2 and out["min_s"] <= out["mean_s"]
    assert finite_mean([1.0, float("inf"), 3.0]) == 2.0
    assert math.isnan(finite_mean([float("inf")]))
