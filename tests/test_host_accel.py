"""The accelerator nodes on the real server: they skip work, the result stays within bounds of full
compute, wiring order does not matter, two accelerated models in one graph share nothing, and a
model without SCM attention gets an error naming the node."""
import os
import re

import pytest
import torch

from comfy_host import PromptFailed

STEPS = 8


def loader(i="1"):
    return {i: {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}}}


def accel(node_id, class_type, model, preset="fast"):
    widgets = {
        "Turbo4DChainBypass": dict(threshold=0.08, max_consecutive=2, step_threshold=0.0, step_max_skips=3, kappa_prior=0.0,
                                   start_percent=0.2, end_percent=0.95,
                                   storage="native", calibration_file=""),
        "Turbo4DCache": dict(threshold=0.15, max_age=3, start_percent=0.15, end_percent=0.95, storage="native"),
        "Turbo4DSemanticPrune": dict(keep_start=0.5, keep_end=0.3, saliency=0.5, max_age=6, start_percent=0.1,
                                     end_percent=0.95, storage="native"),
    }[class_type]
    return {node_id: {"class_type": class_type, "inputs": {"model": model, "preset": preset, **widgets}}}


def sampler(node_id, model, seed=11):
    return {node_id: {"class_type": "Turbo4DMultiViewSampler",
                      "inputs": {"model": model, "input": ["2", 0], "views": 3, "frames": 4, "elevation": 20.0,
                                 "azimuth_span": 360.0, "seed": seed, "steps": STEPS, "cfg": 1.0,
                                 "sampler_name": "euler", "scheduler": "karras"}}}


def report(node_id, run, reference):
    return {node_id: {"class_type": "Turbo4DReport",
                      "inputs": {"run_stats": [run, 3], "images": [run, 0], "reference": [reference, 0],
                                 "reference_stats": [reference, 3]}}}


def scene():
    return {"2": {"class_type": "Turbo4DSyntheticScene",
                  "inputs": {"seed": 1000003, "views": 3, "frames": 4, "size": 32, "elevation": 20.0,
                             "azimuth_start": 0.0, "azimuth_span": 360.0}}}


def preview(run):
    return {"50": {"class_type": "PreviewImage", "inputs": {"images": [run, 0]}}}


def texts(entry, node_id):
    return entry["outputs"][node_id]["text"]


def compute_percent(line):
    return float(re.search(r"compute ([\d.]+)% of full", line).group(1))


def test_accelerators_skip_work_within_bounds_in_any_order(comfy):
    p = {**loader(), **scene(),
         # order A: bypass -> cache -> prune
         **accel("10", "Turbo4DChainBypass", ["1", 0]), **accel("11", "Turbo4DCache", ["10", 0]),
         **accel("12", "Turbo4DSemanticPrune", ["11", 0]),
         # order B: prune -> cache -> bypass
         **accel("20", "Turbo4DSemanticPrune", ["1", 0]), **accel("21", "Turbo4DCache", ["20", 0]),
         **accel("22", "Turbo4DChainBypass", ["21", 0]),
         **sampler("30", ["1", 0]), **sampler("31", ["12", 0]), **sampler("32", ["22", 0]),
         **report("40", "31", "30"),   # accelerated vs full compute
         **report("41", "31", "32")}   # order A vs order B
    entry = comfy.run(p, timeout=300)
    full, acc_a, acc_b = (texts(entry, n)[0] for n in ("30", "31", "32"))
    assert compute_percent(full) == 100.0 and full.startswith("Turbo4D: 0/")
    # The accelerated runs really skipped work, and said so.
    assert compute_percent(acc_a) < 90.0, acc_a
    assert re.search(r"[1-9]\d*/\d+ block chains bypassed", acc_a) or re.search(r"[1-9]\d*/\d+ camera", acc_a), acc_a
    # Order does not matter, and the two accelerated models (run one after the other) share nothing:
    # the second run is bit-identical to the first.
    assert acc_a.split(", ")[:5] == acc_b.split(", ")[:5]
    same = texts(entry, "41")[0]
    assert "PSNR vs reference exact" in same, same
    # The fast preset stays within its quality bound against the same seed at full compute.
    vs_full = texts(entry, "40")[0]
    psnr = float(re.search(r"PSNR vs reference ([\d.]+) dB", vs_full).group(1))
    assert psnr >= 22.0, vs_full


def test_accelerator_on_a_model_without_scm_attention_names_the_node(comfy):
    from safetensors.torch import save_file

    folder = os.path.join(comfy.models_directory, "diffusion_models")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tiny_sd3_accel_test.safetensors")
    save_file({"x_embedder.proj.weight": torch.zeros(64, 16, 2, 2),
               "joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(192, 64),
               "final_layer.linear.weight": torch.zeros(64, 64)}, path)
    for class_type, title in (("Turbo4DCache", "Turbo4D Cache"), ("Turbo4DSemanticPrune", "Semantic Prune"),
                              ("Turbo4DChainBypass", "Chain Bypass")):
        p = {"8": {"class_type": "UNETLoader", "inputs": {"unet_name": os.path.basename(path),
                                                          "weight_dtype": "default"}},
             **scene(), **accel("9", class_type, ["8", 0]), **sampler("30", ["9", 0]), **preview("30")}
        with pytest.raises(PromptFailed) as e:
            comfy.run(p, timeout=120)
        msg = e.value.message
        assert title in msg and "no SCM" in msg and "Turbo4D Model Loader" in msg, msg


def test_bad_custom_setting_names_the_node_and_field(comfy):
    p = {**loader(), **scene(), **accel("9", "Turbo4DSemanticPrune", ["1", 0], preset="custom"),
         **sampler("30", ["9", 0]), **preview("30")}
    p["9"]["inputs"]["start_percent"] = 0.9
    p["9"]["inputs"]["end_percent"] = 0.2
    with pytest.raises(PromptFailed) as e:
        comfy.run(p, timeout=120)
    assert "Semantic Prune" in e.value.message and "start_percent" in e.value.message, e.value.message


def memory(node_id, model, gb):
    return {node_id: {"class_type": "Turbo4DMemory", "inputs": {"model": model, "cache_gpu_gb": gb}}}


def test_default_methods_run_the_per_call_levels_within_the_memory_nodes_bound(comfy):
    # An API prompt written before the nodes had a method (no method input): Turbo4D Cache runs
    # block reuse, Semantic Prune token reuse; their work and cache bound are in the stats line.
    # Under a Turbo4D Memory node whose bound is below one cached span, block reuse caches and
    # reuses nothing, and says so.
    tiny_gb = 0.5 / 1024  # 0.5 MB: a 16-bit stream of this run is 1.1 MB
    p = {**loader(), **scene(),
         **accel("10", "Turbo4DCache", ["1", 0], preset="balanced"),
         **accel("11", "Turbo4DSemanticPrune", ["1", 0], preset="fast"),
         **memory("12", ["10", 0], tiny_gb),
         **sampler("30", ["1", 0]), **sampler("31", ["10", 0]), **sampler("32", ["11", 0]), **sampler("33", ["12", 0]),
         **report("40", "31", "30"), **report("41", "32", "30"), **report("42", "33", "30")}
    entry = comfy.run(p, timeout=300)
    blocks, tokens, bounded = (texts(entry, n)[0] for n in ("31", "32", "33"))
    reused = re.search(r"(\d+)/(\d+) blocks reused \((\d+) spans? reused, (\d+) run\)", blocks)
    assert reused and int(reused.group(1)) > 0, blocks
    cache, bound = map(float, re.search(r"cache ([\d.]+) MB of ([\d.]+) MB bound", blocks).groups())
    assert 0 < cache <= bound, blocks
    assert compute_percent(blocks) < 90.0, blocks
    computed = re.search(r"tokens computed (\d+)/(\d+)", tokens)
    assert computed and 0 < int(computed.group(1)) < int(computed.group(2)), tokens
    assert compute_percent(tokens) < 100.0, tokens
    for n in ("40", "41"):  # within a quality bound of full compute, same seed
        vs_full = texts(entry, n)[0]
        assert float(re.search(r"PSNR vs reference ([\d.]+) dB", vs_full).group(1)) >= 25.0, vs_full
    # The Memory node's bound applies: nothing fits, nothing is reused, and the line shows the bound.
    assert "blocks reused" not in bounded and compute_percent(bounded) == 100.0, bounded
    cache, bound = map(float, re.search(r"cache ([\d.]+) MB of ([\d.]+) MB bound", bounded).groups())
    assert cache == 0.0 and bound <= 0.5, bounded
