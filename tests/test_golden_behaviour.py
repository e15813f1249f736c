"""Golden behaviour of the accelerators on the embedded model, recorded before a refactor and held
after it: for every preset of every accelerator node, the three nodes chained, each mechanism alone
(the whole-step skip, the per-block chain bypass, the rolling cache, the token pruner) and the
combined Turbo4D presets of the core, the result images, the work counted independently of the
statistics, and the statistics a user sees.

Two paths, both CPU:
- the ComfyUI path, in process with the host's ComfyUI: Turbo4D Model Loader (embedded default) ->
  accelerator nodes -> MultiView Sampler, counted by forward hooks on the network's attention
  projections and MLPs (tokens that entered each axis's attention, images through an MLP, network
  calls). Recorded: the images (8 x 8 average-pooled, and a full-resolution checksum), the
  settings line of every accelerator node, the sampler's stats line (seconds masked) and its GUI
  payload (summary, map rows, change signals; not the per-accelerator internals), and each
  accelerator node's published schema (what /object_info serves);
- the script path, `turbo_core.accel.script.sample_accelerated` with `turbo4d_specs`, counted by
  the counting attention backend (sequences per length).

The records live in tests/data/golden_behaviour.safetensors (tensors, and the rest as JSON in its
metadata). `TURBO4D_WRITE_GOLDEN=1` rewrites them from the current code; only do that for a change
of behaviour that is meant, and say so in the commit.
"""
import json
import math
import os
import re

import pytest
import torch

from accel_fixtures import CountingAttention
from conftest import ROOT, import_pack_nodes

GOLDEN = os.path.join(ROOT, "tests", "data", "golden_behaviour.safetensors")
WRITE = os.environ.get("TURBO4D_WRITE_GOLDEN") == "1"
VIEWS, FRAMES, STEPS, SEED, SCENE = 2, 2, 6, 7, 1_000_003
PRESETS = ("quality", "balanced", "fast")
NODE_IDS = ("Turbo4DCache", "Turbo4DSemanticPrune", "Turbo4DChainBypass")
# Inputs of a node left at their defaults (custom values below replace some of them).
CACHE = dict(threshold=0.15, max_age=3, start_percent=0.15, end_percent=0.95, storage="native")
PRUNE = dict(keep_start=0.5, keep_end=0.3, saliency=0.5, max_age=6, start_percent=0.1, end_percent=0.95,
             storage="native", threshold=0.25, keep_min=0.25)
BYPASS = dict(threshold=0.08, max_consecutive=2, step_threshold=0.0, step_max_skips=3, kappa_prior=0.0,
              start_percent=0.2, end_percent=0.95, storage="native")
DEFAULTS = {"Turbo4DCache": CACHE, "Turbo4DSemanticPrune": PRUNE, "Turbo4DChainBypass": BYPASS}

# The methods the Cache and Semantic Prune nodes had before the per-call levels became their
# defaults (issue 15): recorded beside the defaults, and equal to the records made before.
OLD_METHODS = {"Turbo4DCache": "sub-attention cache", "Turbo4DSemanticPrune": "sequence prune"}

# (case, cfg, [(node, preset, custom inputs)]) through ComfyUI.
NODE_CASES = [(f"{n}/{p}", 1.0, [(n, p, {})]) for n in NODE_IDS for p in PRESETS]
NODE_CASES += [(f"{n}[{m}]/{p}", 1.0, [(n, p, {"method": m})]) for n, m in OLD_METHODS.items() for p in PRESETS]
NODE_CASES += [(f"chained/{p}", 1.0, [(n, p, {}) for n in NODE_IDS]) for p in ("balanced", "fast")]
NODE_CASES += [("chained/fast/cfg2", 2.0, [(n, "fast", {}) for n in NODE_IDS])]
NODE_CASES += [(f"chained[old methods]/{p}", 1.0, [(n, p, {"method": OLD_METHODS[n]} if n in OLD_METHODS else {})
                                                  for n in NODE_IDS]) for p in ("balanced", "fast")]
# The whole-step skip and the per-block bypass alone, at custom settings the presets do not reach
# (the cache's and the pruner's presets are each of them alone already).
NODE_CASES += [
    ("alone/step_skip", 1.0, [("Turbo4DChainBypass", "custom",
                               dict(threshold=0.0, step_threshold=0.08, step_max_skips=2, kappa_prior=0.3,
                                    start_percent=0.0, end_percent=1.0))]),
    ("alone/block_bypass", 1.0, [("Turbo4DChainBypass", "custom",
                                  dict(threshold=0.3, max_consecutive=3, start_percent=0.1))]),
]
# Custom settings whose effect the node's settings line shows in full (no sampling needed).
CUSTOM = [("Turbo4DCache", dict(threshold=0.4, max_age=2, start_percent=0.1, storage="fp16")),
          ("Turbo4DCache", dict(threshold=0.4, max_age=2, start_percent=0.1, storage="fp16",
                                method="sub-attention cache")),
          ("Turbo4DSemanticPrune", dict(keep_start=0.4, keep_end=0.2, saliency=1.0, max_age=3, start_percent=0.1)),
          ("Turbo4DSemanticPrune", dict(keep_start=0.4, keep_end=0.2, saliency=1.0, max_age=3, start_percent=0.1,
                                        threshold=0.3, keep_min=0.5, method="sequence prune")),
          ("Turbo4DChainBypass", dict(threshold=0.3, step_threshold=0.05, step_max_skips=4, kappa_prior=0.2,
                                      end_percent=0.9, storage="cpu"))]
SCRIPT_CASES = ("off",) + PRESETS


def _masked(line: str) -> str:
    """The stats line without its wall-clock seconds."""
    return re.sub(r"\), [0-9.]+s", "), <seconds>s", line)


def _summary(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "peak_memory_mb")}


def _pooled(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) IMAGE -> (N, 3, 8, 8) averages: any change of a result moves them."""
    return torch.nn.functional.adaptive_avg_pool2d(images.movedim(-1, 1).double(), 8).float()


def _checksum(images: torch.Tensor) -> list:
    x = images.double()
    return [float(x.sum()), float(x.abs().pow(2).sum())]


class Counter:
    """Forward hooks on the network: tokens into each axis's q/k/v projection (the sequence path
    and the grid path both go through it), images into an MLP, network calls."""

    def __init__(self, net):
        self.net = net
        self.hooks = []
        for blk in net.blocks:
            for axis in ("spatial", "camera", "motion"):
                self.hooks.append(getattr(blk, axis).qkv.register_forward_hook(self._tokens(axis)))
            self.hooks.append(blk.mlp.register_forward_hook(self._images))
        self.hooks.append(net.register_forward_hook(self._call))
        self.reset()

    def reset(self):
        self.counts = {"spatial": 0, "camera": 0, "motion": 0, "mlp_images": 0, "network_calls": 0}

    def _tokens(self, axis):
        def hook(module, args, out):
            x = args[0]
            self.counts[axis] += x.numel() // x.shape[-1]
        return hook

    def _images(self, module, args, out):
        self.counts["mlp_images"] += args[0].shape[0]

    def _call(self, module, args, out):
        self.counts["network_calls"] += 1

    def remove(self):
        for h in self.hooks:
            h.remove()


def _schema(cls) -> dict:
    """What /object_info publishes for a node; the calibration file's tooltip is left out (its
    wording belongs to the path rules, not to the accelerator)."""
    info = json.loads(json.dumps(cls.GET_NODE_INFO_V1(), default=str))
    opt = info.get("input", {}).get("optional", {}).get("calibration_file")
    if opt is not None:
        opt[1].pop("tooltip", None)
    return info


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a busy 2-core CPU two threads per process run several times slower, and the
    records stay those of one fixed reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pack():
    return import_pack_nodes()


@pytest.fixture(scope="module")
def golden():
    if WRITE or not os.path.isfile(GOLDEN):
        return None
    from safetensors import safe_open

    with safe_open(GOLDEN, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        records = json.loads(f.metadata()["records"])
    return tensors, records


@pytest.fixture(scope="module")
def recorder(golden):
    """Collects what a test measured; in write mode saves it all at the end of the module."""
    out = {"tensors": {}, "records": {}}
    yield out
    if WRITE:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        save_file({k: v.contiguous() for k, v in sorted(out["tensors"].items())}, GOLDEN,
                  metadata={"records": json.dumps(out["records"], sort_keys=True)})


def _close(a, b, path="") -> None:
    """Equal, floats to 1e-6 relative (a refactor may reorder a sum, not change a decision)."""
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a == b, path
        else:
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _check(golden, recorder, key: str, record: dict, tensors: dict) -> None:
    if WRITE:
        recorder["records"][key] = record
        recorder["tensors"].update({f"{key}:{k}": v for k, v in tensors.items()})
        return
    assert golden is not None, f"no golden records at {GOLDEN}: run once with TURBO4D_WRITE_GOLDEN=1"
    want_tensors, want = golden
    assert key in want, f"{key} is not in the golden records"
    # Statistics first: a changed decision shows there more plainly than in the pixels.
    _close(json.loads(json.dumps(record)), want[key], key)
    for k, v in tensors.items():
        torch.testing.assert_close(v, want_tensors[f"{key}:{k}"], rtol=0, atol=1e-5, msg=f"{key}:{k}")


@pytest.fixture(scope="module")
def comfy_setup(pack):
    loaders, inputs = pack("loaders"), pack("inputs")
    model = loaders.Turbo4DModelLoader.execute(loaders.EMBEDDED, "auto").result[0]
    data = inputs.Synthetic4DScene.execute(SCENE, VIEWS, FRAMES, 32, 20.0, 0.0, 360.0).result[0]
    counter = Counter(model.model.diffusion_model.net)
    yield model, data, counter
    counter.remove()


def test_accelerator_node_schemas_are_unchanged(pack, golden, recorder):
    nodes = {cls.GET_SCHEMA().node_id: cls for cls in pack("accelerators").NODES}
    assert sorted(nodes) == sorted(NODE_IDS)
    _check(golden, recorder, "schemas", {n: _schema(nodes[n]) for n in NODE_IDS}, {})


def test_custom_settings_of_each_node_are_unchanged(pack, golden, recorder):
    model = pack("loaders").Turbo4DModelLoader.execute(pack("loaders").EMBEDDED, "auto").result[0]
    nodes = {cls.GET_SCHEMA().node_id: cls for cls in pack("accelerators").NODES}
    lines = [nodes[n].execute(model=model, preset="custom", **{**DEFAULTS[n], **custom}).result[1]
             for n, custom in CUSTOM]
    _check(golden, recorder, "custom_settings", {"lines": lines}, {})


@pytest.mark.parametrize("case,cfg,chain", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_comfy_path_results_counts_and_statistics_are_unchanged(pack, comfy_setup, golden, recorder, case, cfg,
                                                                chain):
    model, data, counter = comfy_setup
    nodes = {cls.GET_SCHEMA().node_id: cls for cls in pack("accelerators").NODES}
    settings = []
    m = model
    for node, preset, custom in chain:
        m, line = nodes[node].execute(model=m, preset=preset, **{**DEFAULTS[node], **custom}).result
        settings.append(line)
    counter.reset()
    out = pack("sampling").MultiViewSampler.execute(
        model=m, input=data, views=VIEWS, frames=FRAMES, elevation=20.0, azimuth_span=360.0, seed=SEED,
        steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="karras")
    images, _latent, line, _stats, _layout = out.result
    payload = out.ui["turbo4d"][0]
    record = {
        "settings": settings,
        "line": _masked(line),
        "counts": dict(counter.counts),
        "checksum": _checksum(images),
        "summary": _summary(payload["summary"]),
        "map": {k: payload[k] for k in ("blocks", "rows", "steps", "percent", "streams", "signals")},
    }
    _check(golden, recorder, f"comfy/{case}", record, {"pooled": _pooled(images)})


@pytest.mark.parametrize("preset", SCRIPT_CASES)
def test_script_path_results_counts_and_statistics_are_unchanged(golden, recorder, preset):
    from turbo_core.accel.presets import turbo4d_specs
    from turbo_core.accel.script import sample_accelerated
    from turbo_core.diffusion import EDM, karras_sigmas
    from turbo_core.models.io import load_model

    net = load_model(os.path.join(ROOT, "models", "turbo4d_default.safetensors")).eval()
    s, n = net.cfg.image_size, VIEWS * FRAMES
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(n, 3, s, s, generator=g)
    cond = torch.rand(FRAMES, 3, s, s, generator=g).mul(2).sub(1).repeat_interleave(VIEWS, 0)
    camera = torch.stack([torch.linspace(0, math.pi, VIEWS), torch.full((VIEWS,), 0.35)], -1).repeat(FRAMES, 1)
    counting = CountingAttention()
    x, stats = sample_accelerated(net, EDM(sigma_data=net.cfg.sigma_data), turbo4d_specs(preset), noise,
                                  karras_sigmas(STEPS), cond, camera, VIEWS, FRAMES, backend=counting)
    record = {
        "line": _masked(stats.format_line()),
        "counts": counting.by_axis(net, VIEWS, FRAMES),
        "checksum": _checksum(x),
        "summary": _summary(stats.summary()),
    }
    _check(golden, recorder, f"script/{preset}", record, {"pooled": _pooled(x.movedim(1, -1))})
