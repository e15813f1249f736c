"""The model glue inside the real ComfyUI code (imported in-process from the host tree, CPU only):
ComfyUI's EDM path denoises exactly like turbo_core.diffusion.EDM, the forward goes through the
DIFFUSION_MODEL wrapper executor (what EasyCache hooks), the OUTER_SAMPLE wrapper builds one run
per sampling from the accelerator specs and reports its stats, and a foreign MODEL gets a clear
error."""

import pytest
import torch

from conftest import import_pack_nodes



@pytest.fixture(scope="module")
def glue():
    """nodes/model.py imported the way ComfyUI imports the pack (a package, not the top-level `nodes`)."""
    return import_pack_nodes()("model")


def _net(seed=0):
    """The tiny config with every weight perturbed: zero-initialised output layers would make the
    network's output 0 and any comparison trivially equal."""
    from turbo_core.models.scm_net import CONFIGS, SCMNet

    torch.manual_seed(seed)
    net = SCMNet(CONFIGS["tiny"]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _grid(net, views=2, frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n, s = views * frames, net.cfg.image_size
    ref = torch.rand(frames, 3, s, s, generator=g) * 2 - 1
    reference = ref.repeat_interleave(views, 0)
    camera = torch.stack([torch.linspace(0, 3, views), torch.full((views,), 0.3)], -1).repeat(frames, 1)
    frame_index = torch.arange(frames).repeat_interleave(views)
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0])[:n]
    x = torch.randn(n, 3, s, s, generator=g) * sigma.view(-1, 1, 1, 1)
    return x, sigma, reference, camera, frame_index


def _model_kwargs(glue, model, reference, camera, frame_index, views, frames, x):
    conds = model.extra_conds(**{glue.COND_REFERENCE: reference, glue.COND_CAMERA: camera,
                                 glue.COND_FRAME_INDEX: frame_index, glue.COND_VIEWS: views,
                                 glue.COND_FRAMES: frames, "device": x.device, "noise": x})
    assert set(conds) == {"c_concat", "camera", "frame_index", "views", "frames"}
    return {k: v.cond for k, v in conds.items()}


def test_comfy_edm_denoises_like_turbo_core(glue):
    from turbo_core.diffusion import EDM

    net = _net()
    patcher = glue.make_model_patcher(net, torch.float32)
    model = patcher.model
    ms = model.model_sampling
    assert float(ms.sigma_data) == net.cfg.sigma_data
    assert float(ms.sigma_min) == pytest.approx(0.002) and float(ms.sigma_max) == pytest.approx(80.0)
    V, F = 2, 3
    x, sigma, reference, camera, frame_index = _grid(net, V, F)
    kw = _model_kwargs(glue, model, reference, camera, frame_index, V, F, x)
    with torch.no_grad():
        ours = EDM(sigma_data=net.cfg.sigma_data).denoise(net, x, sigma, reference, camera, V, F,
                                                          frame_index=frame_index)
        comfy_out = model.apply_model(x, sigma, transformer_options={}, **kw)
    assert ours.abs().max() > 0.1  # not a trivial comparison
    torch.testing.assert_close(comfy_out, ours, rtol=1e-5, atol=1e-5)
    # ... and the network's own term matters: a different sigma_data would not match
    with torch.no_grad():
        other = EDM(sigma_data=1.0).denoise(net, x, sigma, reference, camera, V, F, frame_index=frame_index)
    assert (other - comfy_out).abs().max() > 1e-3


def test_forward_goes_through_diffusion_model_wrappers(glue):
    """EasyCache's contract: a DIFFUSION_MODEL wrapper sees (x, timesteps, context, y, control,
    transformer_options) with x's first latent_channels channels the noisy image, and may answer
    without calling the network."""
    import comfy.patcher_extension as pe

    net = _net()
    model = glue.make_model_patcher(net, torch.float32).model
    V, F = 2, 3
    x, sigma, reference, camera, frame_index = _grid(net, V, F)
    kw = _model_kwargs(glue, model, reference, camera, frame_index, V, F, x)
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append((args[0].shape, isinstance(args[-1], dict), sorted(kwargs)))
        if len(seen) == 2:
            return torch.zeros_like(args[0][:, :model.latent_format.latent_channels])  # a "skipped" step
        return executor(*args, **kwargs)

    to = {}
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "probe", wrapper, to)
    with torch.no_grad():
        full = model.apply_model(x, sigma, transformer_options=to, **kw)
        skipped = model.apply_model(x, sigma, transformer_options=to, **kw)
    assert seen[0][0] == (V * F, 6, net.cfg.image_size, net.cfg.image_size)
    assert seen[0][1] and {"camera", "frame_index", "views", "frames"} <= set(seen[0][2])
    # a zero network output means denoised = c_skip * x: the wrapper really replaced the network
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(skipped, x * c_skip.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)
    assert (full - skipped).abs().max() > 1e-3


def _sample(glue, patcher, views, frames, steps=4, cfg=1.0, seed=0, sigmas=None, sampler="euler"):
    """ComfyUI's own sampling (euler, karras) of a V x F grid; `sigmas`: a custom schedule instead."""
    import comfy.sample
    import comfy.samplers

    net = glue.get_scm_net(patcher)
    s = net.cfg.image_size
    g = torch.Generator().manual_seed(3)
    ref = (torch.rand(frames, 3, s, s, generator=g) * 2 - 1).repeat_interleave(views, 0)
    camera = torch.stack([torch.linspace(0, 3, views), torch.full((views,), 0.3)], -1).repeat(frames, 1)
    frame_index = torch.arange(frames).repeat_interleave(views)

    def cond(r):
        return [[torch.zeros(1, 1, 1), {glue.COND_REFERENCE: r, glue.COND_CAMERA: camera,
                                        glue.COND_FRAME_INDEX: frame_index, glue.COND_VIEWS: views,
                                        glue.COND_FRAMES: frames}]]

    latent = torch.zeros(views * frames, 3, s, s)
    noise = comfy.sample.prepare_noise(latent, seed)
    if sigmas is not None:
        return comfy.sample.sample_custom(patcher, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas,
                                          cond(ref), cond(torch.zeros_like(ref)), latent, disable_pbar=True, seed=seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, "karras", cond(ref), cond(torch.zeros_like(ref)),
                               latent, disable_pbar=True, seed=seed)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_whole_steps_with_other_comfy_samplers(glue, sampler):
    """Second-order, multistep and ancestral samplers call the model more than once per step or
    mix old outputs in: whole steps still skip calls (counted at ComfyUI's cond batching) and the
    result stays finite and of the same image (a sanity bound: this tiny random network on random
    references is no test of fidelity, which the benchmarks measure on the trained model)."""
    from comfy.patcher_extension import WrappersMP
    from turbo_core.accel.presets import preset_config
    from turbo_core.accel.registry import merge_spec

    base = glue.make_model_patcher(_net(), torch.float32)
    full = _sample(glue, base.clone(), views=2, frames=3, steps=10, sampler=sampler)
    m = base.clone()
    glue.set_accelerator_specs(m, merge_spec([], "step", preset_config("step", "balanced")))
    batches = []
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "test-count",
                           lambda executor, *a, **k: (batches.append(1), executor(*a, **k))[1])
    sink = glue.StatsSink()
    m.model_options["transformer_options"][glue.REPORTS_KEY] = sink
    out = _sample(glue, m, views=2, frames=3, steps=10, sampler=sampler)
    st = sink.items[0]
    assert st.steps_skipped > 0 and len(batches) == st.steps_ran
    assert torch.isfinite(out).all()
    assert (out - full).abs().mean() < 0.5 * full.abs().mean()


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_skipped_whole_steps_skip_comfys_per_step_work(glue, cfg):
    """Chain Bypass's whole steps are decided in the PREDICT_NOISE wrapper: a skipped step never
    reaches ComfyUI's cond batching (counted by a CALC_COND_BATCH wrapper), still appears in the
    stats as a call with every block bypassed, and the result equals ComfyUI's own Euler sampling
    over just the sigmas whose steps ran (holding the denoised image is a longer Euler step)."""
    from comfy.patcher_extension import WrappersMP
    from turbo_core.accel.registry import merge_spec
    from turbo_core.accel.step_skip import StepSkipConfig

    steps = 10
    base = glue.make_model_patcher(_net(), torch.float32)
    m = base.clone()
    glue.set_accelerator_specs(m, merge_spec([], "step", StepSkipConfig(
        start_percent=0.0, end_percent=1.0, step_threshold=0.3, step_max_skips=100, kappa_prior=0.4)))
    batches = []
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "test-count",
                           lambda executor, *a, **k: (batches.append(1), executor(*a, **k))[1])
    sink = glue.StatsSink()
    m.model_options["transformer_options"][glue.REPORTS_KEY] = sink
    out = _sample(glue, m, views=2, frames=3, steps=steps, cfg=cfg)
    st = sink.items[0]
    assert 2 <= st.steps_ran < steps and st.steps_skipped == steps - st.steps_ran
    assert len(batches) == st.steps_ran, "a skipped step must not reach ComfyUI's cond batching"
    assert st.calls == steps and len(st.timeline) == steps
    ran = [t for t in st.timeline if any(c != "bypassed" for c in t["cells"].values())]
    assert len(ran) == st.steps_ran
    assert st.chains_bypassed == st.steps_skipped * st.blocks
    assert all("bypass.step" in t["signal"] for t in st.timeline[1:])

    plain = _sample(glue, base.clone(), views=2, frames=3, cfg=cfg,
                    sigmas=torch.tensor([t["sigma"] for t in ran] + [0.0]))
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)


def test_outer_sample_wrapper_runs_accelerators_and_reports(glue):
    """The accelerator contract through ComfyUI's real sampler: specs stored with merge_spec on a
    cloned MODEL become a fresh run per sampling; its RunStats reach a StatsSink; the model without
    specs computes everything."""
    from turbo_core.accel.presets import preset_config
    from turbo_core.accel.registry import merge_spec

    base = glue.make_model_patcher(_net(), torch.float32)
    runs = {}
    for label, specs in (("full", []), ("pruned", merge_spec([], "prune", preset_config("prune", "fast")))):
        m = base.clone()
        glue.set_accelerator_specs(m, specs)
        sink = glue.StatsSink()
        m.model_options["transformer_options"][glue.REPORTS_KEY] = sink
        out = _sample(glue, m, views=2, frames=4, steps=6, cfg=2.0)
        assert torch.isfinite(out).all()
        assert len(sink.items) == 1, "one RunStats per sampling run"
        runs[label] = (sink.items[0], out)
    full, pruned = runs["full"][0], runs["pruned"][0]
    assert full.calls == 6 and full.blocks == base.model.diffusion_model.net.depth
    assert full.compute_fraction == pytest.approx(1.0)
    assert pruned.compute_fraction < 0.95, pruned.format_line()
    assert glue.accelerator_specs(base) == [], "specs live on the clone only"
    # the run object never leaks into the MODEL's own options
    assert glue.RUN_KEY not in base.model_options["transformer_options"]


def test_get_scm_net_names_the_fix_for_a_foreign_model(glue):
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base

    foreign = comfy.model_base.BaseModel(comfy.supported_models_base.BASE({"disable_unet_model_creation": True}))
    patcher = comfy.model_patcher.ModelPatcher(foreign, torch.device("cpu"), torch.device("cpu"))
    assert not glue.is_turbo4d_model(patcher)
    with pytest.raises(ValueError) as e:
        glue.get_scm_net(patcher, "Turbo4D Rolling Cache")
    msg = str(e.value)
    assert "Turbo4D Rolling Cache" in msg and "'model'" in msg and "Turbo4D Model Loader" in msg
    assert glue.is_turbo4d_model(glue.make_model_patcher(_net(), torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_sample_close_to_fp32(glue, dtype):
    """The loader's weight_dtype choices run on a CPU as well, and stay near the fp32 result."""
    net = _net()
    ref32 = _sample(glue, glue.make_model_patcher(net, torch.float32), views=2, frames=2, steps=3)
    half = glue.make_model_patcher(_net(), dtype)
    assert half.model_dtype() == dtype
    out = _sample(glue, half, views=2, frames=2, steps=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref32).abs().mean() < 0.05 * ref32.abs().mean() + 1e-3
