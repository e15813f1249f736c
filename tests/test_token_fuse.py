"""The fused steps of a token-level block call (turbo_core/kernels/token_fuse.py): the Triton
kernels (where Triton runs: a CUDA GPU, or the CPU under TRITON_INTERPRET=1; skipped otherwise)
equal the PyTorch operations they replace within round-off, a token-reuse run through them equals
the run through those operations and counts the same work, and the switch names its fix."""
import pytest
import torch

from accel_fixtures import F, V, grid_inputs, rel_err, sample
from per_call_fixtures import LinearRows, deep_net
from turbo_core.accel.token_reuse import TokenReuseConfig
from turbo_core.kernels import token_fuse as tf

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(tf.why_not(torch.empty(1, device=KERNEL_DEVICE)) is not None,
                                  reason="the token kernels need Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [32, 192, 320])
def test_kernels_equal_the_unfused_operations(dtype, width, monkeypatch):
    monkeypatch.setenv(tf.ENV, "triton")
    torch.manual_seed(width)
    n, t = 5, 23  # rows not a multiple of a program's rows
    dev = KERNEL_DEVICE
    x = torch.randn(n, t, width, device=dev).to(dtype)
    e = torch.randn(n, width, device=dev).to(dtype)
    norm = torch.nn.LayerNorm(width).to(dev, dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        for add in (e, None):
            got, ref = tf.add_layernorm(x, add, norm), tf.reference_add_layernorm(x, add, norm)
            assert got.dtype == dtype and got.shape == ref.shape
            assert (got.float() - ref.float()).abs().max() <= TOL[dtype] * ref.float().abs().max()
        half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        r = torch.randn(n, t, width, device=dev).to(half)
        rows = torch.randperm(n * t, device=dev)[:31]
        h = torch.randn(31, width, device=dev).to(dtype)
        got = tf.fill_rows(x, r, 1 / 3, h, rows, tf.inverse_rows(rows, n * t))
        ref = torch.add(x, r, alpha=1 / 3).view(n * t, width).index_copy(0, rows, h).view(n, t, width)
        assert torch.equal(got.view(n * t, width)[rows], h)  # the kept rows exactly
        assert (got.float() - ref.float()).abs().max() <= TOL[dtype] * ref.float().abs().max()


@needs_kernel
def test_token_reuse_through_the_kernels_equals_the_unfused_run(monkeypatch):
    net = deep_net(5).to(KERNEL_DEVICE)
    inputs = tuple(t.to(KERNEL_DEVICE) for t in grid_inputs(net, V, F))
    cfg = TokenReuseConfig(threshold=1.0, spans=1, max_cache_mb=1000.0)
    monkeypatch.setenv(tf.ENV, "torch")
    ref, st_ref = sample(net, [("token_reuse", cfg)], inputs)
    monkeypatch.setenv(tf.ENV, "triton")
    got, st = sample(net, [("token_reuse", cfg)], inputs)
    assert st.summary()["tokens_computed"] == st_ref.summary()["tokens_computed"] > 0
    assert rel_err(got, ref) < 1e-4


@needs_kernel
def test_full_compute_through_the_kernels_equals_the_unfused_run_and_its_layers_see_the_same_rows(monkeypatch):
    # Full compute takes the fused norm too (every accelerator is measured against the same
    # kernels); the linear layers' hooks (per_call_fixtures.LinearRows) still see every row, only
    # the norms' hooks do not (tests counting norms set TURBO4D_TOKEN_FUSE=torch).
    net = deep_net(5).to(KERNEL_DEVICE)
    inputs = tuple(t.to(KERNEL_DEVICE) for t in grid_inputs(net, V, F))
    counts = {}
    for m in ("torch", "triton"):
        monkeypatch.setenv(tf.ENV, m)
        rows = LinearRows(net)
        counts[m] = (sample(net, [], inputs)[0], dict(rows.rows))
        rows.close()
    (ref, ref_rows), (got, got_rows) = counts["torch"], counts["triton"]
    assert rel_err(got, ref) < 1e-4
    for key, n in ref_rows.items():
        assert got_rows.get(key, 0) == (0 if key.endswith(".norm") else n), key


def test_full_compute_norms_go_through_the_fused_path(monkeypatch):
    # TURBO4D_TOKEN_FUSE=triton where the kernels cannot run raises from the norm of a full call:
    # the full forward's norms are token_fuse.add_layernorm, so a GPU runs them through the kernel.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    net = deep_net(5)
    inputs = grid_inputs(net, V, F)
    monkeypatch.setenv(tf.ENV, "triton")
    with pytest.raises(RuntimeError, match="TURBO4D_TOKEN_FUSE=triton"):
        sample(net, [], inputs)
    monkeypatch.setenv(tf.ENV, "torch")
    rows = LinearRows(net)
    sample(net, [], inputs)
    rows.close()
    # Off the kernels every norm is its module: its hooks see each row it normalises.
    assert rows.rows["spatial.norm"] == rows.rows["camera.norm"] == rows.rows["motion.norm"] > 0


def test_forcing_the_kernels_where_they_cannot_run_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(tf.ENV, "triton")
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="TURBO4D_TOKEN_FUSE=triton.*unset TURBO4D_TOKEN_FUSE"):
        tf.add_layernorm(x, None, torch.nn.LayerNorm(8))
    monkeypatch.setenv(tf.ENV, "fast")
    with pytest.raises(ValueError, match="TURBO4D_TOKEN_FUSE='fast'"):
        tf.fused(x)



def test_each_kernel_module_reads_its_own_switch(monkeypatch):
    # The token kernels and the short-axis kernel share one switch (kernels/switch.py), each under
    # its own variable: setting one leaves the other at its default.
    from turbo_core.kernels import short_axis as sa

    assert tf.ENV == "TURBO4D_TOKEN_FUSE" and sa.ENV == "TURBO4D_SHORT_AXIS"
    monkeypatch.delenv(sa.ENV, raising=False)
    monkeypatch.setenv(tf.ENV, " Torch ")
    assert (tf.mode(), sa.mode()) == ("torch", "auto")
    monkeypatch.delenv(tf.ENV)
    monkeypatch.setenv(sa.ENV, "triton")
    assert (tf.mode(), sa.mode()) == ("auto", "triton")
    monkeypatch.setenv(sa.ENV, "fast")
    with pytest.raises(ValueError, match="TURBO4D_SHORT_AXIS='fast'"):
        sa.mode()
    assert tf.mode() == "auto"

def test_unfused_path_runs_the_modules_so_their_work_is_seen(monkeypatch):
    # Off the kernels (CPU, or TURBO4D_TOKEN_FUSE=torch) the norm is the module itself: its hooks
    # (per_call_fixtures.LinearRows) see every row it normalises.
    monkeypatch.setenv(tf.ENV, "torch")
    norm = torch.nn.LayerNorm(8)
    seen = []
    norm.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    x, e = torch.randn(2, 3, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(tf.add_layernorm(x, e, norm), norm(x + e[:, None]))
    assert seen[0] == (2, 3, 8)
