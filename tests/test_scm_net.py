"""The reference network: attention equals a naive reference on every axis, the dispatch sees every
sub-attention, weights round-trip through safetensors, and dtypes agree."""
import json
import os

import pytest
import torch

from turbo_core.dispatch import SCMDispatch, naive_attention
from turbo_core.layout import SCMLayout
from turbo_core.models import CONFIGS, SCMNet
from turbo_core.models.io import CheckpointError, load_model, read_metadata, save_model


def random_net(name="tiny", seed=0, std=0.05):
    torch.manual_seed(seed)
    net = SCMNet(CONFIGS[name])
    with torch.no_grad():
        for p in net.parameters():  # the real init zeroes output projections: test a net that computes
            p.normal_(0, std)
    return net.eval()


def inputs(net, views=3, frames=4, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = batch * views * frames
    s = net.cfg.image_size
    x = torch.randn(n, net.cfg.in_channels, s, s, generator=g)
    cam = torch.rand(n, 2, generator=g)
    return x, torch.full((n,), 0.3), cam


def einsum_axis_reference(mod, seqs):
    """A sub-attention written out with einsum, independent of the module's own reshapes."""
    s, l, c = seqs.shape
    hd = c // mod.heads
    qkv = mod.qkv(mod.norm(seqs)).view(s, l, 3, mod.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.einsum("slhd,smhd->shlm", q, k) / hd ** 0.5
    o = torch.einsum("shlm,smhd->slhd", w.softmax(-1), v).reshape(s, l, c)
    return mod.proj(o)


@pytest.mark.parametrize("axis", ["spatial", "camera", "motion"])
def test_each_axis_equals_einsum_reference(axis):
    net = random_net()
    lay = SCMLayout(2, 3, 4, net.cfg.grid, net.cfg.grid)
    blk = net.blocks[0]
    mod = getattr(blk, axis)
    x = torch.randn(lay.images, lay.tokens, net.cfg.width)
    seqs = lay.to_axis(x, axis)
    d = SCMDispatch(lay)
    out = d.attend(0, axis, seqs, lambda s, idx: mod(s, d.attention))
    ref = einsum_axis_reference(mod, seqs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # The attention really crosses the right axis: changing one view of one sequence changes only
    # that sequence's outputs.
    seqs2 = seqs.clone()
    seqs2[0, -1] += torch.randn(seqs.shape[-1])  # not a constant: LayerNorm would remove it
    out2 = mod(seqs2, d.attention)
    assert not torch.allclose(out2[0, 0], out[0, 0])
    torch.testing.assert_close(out2[1:], out[1:])


def test_sdpa_and_naive_backends_agree():
    q, k, v = (torch.randn(5, 2, 7, 8) for _ in range(3))
    torch.testing.assert_close(SCMDispatch(SCMLayout(1, 1, 1, 1, 1)).attention(q, k, v), naive_attention(q, k, v),
                               atol=1e-5, rtol=1e-4)


class Recorder:
    name = "recorder"

    def __init__(self):
        self.seen = []

    def attend(self, d, block, axis, seqs, index, nxt):
        self.seen.append((block, axis, tuple(seqs.shape)))
        return nxt(seqs, index)

    def chain(self, d, block, x, nxt):
        self.seen.append((block, "chain", tuple(x.shape)))
        return nxt(x)


def test_every_sub_attention_goes_through_the_dispatch():
    net = random_net()
    x, c, cam = inputs(net, views=3, frames=4)
    lay = net.token_layout(x.shape[0], 3, 4)
    rec = Recorder()
    d = SCMDispatch(lay, accelerators=[rec])
    with torch.no_grad():
        out = net(x, c, cam, 3, 4, dispatch=d)
        ref = net(x, c, cam, 3, 4)
    assert torch.equal(out, ref)
    expect = []
    for b in range(net.depth):
        expect += [(b, "chain", (lay.images, lay.tokens, net.cfg.width)),
                   (b, "spatial", (lay.images, lay.tokens, net.cfg.width)),
                   (b, "camera", (lay.axis_shape("camera")[0], 3, net.cfg.width)),
                   (b, "motion", (lay.axis_shape("motion")[0], 4, net.cfg.width))]
    assert rec.seen == expect


def test_views_and_frames_interact_through_camera_and_motion():
    net = random_net().double()  # two hops through small random weights: keep rounding out of it
    x, c, cam = inputs(net, views=3, frames=4)
    x, cam = x.double(), cam.double()
    with torch.no_grad():
        base = net(x, c, cam, 3, 4)
        x2 = x.clone()
        x2[0] += torch.randn_like(x2[0])  # image (frame 0, view 0)
        out = net(x2, c, cam, 3, 4)
    changed = (out - base).flatten(1).abs().amax(1) > 1e-10
    assert changed.all(), "every image of the grid sees every other through camera + motion attention"


def test_out_of_range_views_frames_are_named():
    net = random_net()
    x, c, cam = inputs(net, views=3, frames=4)
    with pytest.raises(ValueError, match="at most"):
        net.token_layout(x.shape[0], net.cfg.max_views + 1, 1)
    with pytest.raises(ValueError, match="multiple of views"):
        net(x[:-1], c[:-1], cam[:-1], 3, 4)
    with pytest.raises(ValueError, match="does not fit"):
        net(x[:, :2], c, cam, 3, 4)


def test_safetensors_round_trip(tmp_path):
    net = random_net()
    p = tmp_path / "m.safetensors"
    save_model(net, str(p), metadata={"steps": 7})
    meta = read_metadata(str(p))
    assert json.loads(meta["config"]) == net.cfg.to_dict()
    assert meta["steps"] == "7"
    net2 = load_model(str(p))
    for (k, a), (k2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, c, cam = inputs(net)
    with torch.no_grad():
        assert torch.equal(net(x, c, cam, 3, 4), net2(x, c, cam, 3, 4))


def test_bad_weight_files_are_named(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(missing))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + os.urandom(64))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(str(corrupt))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a Turbo4D"):
        load_model(str(foreign))
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(str(pickled))
    truncated = tmp_path / "trunc.safetensors"
    save_model(random_net(), str(truncated))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(str(truncated))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_fp32(dtype):
    net = random_net()
    x, c, cam = inputs(net)
    with torch.no_grad():
        ref = net(x, c, cam, 3, 4)
        low = net.to(dtype)(x, c, cam, 3, 4).float()
    err = (low - ref).abs().max().item()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert err < tol * max(1.0, ref.abs().max().item()), err


def test_backward_runs_and_reaches_every_parameter():
    net = random_net()
    x, c, cam = inputs(net)
    net(x, c, cam, 3, 4).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not dead, dead


def test_token_stream_is_contiguous_through_the_blocks():
    # The patch embedding's transpose once carried channel-first strides through every residual
    # sum, so every LayerNorm and Linear of every block copied the stream first.
    torch.manual_seed(0)
    net = SCMNet(CONFIGS["tiny"]).eval()
    seen = []
    for blk in net.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        blk.register_forward_hook(lambda m, args, out: seen.append(out.is_contiguous()))
    x = torch.randn(6, net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)
    with torch.no_grad():
        net(x, torch.zeros(6), torch.zeros(6, 2), views=3, frames=2)
    assert seen and all(seen)
