"""TrajectoryCrafter's transformer in turbo_core: key-exact at full size (built on the meta device,
no memory), every attention through the dispatch as the joint / perceiver axes, the perceiver's
reference keys/values computed once per run, bf16, and clear errors for wrong inputs.
Faithfulness to the original and to diffusers: test_trajectorycrafter_faithful.py."""
import os

import pytest
import torch

from turbo_core.accel.base import Accelerator
from turbo_core.dispatch import FullCompute, SCMDispatch, sdpa
from turbo_core.layout import JointLayout
from turbo_core.models.trajectorycrafter import (CONFIGS, PerceiverReference, TrajectoryCrafterTransformer,
                                                 build_trajectorycrafter, parameter_count)

KEYS = os.path.join(os.path.dirname(__file__), "data", "trajectorycrafter_transformer_keys.tsv")


def reference_keys():
    out = {}
    for line in open(KEYS):
        k, s = line.rstrip("\n").split("\t")
        out[k] = tuple(int(v) for v in s.strip("()").split(",") if v.strip())
    return out


def test_state_dict_is_key_exact_at_full_size():
    """The 1,173 tensors of CrossTransformer3DModel on CogVideoX-Fun-V1.1-5b-InP, names and shapes."""
    net = build_trajectorycrafter(CONFIGS["full"], "meta")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = reference_keys()
    assert len(want) == 1173
    assert sorted(set(want) - set(ours)) == [] and sorted(set(ours) - set(want)) == []
    assert {k: s for k, s in ours.items() if want[k] != s} == {}
    assert parameter_count(CONFIGS["full"]) == 6_099_432_000
    assert net.cfg.num_perceivers == 21 and [net.perceiver_index(i) for i in (0, 1, 2, 40, 41)] == [0, None, 1, 20, None]


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = TrajectoryCrafterTransformer(CONFIGS["tiny"])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
            elif not name.endswith("weight"):
                p.normal_(0, 0.05)
    return net.eval()


def call(batch=2, frames=2, h=4, w=6, text=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(batch, frames, 16, h, w, generator=g),
                inpaint=torch.randn(batch, frames, 17, h, w, generator=g),
                text=torch.randn(batch, text, 24, generator=g),
                timestep=torch.full((batch,), 500))


def ref_latents(batch=1, seed=2):
    return torch.randn(batch, 2, 16, 4, 6, generator=torch.Generator().manual_seed(seed))


class Counter:
    def __init__(self, modules):
        self.n = 0
        for m in modules:
            m.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


def test_reference_keys_values_computed_once_per_run():
    """Three CFG steps (batch 2: both halves in one call) read one PerceiverReference: the reference
    is patch-embedded once and each perceiver projects its keys/values once, while its queries are
    computed every call; the output equals computing the reference inside every call."""
    net = tiny_net()
    embeds = Counter([net.ref_patch_embed])
    kv = Counter([m.to_kv for m in net.perceiver_cross_attention])
    q = Counter([m.to_q for m in net.perceiver_cross_attention])
    steps, n_perc = 3, net.cfg.num_perceivers
    with torch.no_grad():
        run_ref = net.reference(ref_latents())
        cached = [net(**call(), reference=run_ref) for _ in range(steps)]
        assert (embeds.n, kv.n, q.n) == (1, n_perc, steps * n_perc)
        per_call = [net(**call(), reference=ref_latents()) for _ in range(steps)]
    assert (embeds.n, kv.n) == (1 + steps, n_perc * (1 + steps))  # the uncached path: once per call
    for a, b in zip(cached, per_call):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_rows_follow_the_batch():
    """One reference serves both CFG halves; a batch of two references serves a call of batch 4 as
    [r0, r1, r0, r1] (cond and uncond stacked), also when a dispatch narrows to some rows."""
    net = tiny_net()
    refs = ref_latents(batch=2)
    with torch.no_grad():
        both = net.reference(refs)
        kw = call(batch=4)
        out = net(**kw, reference=both)
        stacked = net(**kw, reference=torch.cat([refs, refs]))
        torch.testing.assert_close(out, stacked, rtol=0, atol=1e-6)
        one = net.reference(refs[:1])
        k, v = one.rows(0, None, 3)
        assert k.shape[0] == 3 and k.stride(0) == 0  # a broadcast view, no copy
        k, v = both.rows(1, torch.tensor([3, 0]), 2)
        torch.testing.assert_close(k, both.kv[1][0][[1, 0]])
        with pytest.raises(ValueError, match="multiple of it"):
            net(**call(batch=3), reference=both)


class Recorder(Accelerator):
    """Logs every dispatched sub-attention and chain; computes each sub-attention in two halves
    of its sequences (through `index`), as an accelerator narrowing the work would."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.log = []

    def attend(self, dispatch, block, axis, seqs, index, nxt):
        self.log.append((block, axis, tuple(seqs.shape)))
        half = seqs.shape[0] // 2
        rows = torch.arange(seqs.shape[0])
        return torch.cat([nxt(seqs[:half], rows[:half]), nxt(seqs[half:], rows[half:])])

    def chain(self, dispatch, block, x, nxt):
        self.log.append((block, "chain", tuple(x.shape)))
        return nxt(x)


def test_every_attention_goes_through_the_dispatch():
    net = tiny_net()
    kw = call(batch=2, frames=2, h=4, w=6, text=5)
    calls = []

    def counting(q, k, v):
        calls.append((q.shape[0], q.shape[2], k.shape[2]))
        return sdpa(q, k, v)

    ref = net.reference(ref_latents(batch=2)[:, :1])  # 6 reference tokens, 12 video tokens
    layout = net.token_layout(2, 5, 2, 4, 6, ref.tokens)
    assert layout == JointLayout(2, 5, 2, 2, 3, 6) and layout.axis_shape("joint") == (2, 17)
    rec = Recorder()
    with torch.no_grad():
        full = net(**kw, reference=ref)
        out = net(**kw, reference=ref, dispatch=SCMDispatch(layout, None, [rec], backend=counting))
    torch.testing.assert_close(out, full, rtol=0, atol=1e-6)
    joint, video, width = 5 + 12, 12, net.cfg.inner_dim
    want = []
    for i in range(net.depth):
        want += [(i, "chain", (2, joint, width)), (i, "joint", (2, joint, width))]
        if i % 2 == 0:
            want.append((i, "perceiver", (2, video, width)))
    assert rec.log == want
    # Each sub-attention ran as two halves of one sequence each, through the dispatch's backend.
    n_joint, n_perc = net.depth, net.cfg.num_perceivers
    assert calls.count((1, joint, joint)) == 2 * n_joint and calls.count((1, video, 6)) == 2 * n_perc
    assert len(calls) == 2 * (n_joint + n_perc)


def test_joint_layout_routes_only_its_axes():
    lay = JointLayout(2, 5, 2, 2, 3, 12)
    d = FullCompute(lay)
    x = torch.randn(2, 17, 8)
    assert d.attend(0, "joint", x, lambda s, idx: s * 2).equal(x * 2)
    with pytest.raises(ValueError, match="unknown axis 'spatial' for JointLayout"):
        d.attend(0, "spatial", x, lambda s, idx: s)
    with pytest.raises(ValueError, match="JointLayout.frames must be >= 1"):
        JointLayout(1, 5, 0, 2, 2)


def test_bf16_follows_fp32():
    net = tiny_net()
    kw = call()
    with torch.no_grad():
        ref = net(**kw, reference=net.reference(ref_latents()))
        net.to(torch.bfloat16)
        out = net(**kw, reference=net.reference(ref_latents()))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 0.05


def test_wrong_inputs_name_the_input_and_the_fix():
    net = tiny_net()
    kw = call()
    with pytest.raises(ValueError, match="needs a reference"):
        net(**kw)
    with pytest.raises(ValueError, match=r"\(batch, frames, 33, height, width\)"):
        net(**{**kw, "inpaint": kw["inpaint"][:, :, :16]}, reference=ref_latents())
    with pytest.raises(ValueError, match=r"reference latents must be \(batch, frames, 16"):
        net.reference(torch.randn(1, 2, 4, 4, 6))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(**{k: (v[..., :5] if k in ("latents", "inpaint") else v) for k, v in kw.items()},
            reference=ref_latents())
    assert isinstance(net.reference(ref_latents()), PerceiverReference)


def test_the_network_needs_no_diffusers_and_the_vae_says_how_to_get_it(monkeypatch):
    """turbo_core's TrajectoryCrafter network is plain PyTorch; only the VAE comes from diffusers,
    imported when a VAE is built, with the fix in the message when it is missing."""
    import subprocess
    import sys

    from turbo_core.models import cogvideox_vae

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['diffusers'] = None; import turbo_core.models.trajectorycrafter, "
            "turbo_core.models.cogvideox_vae")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `from diffusers import ...` now fails
    with pytest.raises(ImportError, match=r"pip install 'diffusers>=0.32'"):
        cogvideox_vae.build()
