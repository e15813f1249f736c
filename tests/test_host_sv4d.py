"""SV4D / SV4D 2.0 in ComfyUI.

In-process (the real ComfyUI code of the host, CPU): ComfyUI's V_PREDICTION_EDM path denoises as
SV4D's VScalingWithEDMcNoise denoiser; its karras scheduler and euler sampler are the reference's
EDM discretisation and Euler EDM sampler; an alternating pass reverses the frames at even steps and
keeps the accelerator state per order; MultiView Sampler (SV4D) runs both schemes with a real
ComfyUI CLIP vision model and VAE (small configurations of ComfyUI's own classes).

On the real server: a reduced-width SV4D 2.0 checkpoint saved by the test loads through the
Turbo4D Model Loader from ComfyUI's diffusion_models folder (and a full-layout file from
checkpoints), and the shipped SV4D workflows run with the file names substituted by the test's
small weights (the smallest CLIP vision ComfyUI's loader accepts, a TAESD-structured VAE).
"""
import copy
import functools
import json
import math
import os

import pytest
import torch

from conftest import ROOT, import_pack_nodes

CLIP_DIM = 64  # the in-process CLIP vision's projection width


@pytest.fixture(scope="module")
def pack():
    """The pack's nodes package imported the way ComfyUI imports it."""
    return import_pack_nodes()


@functools.lru_cache(maxsize=None)
def random_sv4d(version="sv4d2", seed=0, context_dim=CLIP_DIM, use_3d_attention=None):
    """A reduced-width SV4D UNet with every weight perturbed (zero-initialised output layers would
    make any comparison trivial). Shared between tests: nothing here changes its weights.
    use_3d_attention=False with "sv4d2" is SV4D 2.0's 8-view model."""
    from turbo_core.models.sv4d import SV4DConfig, SV4DUNet

    torch.manual_seed(seed)
    net = SV4DUNet(SV4DConfig.reduced(version, context_dim=context_dim, use_3d_attention=use_3d_attention)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    return net


def pass_conditioning(g, T, V, hw, alternate, seed=1, uncond=False):
    gen = torch.Generator().manual_seed(seed)
    n = T * V
    clip = torch.randn(T, CLIP_DIM, generator=gen)[torch.arange(T).repeat_interleave(V)][:, None]
    concat = torch.randn(T, 4, hw, hw, generator=gen).repeat_interleave(V, 0)
    k = 2 if alternate else 1
    cond_view = torch.randn(V, 4 * k, hw, hw, generator=gen).repeat(T, 1, 1, 1)
    polar, az = torch.full((V,), 1.4), torch.linspace(0.5, 5.0, V)
    z = torch.zeros_like
    return {"cross_attn": z(clip) if uncond else clip, g.COND_CONCAT: z(concat) if uncond else concat,
            g.COND_VECTOR: g.vector_condition(polar, az, T, uncond), g.COND_VIEW: z(cond_view) if uncond else cond_view,
            g.COND_VIEWS: V, g.COND_FRAMES: T, g.COND_ALTERNATE: alternate}


def model_kwargs(model, conds, x):
    out = model.extra_conds(**conds, device=x.device, noise=x)
    assert set(out) == {"c_concat", "c_crossattn", "y", "cond_view", "views", "frames", "alternate"}
    return {k: v.cond for k, v in out.items()}


# --- the denoiser and the schedule -------------------------------------------------------------
def test_comfy_v_prediction_edm_is_sv4d_denoiser(pack):
    """Denoiser(VScalingWithEDMcNoise): D = c_skip x + c_out F(cat[c_in x, concat], 0.25 ln s) with
    c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_in = 1/sqrt(s^2+1)."""
    g = pack("model_sv4d")
    net = random_sv4d()
    model = g.make_sv4d_model_patcher(net, torch.float32).model
    ms = model.model_sampling
    assert float(ms.sigma_data) == 1.0
    assert float(ms.sigma_min) == pytest.approx(0.002, rel=1e-4) and float(ms.sigma_max) == pytest.approx(700.0, rel=1e-4)
    assert model.latent_format.scale_factor == pytest.approx(0.18215)
    T, V, hw = 2, 4, 8
    conds = pass_conditioning(g, T, V, hw, alternate=False)
    sigma = torch.tensor([0.002, 0.1, 1.0, 5.0, 30.0, 120.0, 400.0, 700.0])
    x = torch.randn(T * V, 4, hw, hw) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        comfy_out = model.apply_model(x, sigma, transformer_options={}, **model_kwargs(model, conds, x))
        s = sigma.view(-1, 1, 1, 1)
        c_skip, c_out, c_in = 1 / (s ** 2 + 1), -s / (s ** 2 + 1).sqrt(), 1 / (s ** 2 + 1).sqrt()
        f = net(torch.cat([x * c_in, conds[g.COND_CONCAT]], 1), 0.25 * sigma.log(), conds["cross_attn"],
                conds[g.COND_VECTOR], conds[g.COND_VIEW][:V], V, T)
        ref = c_skip * x + c_out * f
    assert (ref - c_skip * x).abs().max() > 0.1  # the network's term is not negligible
    torch.testing.assert_close(comfy_out, ref, rtol=1e-4, atol=1e-4)


def test_karras_euler_is_the_reference_edm_euler(pack):
    """ComfyUI's karras scheduler on the SV4D model equals EDMDiscretization(0.002, 700, rho 7) with
    0 appended; its noise scaling at full denoise is sqrt(1 + sigma_0^2) (EulerEDMSampler's
    prepare_sampling_loop) and an euler step without churn is x + (s' - s) (x - D) / s."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    from turbo_core.sampling_plans import edm_sigmas

    g = pack("model_sv4d")
    model = g.make_sv4d_model_patcher(random_sv4d(), torch.float32).model
    for steps in (20, 50):
        ramp = torch.linspace(0, 1, steps)  # sgm EDMDiscretization.get_sigmas, then append_zero
        ref = (700.0 ** (1 / 7.0) + ramp * (0.002 ** (1 / 7.0) - 700.0 ** (1 / 7.0))) ** 7.0
        ref = torch.cat([ref, ref.new_zeros(1)])
        ours = comfy.samplers.calculate_sigmas(model.model_sampling, "karras", steps)
        torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(edm_sigmas(steps), ref, rtol=1e-6, atol=0)
    noise, sig = torch.randn(2, 4, 8, 8), torch.tensor(700.0)
    scaled = model.model_sampling.noise_scaling(sig, noise, torch.zeros_like(noise), max_denoise=True)
    torch.testing.assert_close(scaled, noise * math.sqrt(1 + 700.0 ** 2))
    x0 = torch.randn(1, 4, 8, 8)
    den = torch.randn_like(x0)
    sigmas = torch.tensor([3.0, 1.5])
    step = kds.sample_euler(lambda x, s, **k: den, x0.clone(), sigmas, disable=True)
    torch.testing.assert_close(step, x0 + (1.5 - 3.0) * (x0 - den) / 3.0)


def test_vector_condition_is_sv4d_conditioner_layout(pack):
    """y = [Timestep(256)(noise 0) | Timestep(512)(polar) | Timestep(512)(azimuth)] per view, frame-major;
    the uncond branch zeroes the noise-level part only (force_uc_zero_embeddings of cond_frames)."""
    from turbo_core.models.sv4d_blocks import timestep_embedding

    g = pack("model_sv4d")
    polar, az = torch.tensor([1.2, 1.4, 1.5]), torch.tensor([0.5, 2.0, 4.0])
    y = g.vector_condition(polar, az, frames=2, uncond=False)
    assert y.shape == (6, 1280)
    want = torch.cat([timestep_embedding(torch.zeros(3), 256), timestep_embedding(polar, 512),
                      timestep_embedding(az, 512)], 1).repeat(2, 1)
    torch.testing.assert_close(y, want)
    assert y[0, :128].eq(1).all() and y[0, 128:256].eq(0).all()  # cos 0, sin 0
    u = g.vector_condition(polar, az, frames=2, uncond=True)
    assert u[:, :256].eq(0).all() and torch.equal(u[:, 256:], y[:, 256:])


# --- alternating frame order -------------------------------------------------------------------
def test_alternating_pass_reverses_frames_at_even_steps(pack):
    """At step 0, 2, ... the network sees the frames reversed and the reverse reference views (the
    script's backward inputs); the result comes back in frame order. At odd steps: forward."""
    from turbo_core.sampling_plans import edm_sigmas, frame_permutation

    g = pack("model_sv4d")
    net = random_sv4d("sv4d")
    model = g.make_sv4d_model_patcher(net, torch.float32).model
    T, V, hw = 3, 2, 8
    conds = pass_conditioning(g, T, V, hw, alternate=True)
    kw = model_kwargs(model, conds, torch.zeros(T * V, 4, hw, hw))
    sched = edm_sigmas(4)
    perm = frame_permutation(T, V, True)
    outs = {}
    for step in (0, 1):
        sigma = sched[step].expand(T * V)
        x = torch.randn(T * V, 4, hw, hw, generator=torch.Generator().manual_seed(step)) * sched[step]
        to = {"sigmas": sigma, "sample_sigmas": sched}
        with torch.no_grad():
            got = model.apply_model(x, sigma, transformer_options=to, **kw)
            s = sigma.view(-1, 1, 1, 1)
            c_skip, c_out, c_in = 1 / (s ** 2 + 1), -s / (s ** 2 + 1).sqrt(), 1 / (s ** 2 + 1).sqrt()
            inp = torch.cat([x * c_in, conds[g.COND_CONCAT]], 1)
            cv = conds[g.COND_VIEW][:V]
            if step == 0:
                f = net(inp[perm], 0.25 * sigma.log(), conds["cross_attn"][perm], conds[g.COND_VECTOR][perm],
                        cv[:, 4:], V, T)[torch.argsort(perm)]
            else:
                f = net(inp, 0.25 * sigma.log(), conds["cross_attn"], conds[g.COND_VECTOR], cv[:, :4], V, T)
            want = c_skip * x + c_out * f
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        outs[step] = (x, got)
    # the same input at a reversed step gives another result than at a forward step
    x = outs[1][0]
    with torch.no_grad():
        as_even = model.apply_model(x, sched[1].expand(T * V), transformer_options={
            "sigmas": sched[1].expand(T * V), "sample_sigmas": torch.cat([sched[:1], sched])}, **kw)
    assert (as_even - outs[1][1]).abs().max() > 1e-3


def _sample_pass(pack, patcher, T, V, hw, alternate, steps, cfg=2.0):
    import comfy.sample

    g, m = pack("model_sv4d"), pack("model")
    sink = m.StatsSink()
    patcher.model_options.setdefault("transformer_options", {})[m.REPORTS_KEY] = sink
    pos = pass_conditioning(g, T, V, hw, alternate)
    neg = pass_conditioning(g, T, V, hw, alternate, uncond=True)
    to_cond = lambda c: [[c.pop("cross_attn"), c]]  # noqa: E731
    x = torch.zeros(T * V, 4, hw, hw)
    out = comfy.sample.sample(patcher, comfy.sample.prepare_noise(x, 0), steps, cfg, "euler", "karras",
                              to_cond(pos), to_cond(neg), x, disable_pbar=True, seed=0)
    return out, sink.items


def test_accelerated_alternating_pass_keeps_state_per_frame_order(pack):
    """Through ComfyUI's sampler with the Turbo4D cache: every call's stream names its frame order,
    orders alternate starting reversed, the counts are per level (nothing counted as skipped without
    an accelerator), and the cache answers from the same order's earlier call."""
    from turbo_core.accel.presets import preset_config
    from turbo_core.accel.registry import merge_spec

    g, m = pack("model_sv4d"), pack("model")
    base = g.make_sv4d_model_patcher(random_sv4d("sv4d"), torch.float32)
    assert m.is_turbo4d_model(base) and m.get_scm_net(base) is base.model.diffusion_model.net
    full_out, full = _sample_pass(pack, base.clone(), T=3, V=2, hw=8, alternate=True, steps=4)
    st = full[0]
    assert [t["stream"].split("|")[1] for t in st.timeline if t["stream"].startswith("(1, 0)")] == \
        ["reversed", "forward"] * 2
    s = st.summary()
    assert s["tokens_pruned_camera_motion"] == 0 and s["sequences_computed"] == s["sequences_total"]
    assert st.compute_fraction == pytest.approx(1.0)
    fast = base.clone()
    m.set_accelerator_specs(fast, merge_spec([], "cache", preset_config("cache", "fast")))
    out, acc = _sample_pass(pack, fast, T=3, V=2, hw=8, alternate=True, steps=8)
    assert torch.isfinite(out).all()
    assert acc[0].cache_hits > 0 and acc[0].compute_fraction < 1.0, acc[0].format_line()


# --- the sampler node, in-process --------------------------------------------------------------
@pytest.fixture(scope="module")
def small_encoders(pack, tmp_path_factory):
    """A real ComfyUI ClipVisionModel (a small configuration of its CLIP vision class) and a real
    ComfyUI VAE (TAESD structure), random weights."""
    import comfy.clip_vision
    import comfy.sd
    import comfy.taesd.taesd

    pack("model")
    d = tmp_path_factory.mktemp("enc")
    with open(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               projection_dim=CLIP_DIM)
    path = d / "clip_small.json"
    path.write_text(json.dumps(cfg))
    clip = comfy.clip_vision.ClipVisionModel(str(path))
    torch.manual_seed(0)
    clip.load_sd({k: torch.randn_like(v) * 0.05 for k, v in clip.get_sd().items()})
    return clip, comfy.sd.VAE(sd=taesd_state_dict())


def taesd_state_dict(seed=0) -> dict:
    import comfy.taesd.taesd

    torch.manual_seed(seed)
    t = comfy.taesd.taesd.TAESD()
    sd = {k: torch.randn_like(v) * 0.05 for k, v in t.state_dict().items() if k.startswith("taesd_")}
    sd.update(vae_scale=torch.tensor(0.18215), vae_shift=torch.tensor(0.0))  # as ComfyUI's taesd loader sets
    return sd


def run_node(pack, encoders, version, frames, steps=2, size=64, first_frame_views=None, cfg=2.0, seed=0):
    nodes, g = pack("sv4d"), pack("model_sv4d")
    clip, vae = encoders
    model = g.make_sv4d_model_patcher(random_sv4d(version), torch.float32)
    gen = torch.Generator().manual_seed(5)
    video = torch.rand(frames + 1, 48, 80, 3, generator=gen)  # not square: the node crops
    out = nodes.SV4DSampler.execute(model, clip, vae, video, frames, size, 10.0, seed, steps, cfg, 1.0, "euler",
                                    "karras", first_frame_views=first_frame_views)
    return out, video


def test_sampler_node_sv4d2_chunks(pack, small_encoders):
    from turbo_core.sampling_plans import VARIANTS

    frames, V, size = 3, VARIANTS["sv4d2"].views, 64
    out, video = run_node(pack, small_encoders, "sv4d2", frames)
    images, latent, line, stats, layout = out.result
    assert images.shape == ((V + 1) * frames, size, size, 3) and torch.isfinite(images).all()
    assert (layout.views, layout.frames) == (V + 1, frames)  # the input view + V novel ones
    assert latent["samples"].shape == (frames * V, 4, size // 8, size // 8)
    # view 0 is the input video (prepared as the reference script does by default), views 1..V sampled
    from turbo_core.sv4d_input import prepare_sv4d_input

    torch.testing.assert_close(images[:frames], prepare_sv4d_input(video[:frames], size, 0.9))
    assert images[frames:].std() > 0.01
    assert "1 pass:" in line and sorted({t["step"] for t in stats.timeline}) == [0, 1]  # one chunk of 3 frames
    # the stats line says which camera, guidance and input preparation ran
    assert line.endswith("; elevation 0 deg, cfg 1..2 (the model's reference), input: object crop at frame ratio "
                         "0.9, alpha over white, Lanczos"), line


def test_sampler_node_sv4d2_second_chunk_references_the_first(pack, small_encoders):
    """13 frames: chunks 0-11 and 1-12; the second chunk's cond_view is the first chunk's views of
    frame 1, decoded and encoded again; frames 1-11 are rewritten by the second chunk."""
    nodes = pack("sv4d")
    seen = []
    encode = nodes._encode

    def spy(vae, images, latent_size):
        seen.append(images.clone())
        return encode(vae, images, latent_size)

    nodes._encode = spy
    try:
        out, _ = run_node(pack, small_encoders, "sv4d2", 13, steps=1)
    finally:
        nodes._encode = encode
    images, latent, line, stats, layout = out.result
    assert "2 passes" in line and images.shape == (5 * 13, 64, 64, 3) and (layout.views, layout.frames) == (5, 13)
    # input frames, then the reference views of chunk 2: frame 1's 4 novel views as chunk 1 made them
    assert len(seen) == 2 and seen[0].shape[0] == 13 and seen[1].shape[0] == 4
    assert seen[1].std() > 0.01
    final_frame1 = torch.stack([images[v * 13 + 1] for v in range(1, 5)])
    assert (final_frame1 - seen[1]).abs().max() > 1e-3  # the second chunk rewrote frame 1


def test_sampler_node_sv4d_anchor_and_dense_passes(pack, small_encoders):
    frames, size = 5, 64
    sv3d = torch.rand(21, size, size, 3, generator=torch.Generator().manual_seed(2))
    out, _ = run_node(pack, small_encoders, "sv4d", frames, first_frame_views=sv3d)
    images, latent, line, stats, layout = out.result
    assert images.shape == (9 * frames, size, size, 3) and torch.isfinite(images).all()
    assert (layout.views, layout.frames) == (9, frames)
    assert "2 passes" in line  # anchor frame 4, then the dense window 0..4
    streams = [t["stream"] for t in stats.timeline]
    assert any(s.endswith("|reversed") for s in streams) and any(s.endswith("|forward") for s in streams)
    nodes = pack("sv4d")
    with pytest.raises(ValueError, match="first_frame_views"):
        run_node(pack, small_encoders, "sv4d", frames)
    with pytest.raises(ValueError, match="5, 9, 13, 17, 21"):
        run_node(pack, small_encoders, "sv4d", 6, first_frame_views=sv3d)
    with pytest.raises(ValueError, match="21 views"):
        run_node(pack, small_encoders, "sv4d", frames, first_frame_views=sv3d[:4])
    assert nodes.NODE == "MultiView Sampler (SV4D)"


def test_sampler_node_names_a_wrong_clip_vision_and_model(pack, small_encoders):
    nodes, g = pack("sv4d"), pack("model_sv4d")
    clip, vae = small_encoders
    model = g.make_sv4d_model_patcher(random_sv4d("sv4d2", context_dim=CLIP_DIM * 2), torch.float32)
    with pytest.raises(ValueError, match="clip_vision gives 64-d.*needs 128"):
        nodes.SV4DSampler.execute(model, clip, vae, torch.rand(2, 64, 64, 3), 2, 64, 0.0, 0, 1, 2.0, 1.0, "euler",
                                  "karras")
    reference = pack("model").make_model_patcher(__import__("turbo_core.models.scm_net", fromlist=["x"]).SCMNet(
        __import__("turbo_core.models.scm_net", fromlist=["x"]).CONFIGS["tiny"]), torch.float32)
    with pytest.raises(ValueError, match="not SV4D"):
        nodes.SV4DSampler.execute(reference, clip, vae, torch.rand(2, 64, 64, 3), 2, 64, 0.0, 0, 1, 2.0, 1.0,
                                  "euler", "karras")


class _Stop(Exception):
    """Raised by a test's spy once it has what it came for: the sampling itself is not needed."""


def _first_pass_settings(pack, encoders, net, monkeypatch, frames, **kw):
    """{polar, azimuth, cfg, min_cfg, input} of the first pass of MultiView Sampler (SV4D) with the
    widget values elevation 33, cfg 7, min_cfg 0.5 (what the reference would never use), stopped
    before sampling; `kw` are the node's other inputs."""
    nodes, g = pack("sv4d"), pack("model_sv4d")
    clip, vae = encoders
    seen = {}
    encode, scales, vector = nodes._encode, nodes.guidance_scales, g.vector_condition

    def spy_encode(vae_, images, latent_size):
        seen.setdefault("input", images.clone())
        return encode(vae_, images, latent_size)

    def spy_scales(guider, t, v, cfg, min_cfg):
        seen.update(cfg=cfg, min_cfg=min_cfg)
        return scales(guider, t, v, cfg, min_cfg)

    def spy_vector(polar, azimuth, t, uncond):
        seen.update(polar=polar.clone(), azimuth=azimuth.clone())
        raise _Stop

    monkeypatch.setattr(nodes, "_encode", spy_encode)
    monkeypatch.setattr(nodes, "guidance_scales", spy_scales)
    monkeypatch.setattr(g, "vector_condition", spy_vector)
    video = torch.ones(frames, 48, 80, 3)
    video[:, 20:30, 30:44] = torch.rand(frames, 10, 14, 3, generator=torch.Generator().manual_seed(3)) * 0.5
    model = g.make_sv4d_model_patcher(net, torch.float32)
    with pytest.raises(_Stop):
        nodes.SV4DSampler.execute(model, clip, vae, video, frames, 64, 33.0, 0, 1, 7.0, 0.5, "euler", "karras", **kw)
    seen["video"] = video
    return seen


@pytest.mark.parametrize("variant", ["sv4d", "sv4d2", "sv4d2_8views"])
def test_sampler_defaults_are_each_variants_reference_script(pack, small_encoders, monkeypatch, variant):
    """By default the node runs the loaded model's reference-script settings whatever its widgets
    hold: SV4D elevation 10 (polar 80 deg), cfg 2 / 1; SV4D 2.0 elevation 0, 2 / 1; the 8-view
    model 0, 2.5 / 1.5; and prepares the input as the scripts do at their frame ratio. custom
    runs the widgets' values."""
    from turbo_core.sv4d_input import prepare_sv4d_input

    nodes = pack("sv4d")
    spec = {i.id: i for i in nodes.SV4DSampler.define_schema().inputs}
    assert spec["elevation_cfg"].default == "auto" and spec["input_prep"].default == "reference"
    version, use_3d = ("sv4d2", variant == "sv4d2") if variant.startswith("sv4d2") else ("sv4d", None)
    net = random_sv4d(version, use_3d_attention=use_3d)
    frames = 5
    kw = {"first_frame_views": torch.rand(21, 64, 64, 3)} if variant == "sv4d" else {}
    ref = {"sv4d": (10.0, 2.0, 1.0, 0.917), "sv4d2": (0.0, 2.0, 1.0, 0.9), "sv4d2_8views": (0.0, 2.5, 1.5, 0.9)}
    elevation, cfg, min_cfg, ratio = ref[variant]
    got = _first_pass_settings(pack, small_encoders, net, monkeypatch, frames, **kw)
    torch.testing.assert_close(got["polar"], torch.full_like(got["polar"], math.radians(90 - elevation)))
    assert (got["cfg"], got["min_cfg"]) == (cfg, min_cfg)
    torch.testing.assert_close(got["input"], prepare_sv4d_input(got["video"], 64, ratio))
    custom = _first_pass_settings(pack, small_encoders, net, monkeypatch, frames, elevation_cfg="custom",
                                  input_prep="centre crop", **kw)
    torch.testing.assert_close(custom["polar"], torch.full_like(got["polar"], math.radians(90 - 33.0)))
    assert (custom["cfg"], custom["min_cfg"]) == (7.0, 0.5)
    torch.testing.assert_close(custom["input"], nodes._square(custom["video"], 64))


def test_sampler_refuses_unknown_settings_choices(pack, small_encoders):
    nodes, g = pack("sv4d"), pack("model_sv4d")
    clip, vae = small_encoders
    model = g.make_sv4d_model_patcher(random_sv4d("sv4d2"), torch.float32)
    args = (model, clip, vae, torch.rand(2, 64, 64, 3), 2, 64, 0.0, 0, 1, 2.0, 1.0, "euler", "karras")
    with pytest.raises(ValueError, match=r"elevation_cfg='reference'; pick one of \['auto', 'custom'\]"):
        nodes.SV4DSampler.execute(*args, elevation_cfg="reference")
    with pytest.raises(ValueError, match=r"input_prep='lanczos'; pick one of"):
        nodes.SV4DSampler.execute(*args, input_prep="lanczos")


def test_loader_variant_is_refused_for_a_file_that_is_not_sv4d(pack):
    loaders = pack("loaders")
    with pytest.raises(ValueError, match=r"variant='sv4d2_8views' is for SV4D / SV4D 2.0 files, and "
                                         r"'embedded default' is not one.*Set variant to auto"):
        loaders.Turbo4DModelLoader.execute("embedded default", "auto", "sv4d2_8views")
    spec = {i.id: i for i in loaders.Turbo4DModelLoader.define_schema().inputs}
    assert spec["variant"].default == "auto" and spec["variant"].options == ["auto", "sv4d", "sv4d2", "sv4d2_8views"]


def test_loader_tooltip_says_the_embedded_model_is_not_for_real_videos(pack):
    spec = {i.id: i for i in pack("loaders").Turbo4DModelLoader.define_schema().inputs}
    tip = spec["model_name"].tooltip
    assert "real videos" in tip and "blobs" in tip and "MultiView Sampler (SV4D)" in tip and "docs/sv4d.md" in tip


# --- on the real server ------------------------------------------------------------------------
SV4D2_FILE = "sv4d2_reduced_test.safetensors"          # UNet-only, in diffusion_models/
SV4D_FILE = "sv4d_full_layout_reduced_test.safetensors"  # with conditioner / first-stage keys, in checkpoints/
DAMAGED_FILE = "sv4d2_damaged_test.safetensors"
CLIP_FILE = "clip_vision_vitl_random_test.safetensors"
VITL_DIM = 768  # projection width of the smallest CLIP vision ComfyUI's loader builds (ViT-L/14)


def _save_clip_vision_vitl(path):
    """A CLIP vision file ComfyUI's CLIPVisionLoader accepts: the ViT-L/14 structure (the smallest
    its detection builds), random fp16 weights."""
    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops
    from safetensors.torch import save_file

    with open(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.clip_model.CLIPVisionModelProjection(
            cfg, torch.float16, "meta", comfy.ops.manual_cast).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("layer_norm1.weight") or k.endswith("layer_norm2.weight") or k.endswith("layernorm.weight") \
                or k.endswith("pre_layrnorm.weight"):
            sd[k] = torch.ones(shape, dtype=torch.float16)
        else:
            sd[k] = (torch.randn(shape, generator=gen) * 0.02).half()
    save_file(sd, path)


@pytest.fixture(scope="module")
def server_weights(comfy, pack):
    """Reduced-width SV4D 2.0 (UNet only) and SV4D (full Stability layout) checkpoints, a damaged
    one, a ViT-L-structured CLIP vision and TAESD-structured VAE files, in the server's folders."""
    from safetensors.torch import save_file
    from turbo_core.models.sv4d import PREFIX, save_sv4d

    models = comfy.models_directory
    for sub in ("diffusion_models", "checkpoints", "clip_vision", "vae_approx"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    save_sv4d(random_sv4d("sv4d2", context_dim=VITL_DIM), os.path.join(models, "diffusion_models", SV4D2_FILE))
    net = random_sv4d("sv4d", seed=1, context_dim=VITL_DIM)
    full = {PREFIX + k: v.contiguous() for k, v in net.state_dict().items()}
    full["conditioner.embedders.0.open_clip.model.visual.proj"] = torch.zeros(4, 4)
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    save_file(full, os.path.join(models, "checkpoints", SV4D_FILE))
    damaged = dict(full)
    gone = PREFIX + "output_blocks.5.1.motion_blocks.0.attn1.to_q.weight"
    del damaged[gone]
    save_file(damaged, os.path.join(models, "diffusion_models", DAMAGED_FILE))
    _save_clip_vision_vitl(os.path.join(models, "clip_vision", CLIP_FILE))
    taesd = taesd_state_dict()
    for part in ("encoder", "decoder"):
        save_file({k[len(f"taesd_{part}."):]: v.contiguous() for k, v in taesd.items()
                   if k.startswith(f"taesd_{part}.")},
                  os.path.join(models, "vae_approx", f"taesd_{part}.safetensors"))
    return {"gone": gone}


def _workflow(name):
    with open(os.path.join(ROOT, "workflows", "api", f"{name}.json")) as f:
        return json.load(f)


def _by_type(prompt, class_type):
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def _small(prompt, model_file, frames, size=64, steps=2):
    """The shipped workflow with the test's files and a tiny grid."""
    p = copy.deepcopy(prompt)
    for k in _by_type(p, "Turbo4DModelLoader"):
        p[k]["inputs"]["model_name"] = model_file
    for k in _by_type(p, "CLIPVisionLoader"):
        p[k]["inputs"]["clip_name"] = CLIP_FILE
    for k in _by_type(p, "VAELoader"):
        p[k]["inputs"]["vae_name"] = "taesd"
    for k in _by_type(p, "Turbo4DLoadInput"):
        p[k]["inputs"].update(size=size, frame_count=frames)
    for k in _by_type(p, "Turbo4DSV4DSampler"):
        p[k]["inputs"].update(frames=frames, size=size, steps=steps)
    return p


def test_shipped_sv4d_workflows_are_valid_but_for_the_weights(comfy):
    """Submitted unchanged, the only objections are the weight files this machine lacks: every node
    type exists, every link and every other widget value is valid. (The Turbo4D loader's model_name
    is checked when it runs, by the pack, on every ComfyUI version: see test_host_versions.py.)"""
    from comfy_host import PromptRejected

    expected = {"sv4d2_video_to_4d": {"clip_name", "vae_name"}, "sv4d_video_to_4d": {"ckpt_name"}}
    for name, weights in expected.items():
        with pytest.raises(PromptRejected) as e:
            comfy.submit(_workflow(name))
        errors = e.value.body.get("node_errors", {})
        assert errors, e.value.body
        found = set()
        for node_id, err in errors.items():
            for item in err["errors"]:
                assert item["type"] == "value_not_in_list", (name, node_id, item)
                found.add(item["extra_info"]["input_name"])
        assert found == weights, (name, found)


def test_loader_lists_sv4d_files_of_comfy_folders(comfy, server_weights):
    options = comfy.object_info()["Turbo4DModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert SV4D2_FILE in options and SV4D_FILE in options and DAMAGED_FILE in options
    assert "taesd" in comfy.object_info()["VAELoader"]["input"]["required"]["vae_name"][0]
    assert CLIP_FILE in comfy.object_info()["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]


def test_sv4d2_workflow_runs_on_the_reduced_checkpoint(comfy, server_weights):
    frames, size, views = 2, 64, 5
    prompt = _small(_workflow("sv4d2_video_to_4d"), SV4D2_FILE, frames, size)
    entry = comfy.run(prompt, timeout=300)
    save = _by_type(prompt, "Turbo4DSaveMultiView")[0]
    out = entry["outputs"][save]
    assert out["grid"][0]["views"] == views and out["grid"][0]["frames"] == frames
    from PIL import Image
    grid = os.path.join(comfy.output_directory, out["images"][0]["subfolder"], out["images"][0]["filename"])
    assert Image.open(grid).size == (frames * size, views * size)
    texts = [t for o in entry["outputs"].values() for t in o.get("text", [])]
    assert texts and texts[0].startswith("Turbo4D SV4D 2.0, 1 pass:"), texts
    # The Cache node took its preset's SV4D variant on this model, and the run says so.
    assert "Turbo4D Cache balanced: the SV4D variant of the preset" in texts[0], texts[0]


def test_sv4d_workflow_runs_on_a_full_layout_checkpoint(comfy, server_weights):
    """SV4D's workflow with SV3D replaced by the input's first frame repeated 21 times (SV3D's own
    weights cannot be had here) and the CLIP vision / VAE of the test."""
    frames, size = 5, 64
    p = _small(_workflow("sv4d_video_to_4d"), SV4D_FILE, frames, size)
    for t in ("ImageOnlyCheckpointLoader", "VideoTriangleCFGGuidance", "SVD_img2vid_Conditioning", "KSampler",
              "VAEDecode"):
        for k in _by_type(p, t):
            del p[k]
    p["clip"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_FILE}}
    p["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    first = _by_type(p, "ImageFromBatch")[0]
    p["sv3d_views"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [first, 0], "amount": 21}}
    smp = _by_type(p, "Turbo4DSV4DSampler")[0]
    p[smp]["inputs"].update(clip_vision=["clip", 0], vae=["vae", 0], first_frame_views=["sv3d_views", 0])
    entry = comfy.run(p, timeout=300)
    out = entry["outputs"][_by_type(p, "Turbo4DSaveMultiView")[0]]
    assert out["grid"][0]["views"] == 9 and out["grid"][0]["frames"] == frames
    texts = [t for o in entry["outputs"].values() for t in o.get("text", [])]
    assert texts and texts[0].startswith("Turbo4D SV4D, 2 passes:"), texts


RENAMED_FILE = "my_model_renamed_test.safetensors"  # an SV4D 2.0-keyed file whose name says nothing


@pytest.fixture(scope="module")
def renamed_weights(comfy, server_weights):
    """A reduced SV4D 2.0 UNet saved as Stability ships theirs (no Turbo4D metadata) under a name
    that does not say 8-view: only the loader's variant can tell it is the 8-view model."""
    from safetensors.torch import save_file
    from turbo_core.models.sv4d import PREFIX

    net = random_sv4d("sv4d2", context_dim=VITL_DIM)
    save_file({PREFIX + k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(comfy.models_directory, "diffusion_models", RENAMED_FILE))
    return RENAMED_FILE


def test_renamed_8view_file_runs_as_the_8view_model_with_its_guidance(comfy, renamed_weights):
    """The SV4D 2.0 workflow on a renamed 8-view file with the loader's variant = sv4d2_8views:
    the sampler runs the 8-view scheme (8 novel views, camera attention over the views) with the
    8-view model's reference guidance 2.5 / 1.5, though the workflow's widgets say 2 / 1."""
    prompt = _small(_workflow("sv4d2_video_to_4d"), renamed_weights, 2, steps=1)
    prompt[_by_type(prompt, "Turbo4DModelLoader")[0]]["inputs"]["variant"] = "sv4d2_8views"
    save = _by_type(prompt, "Turbo4DSaveMultiView")[0]
    if "views" in prompt[save]["inputs"]:
        prompt[save]["inputs"]["views"] = 9
    entry = comfy.run(prompt, timeout=600)
    assert entry["outputs"][save]["grid"][0]["views"] == 9
    texts = [t for o in entry["outputs"].values() for t in o.get("text", [])]
    assert texts and texts[0].startswith("Turbo4D SV4D 2.0 (8 views), 1 pass:"), texts
    assert "elevation 0 deg, cfg 1.5..2.5 (the model's reference)" in texts[0], texts


def test_loader_variant_that_contradicts_the_tensors_names_the_fix(comfy, server_weights):
    from comfy_host import PromptFailed

    prompt = _small(_workflow("sv4d2_video_to_4d"), SV4D_FILE, 2)  # an SV4D file where SV4D 2.0 is asked for
    prompt[_by_type(prompt, "Turbo4DModelLoader")[0]]["inputs"]["variant"] = "sv4d2"
    with pytest.raises(PromptFailed) as e:
        comfy.run(prompt, timeout=120)
    assert e.value.node_type == "Turbo4DModelLoader"
    msg = e.value.message
    assert SV4D_FILE in msg and "variant='sv4d2' asks for SV4D 2.0" in msg and "Set variant to 'auto' or 'sv4d'" in msg


def test_damaged_sv4d_file_names_the_missing_key(comfy, server_weights):
    from comfy_host import PromptFailed

    prompt = _small(_workflow("sv4d2_video_to_4d"), DAMAGED_FILE, 2)
    with pytest.raises(PromptFailed) as e:
        comfy.run(prompt, timeout=120)
    msg = e.value.message
    assert e.value.node_type == "Turbo4DModelLoader"
    assert DAMAGED_FILE in msg and server_weights["gone"] in msg, msg
