"""Short-axis attention (turbo_core/kernels): the strided views of the image-major layout hold the
same sequences as the layout's copies, the SDPA path through those views equals SDPA on the copies,
the grid path of SV4D / SCMNet equals the sequence path with no layout copy made, accelerators that
look at sequences still get them, and the Triton kernel (where Triton runs: a CUDA GPU, or the
CPU under TRITON_INTERPRET=1; skipped otherwise) equals SDPA within bf16 / fp16 / fp32 tolerance."""
import os

import pytest
import torch
import torch.nn.functional as F

from turbo_core.accel.base import Accelerator
from turbo_core.accel.run import Turbo4DRun
from turbo_core.dispatch import FullCompute, SCMDispatch
from turbo_core.kernels import short_axis as sa
from turbo_core.layout import SCMLayout
from turbo_core.models import CONFIGS, SCMNet
from turbo_core.models.sv4d import SV4DConfig, SV4DUNet
from turbo_core.models.sv4d_blocks import CameraAxis

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not sa.available(KERNEL_DEVICE),
                                  reason="the Triton kernel needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")


def views_of(lay, axis, pixel_groups=False):
    if axis == "camera":
        ax = CameraAxis(lay, pixel_groups)
        return ax.axis_view, ax.to_axis, ax.from_axis
    return (lambda t: lay.axis_view(t, axis)), (lambda t: lay.to_axis(t, axis)), (lambda s: lay.from_axis(s, axis))


CASES = [("camera", False, SCMLayout(2, 3, 4, 3, 5)), ("motion", False, SCMLayout(2, 3, 4, 3, 5)),
         ("camera", True, SCMLayout(2, 4, 3, 3, 3)),  # 9 pixels, 4 views: groups straddle two views
         ("camera", True, SCMLayout(1, 4, 2, 4, 4))]


@pytest.mark.parametrize("axis,pixel_groups,lay", CASES)
def test_axis_view_holds_to_axis_sequences_without_a_copy(axis, pixel_groups, lay):
    x = torch.randn(lay.images, lay.tokens, 6)
    view, to_axis, _ = views_of(lay, axis, pixel_groups)
    v = view(x)
    assert v.data_ptr() == x.data_ptr() and v.dim() == 4
    g, length, r, c = v.shape
    assert (g * r, length) == lay.axis_shape(axis)
    torch.testing.assert_close(v.permute(0, 2, 1, 3).reshape(g * r, length, c), to_axis(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="camera and motion"):
        lay.axis_view(x, "spatial")


@pytest.mark.parametrize("axis,pixel_groups,lay", CASES)
def test_sdpa_path_through_views_equals_sdpa_on_sequences(axis, pixel_groups, lay):
    heads, d = 2, 8
    q, k, v = (torch.randn(lay.images, lay.tokens, heads * d) for _ in range(3))
    view, to_axis, from_axis = views_of(lay, axis, pixel_groups)
    out = torch.empty_like(q)
    res = sa.short_axis_attention(view(q), view(k), view(v), heads, out=view(out), impl="torch")
    assert res.data_ptr() == out.data_ptr()

    def heads_of(t):
        s = to_axis(t)
        return s.view(s.shape[0], s.shape[1], heads, d).transpose(1, 2)

    ref = F.scaled_dot_product_attention(heads_of(q), heads_of(k), heads_of(v))
    ref = from_axis(ref.transpose(1, 2).reshape(ref.shape[0], ref.shape[2], heads * d))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def _sv4d(version, use_3d=None, seed=0):
    torch.manual_seed(seed)
    net = SV4DUNet(SV4DConfig.reduced(version, use_3d_attention=use_3d))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0, 0.05) if not name.endswith("mix_factor") else p.uniform_(-2, 2)
    return net.eval()


def _sv4d_inputs(batch, frames, views, size=16, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = batch * frames * views
    t = dict(x=torch.randn(n, 8, size, size, generator=g), timesteps=torch.rand(n, generator=g),
             context=torch.randn(batch, frames, 1024, generator=g), y=torch.randn(n, 1280, generator=g),
             cond_view=torch.randn(batch * views, 4, size, size, generator=g))
    t = {k: v.to(device=device, dtype=dtype if k != "timesteps" else torch.float32) for k, v in t.items()}
    return dict(t, views=views, frames=frames)


class _Copies:
    """Counts the layout copies (to_axis) a forward makes."""

    def __init__(self, monkeypatch):
        self.calls = []
        for cls in (SCMLayout, CameraAxis):
            orig = cls.to_axis

            def spy(obj, *a, _orig=orig):
                self.calls.append(type(obj).__name__)
                return _orig(obj, *a)

            monkeypatch.setattr(cls, "to_axis", spy)


@pytest.mark.parametrize("version,use_3d", [("sv4d2", True), ("sv4d2", False), ("sv4d", None)])
def test_sv4d_grid_path_equals_sequence_path_without_copies(monkeypatch, version, use_3d):
    net = _sv4d(version, use_3d)
    inp = _sv4d_inputs(batch=2, frames=3, views=4)
    lay = net.token_layout(24, 4, 3, 16, 16)
    copies = _Copies(monkeypatch)
    with torch.no_grad():
        seq = net(**inp, dispatch=FullCompute(lay, grid=False))
        assert len(copies.calls) >= 2 * net.blocks  # camera + motion of every layer (at least)
        copies.calls.clear()
        grid = net(**inp, dispatch=FullCompute(lay, grid=True))
    assert copies.calls == []
    torch.testing.assert_close(grid, seq, atol=1e-5, rtol=1e-4)


def test_grid_path_off_with_gradients_or_when_asked(monkeypatch):
    """Gradients (the kernel is forward-only), grid=False and TURBO4D_SHORT_AXIS=torch keep the
    sequence path; a custom backend keeps the grid path (through its transposes)."""
    lay = SCMLayout(1, 2, 2, 2, 2)
    x = torch.randn(lay.images, lay.tokens, 4)
    with torch.no_grad():
        assert FullCompute(lay)._grid_applies(x) is True
        assert FullCompute(lay, backend="naive")._grid_applies(x) is True
        assert FullCompute(lay, grid=False)._grid_applies(x) is False
    with torch.enable_grad():
        assert FullCompute(lay)._grid_applies(x) is False
    monkeypatch.setenv(sa.ENV, "torch")
    with torch.no_grad():
        assert FullCompute(lay)._grid_applies(x) is False


def test_scm_net_grid_path_equals_sequence_path_and_counts_the_same(monkeypatch):
    torch.manual_seed(0)
    net = SCMNet(CONFIGS["tiny"])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.08)
    net.eval()
    n, views, frames = 2 * 3 * 4, 3, 4
    x, cam = torch.randn(n, 6, 16, 16), torch.rand(n, 2)
    lay = net.token_layout(n, views, frames)
    copies = _Copies(monkeypatch)
    counted = {}
    for grid in (False, True):
        run = Turbo4DRun([])
        run.begin()
        d = run.dispatch(lay, 1.0)
        d.grid = grid
        with torch.no_grad():
            counted[grid] = (net(x, torch.zeros(n), cam, views, frames, dispatch=d), copies.calls[:])
        run.end_call(d)
        st = run.end()
        assert st.sequences_computed["camera"] == net.depth * lay.axis_shape("camera")[0]
        assert st.sequences_computed["motion"] == net.depth * lay.axis_shape("motion")[0]
        copies.calls.clear()
    assert len(counted[False][1]) == 2 * net.depth and counted[True][1] == []
    torch.testing.assert_close(counted[True][0], counted[False][0], atol=1e-5, rtol=1e-4)


class _Seen(Accelerator):
    name = "seen"

    def __init__(self):
        super().__init__()
        self.axes = []

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        self.axes.append((axis, tuple(seqs.shape)))
        return nxt(seqs, index)


class _ChainOnly(Accelerator):
    name = "chain-only"


def test_accelerators_that_look_at_sequences_get_them(monkeypatch):
    net = _sv4d("sv4d2")
    inp = _sv4d_inputs(batch=1, frames=2, views=4)
    lay = net.token_layout(8, 4, 2, 16, 16)
    seen = _Seen()
    copies = _Copies(monkeypatch)
    with torch.no_grad():
        ref = net(**inp, dispatch=SCMDispatch(lay, accelerators=[seen], grid=True))
        assert len(copies.calls) == 2 * net.blocks
        copies.calls.clear()
        chain_only = net(**inp, dispatch=SCMDispatch(lay, accelerators=[_ChainOnly()], grid=True))
    assert copies.calls == []  # an accelerator that only acts on chains leaves the grid path on
    assert [a for a, _ in seen.axes] == ["spatial", "camera", "motion"] * net.blocks
    assert seen.axes[1][1][:2] == (2 * 256, 4) and seen.axes[2][1][:2] == (4 * 256, 2)
    torch.testing.assert_close(chain_only, ref, atol=1e-5, rtol=1e-4)


def test_mode_flag_and_clear_errors(monkeypatch):
    q = torch.randn(2, 4, 3, 16)
    monkeypatch.setenv(sa.ENV, "fastest")
    with pytest.raises(ValueError, match="TURBO4D_SHORT_AXIS='fastest'"):
        sa.short_axis_attention(q, q, q, 1)
    monkeypatch.setenv(sa.ENV, "torch")
    out = sa.short_axis_attention(q, q, q, 1)
    assert out.shape == q.shape
    monkeypatch.setenv(sa.ENV, "triton")
    if not sa.available("cpu"):
        with pytest.raises(RuntimeError, match="cannot run here"):
            sa.short_axis_attention(q, q, q, 1)
    with pytest.raises(ValueError, match="heads=3"):
        sa.short_axis_attention(q, q, q, 3, impl="torch")
    reasons = sa.kernel_applies(torch.randn(2, 40, 3, 16), torch.randn(2, 40, 3, 16), torch.randn(2, 40, 3, 16), 1)
    assert reasons is not None


# --- the Triton kernel -------------------------------------------------------------------------
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference(q, k, v, heads):
    return sa._torch_path(q.double(), k.double(), v.double(), heads, None, F.scaled_dot_product_attention)


@needs_kernel
@pytest.mark.parametrize("variant", sa.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length,rows,heads,d", [(2, 5, 2, 16), (4, 33, 1, 64), (12, 7, 2, 32), (5, 3, 1, 64),
                                                   (32, 4, 1, 16)])
def test_kernel_matches_sdpa_on_strided_views(variant, dtype, length, rows, heads, d):
    if variant == "dot" and dtype == torch.bfloat16 and KERNEL_DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (garbage on the CPU)")
    g = torch.Generator().manual_seed(length * 100 + rows)
    c = heads * d
    fused = torch.randn(3, rows, length, 3 * c, generator=g).to(KERNEL_DEVICE, dtype)  # q|k|v packed, L inner
    q, k, v = (fused[..., i * c:(i + 1) * c].transpose(1, 2) for i in range(3))        # (G, L, R, c), strided
    out = sa.short_axis_attention(q, k, v, heads, impl="triton", variant=variant)
    sdpa = sa.short_axis_attention(q, k, v, heads, impl="torch")
    ref = _reference(q, k, v, heads)
    assert out.shape == q.shape and out.dtype == dtype
    err, sdpa_err = (out.double() - ref).abs().max().item(), (sdpa.double() - ref).abs().max().item()
    assert err <= TOL[dtype] and err <= 2 * sdpa_err + TOL[dtype] / 4, (err, sdpa_err)


@needs_kernel
def test_kernel_writes_through_an_image_major_view_and_backs_the_sdpa_backend():
    lay = SCMLayout(1, 4, 3, 4, 4)
    heads, d = 2, 16
    q, k, v = (torch.randn(lay.images, lay.tokens, heads * d).to(KERNEL_DEVICE) for _ in range(3))
    view = CameraAxis(lay, True).axis_view
    out = torch.full_like(q, float("nan"))
    sa.short_axis_attention(view(q), view(k), view(v), heads, out=view(out), impl="triton")
    ref = sa.short_axis_attention(view(q), view(k), view(v), heads, impl="torch")
    torch.testing.assert_close(view(out), ref, atol=2e-5, rtol=1e-4)  # every element written, in place
    qs = torch.randn(50, 3, heads * d, device=KERNEL_DEVICE).view(50, 3, heads, d).transpose(1, 2)
    torch.testing.assert_close(sa.short_axis_sdpa(qs, qs * 0.5, qs + 1),
                               F.scaled_dot_product_attention(qs, qs * 0.5, qs + 1), atol=2e-5, rtol=1e-4)
    q.requires_grad_(True)
    with torch.enable_grad():
        assert "gradients" in sa.kernel_applies(view(q), view(k), view(v), heads)


@needs_kernel
def test_sv4d_grid_path_with_the_kernel_follows_the_sequence_path(monkeypatch):
    monkeypatch.setenv(sa.ENV, "triton")
    net = _sv4d("sv4d2").to(KERNEL_DEVICE)
    inp = _sv4d_inputs(batch=1, frames=3, views=4, size=8, device=KERNEL_DEVICE)
    lay = net.token_layout(12, 4, 3, 8, 8)
    with torch.no_grad():
        grid = net(**inp)  # the default: the grid path, since the kernel runs here
        seq = net(**inp, dispatch=FullCompute(lay, grid=False))
    torch.testing.assert_close(grid, seq, atol=1e-4, rtol=1e-3)
    assert os.environ[sa.ENV] == "triton"


@needs_kernel
def test_sdpa_backend_with_fewer_queries_than_keys_reads_every_key():
    # Token reuse's spatial attention: k kept queries (here 4, a length the kernel takes) against
    # all keys of the image (64). The kernel's views would have cut the keys to the queries' length.
    heads, d = 2, 16
    k, v = (torch.randn(6, 64, heads, d, device=KERNEL_DEVICE).transpose(1, 2) for _ in range(2))
    q = torch.randn(6, 4, heads, d, device=KERNEL_DEVICE).transpose(1, 2)
    torch.testing.assert_close(sa.short_axis_sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-5, rtol=1e-4)
