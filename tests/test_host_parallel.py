"""The Turbo4D Multi-GPU node on the real server (started with --cpu): with devices 'cpu:2' the
MultiView Sampler's run is split over two gloo processes and gives the one-process result with the
accelerators' statistics of every process; without a GPU and without 'cpu:N' it runs on one and
says so; a malformed devices string names the input."""
import re

import pytest
import torch

from comfy_host import PromptFailed
from test_host_sv4d import pack, random_sv4d, small_encoders  # noqa: F401  (fixtures)

STEPS = 4


def loader():
    return {"1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}}}


def scene():
    return {"2": {"class_type": "Turbo4DSyntheticScene",
                  "inputs": {"seed": 1000003, "views": 2, "frames": 3, "size": 32, "elevation": 20.0,
                             "azimuth_start": 0.0, "azimuth_span": 360.0}}}


def bypass(node_id, model):
    return {node_id: {"class_type": "Turbo4DChainBypass",
                      "inputs": {"model": model, "preset": "balanced", "threshold": 0.08, "max_consecutive": 2,
                                 "step_threshold": 0.0, "step_max_skips": 3, "kappa_prior": 0.0,
                                 "start_percent": 0.2, "end_percent": 0.95, "storage": "native",
                                 "calibration_file": ""}}}


def multi_gpu(node_id, model, devices, mode="auto"):
    return {node_id: {"class_type": "Turbo4DMultiGPU", "inputs": {"model": model, "devices": devices, "mode": mode}}}


def sampler(node_id, model, cfg=2.0, seed=5):
    return {node_id: {"class_type": "Turbo4DMultiViewSampler",
                      "inputs": {"model": model, "input": ["2", 0], "views": 2, "frames": 3, "elevation": 20.0,
                                 "azimuth_span": 360.0, "seed": seed, "steps": STEPS, "cfg": cfg,
                                 "sampler_name": "euler", "scheduler": "karras"}}}


def report(node_id, run, reference):
    return {node_id: {"class_type": "Turbo4DReport",
                      "inputs": {"run_stats": [run, 3], "images": [run, 0], "reference": [reference, 0],
                                 "reference_stats": [reference, 3]}}}


def preview(run):
    return {"50": {"class_type": "PreviewImage", "inputs": {"images": [run, 0]}}}


def line(entry, node_id):
    return entry["outputs"][node_id]["text"][0]


@pytest.mark.parametrize("mode", ["cfg", "frames"])
def test_cpu_processes_give_the_one_process_result_with_the_accelerators(comfy, mode):
    seed = {"cfg": 5, "frames": 6}[mode]  # a new seed per case: ComfyUI would serve a repeated node from its cache
    p = {**loader(), **scene(), **bypass("10", ["1", 0]), **multi_gpu("11", ["10", 0], "cpu:2", mode),
         **sampler("30", ["11", 0], seed=seed), **sampler("31", ["10", 0], seed=seed), **report("40", "30", "31")}
    entry = comfy.run(p, timeout=600)
    split, alone = line(entry, "30"), line(entry, "31")
    assert f"over 2 processes ({mode})" in split, split
    assert "processes" not in alone, alone
    # Whole steps decided on rank 0: the same calls skipped; every process's work counted once.
    counts = r"(\d+/\d+ block chains bypassed \(\d+ whole steps?\)).*compute ([\d.]+)% of full"
    assert re.search(counts, split).groups() == re.search(counts, alone).groups(), (split, alone)
    assert re.search(r"\([1-9]\d* whole steps?\)", alone), alone
    cmp = line(entry, "40")
    m = re.search(r"PSNR vs reference ([\d.]+) dB", cmp)
    assert "PSNR vs reference exact" in cmp or (m and float(m.group(1)) >= 90.0), cmp
    assert f"Turbo4D Multi-GPU: 2 processes (gloo), {mode}" in comfy.log_text()


def test_without_a_gpu_it_runs_on_one_and_says_so(comfy):
    p = {**loader(), **scene(), **multi_gpu("11", ["1", 0], "all"), **sampler("30", ["11", 0], cfg=1.0),
         **preview("30")}
    entry = comfy.run(p, timeout=300)
    assert "processes" not in line(entry, "30")
    assert "Turbo4D Multi-GPU: no GPU (ComfyUI runs on cpu): sampling runs on one process" in comfy.log_text()


def test_a_malformed_devices_string_names_the_input(comfy):
    p = {**loader(), **scene(), **multi_gpu("11", ["1", 0], "cpu:two"), **sampler("30", ["11", 0], cfg=1.0),
         **preview("30")}
    with pytest.raises(PromptFailed) as e:
        comfy.run(p, timeout=120)
    assert "Turbo4D Multi-GPU" in e.value.message and "devices='cpu:two'" in e.value.message, e.value.message


def run_sv4d(pack, encoders, multi_gpu_devices=None, frames=2, steps=2, size=64):
    """MultiView Sampler (SV4D) on a reduced SV4D 2.0 UNet (random weights), optionally through
    Turbo4D Multi-GPU; as test_host_sv4d.run_node."""
    nodes, g, par = pack("sv4d"), pack("model_sv4d"), pack("parallel")
    clip, vae = encoders
    model = g.make_sv4d_model_patcher(random_sv4d("sv4d2"), torch.float32)
    if multi_gpu_devices:
        model = par.Turbo4DMultiGPU.execute(model, multi_gpu_devices, "auto").result[0]
    video = torch.rand(frames + 1, 48, 80, 3, generator=torch.Generator().manual_seed(5))
    return nodes.SV4DSampler.execute(model, clip, vae, video, frames, size, 10.0, 0, steps, 2.0, 1.0, "euler",
                                     "karras").result


def test_sv4d_sampler_honours_the_node_with_the_one_process_result(pack, small_encoders):
    """MultiView Sampler (SV4D) through Turbo4D Multi-GPU on two CPU processes: the CFG halves of
    every call split, the images the one-process ones."""
    from turbo_core import parallel

    try:
        images, _, line, stats, _ = run_sv4d(pack, small_encoders, "cpu:2")
    finally:
        parallel.shutdown()
    ref, _, ref_line, _, _ = run_sv4d(pack, small_encoders)
    assert stats.parallel["calls_by_mode"] == {"cfg": 2} and "over 2 processes (cfg)" in line, line
    assert "processes" not in ref_line
    assert (images - ref).abs().max().item() < 1e-4
