"""The pack on a real ComfyUI server over HTTP (one server for the whole file, see conftest.py):
the node list and its tooltips, ComfyUI's stock KSampler and EasyCache on our model, custom
weights, and bad input that fails with a message naming the input and the fix while the same
server keeps working."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_host import PromptFailed, PromptRejected

OUR_NODES = {"Turbo4DModelLoader", "Turbo4DLoadInput", "Turbo4DSyntheticScene", "Turbo4DMultiViewSampler",
             "Turbo4DMultiViewConditioning", "Turbo4DLatentToImage", "Turbo4DSaveMultiView"}


def small_grid_prompt(views=2, frames=2, steps=3, cfg=1.0, prefix="test/small", model=None, sampler_views=None,
                      sampler_frames=None, scene_frames=None, extra=None):
    """Loader -> Synthetic 4D Scene -> MultiView Sampler -> Save MultiView on a tiny grid."""
    p = {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DSyntheticScene",
              "inputs": {"seed": 5, "views": views, "frames": scene_frames or frames, "size": 32, "elevation": 20.0,
                         "azimuth_start": 0.0, "azimuth_span": 360.0}},
        "3": {"class_type": "Turbo4DMultiViewSampler",
              "inputs": {"model": model or ["1", 0], "input": ["2", 0],
                         "views": sampler_views if sampler_views is not None else views,
                         "frames": sampler_frames if sampler_frames is not None else frames,
                         "elevation": 20.0, "azimuth_span": 360.0, "seed": 1, "steps": steps, "cfg": cfg,
                         "sampler_name": "euler", "scheduler": "karras"}},
        "4": {"class_type": "Turbo4DSaveMultiView",
              "inputs": {"images": ["3", 0], "views": sampler_views or views, "fps": 8.0, "filename_prefix": prefix,
                         "scale": 1}},
    }
    p.update(extra or {})
    return p


@pytest.fixture(scope="module")
def random_tiny(comfy):
    """A real weights file with non-zero output layers (a fresh network's zero-initialised output
    layer gives exactly 0, on which EasyCache's relative-change estimate is 0/0 and never skips)."""
    from turbo_core.models.io import save_model
    from turbo_core.models.scm_net import CONFIGS, SCMNet

    torch.manual_seed(0)
    net = SCMNet(CONFIGS["tiny"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    name = "random_tiny_test.safetensors"
    save_model(net, os.path.join(comfy.models_directory, "turbo4d", name))
    return name


def run_failing(comfy, prompt) -> str:
    with pytest.raises(PromptFailed) as e:
        comfy.run(prompt, timeout=120)
    return e.value.message


def assert_good_prompt_still_runs(comfy, tag):
    entry = comfy.run(small_grid_prompt(prefix=f"test/recover_{tag}"), timeout=120)
    files = comfy.output_files(entry)
    assert len(files) == 3 and all(os.path.getsize(f) > 0 for f in files)


# --- the node list --------------------------------------------------------------------------------
def test_object_info_lists_every_node_with_tooltips(comfy):
    info = comfy.object_info()
    ours = {k: v for k, v in info.items() if v.get("python_module", "").endswith("turbo4d")}
    assert OUR_NODES <= set(ours), f"missing: {OUR_NODES - set(ours)}"
    for name, node in ours.items():
        assert node["category"].startswith("Turbo4D/"), (name, node["category"])
        assert node["description"], name
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs or name == "Turbo4DSaveMultiView", name
        for inp, spec in inputs.items():
            opts = spec[1] if len(spec) > 1 else {}
            assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
    smp = info["Turbo4DMultiViewSampler"]
    assert smp["output"] == ["IMAGE", "LATENT", "STRING", "TURBO4D_STATS", "TURBO4D_LAYOUT"]
    assert "view-major" in smp["output_tooltips"][0]
    assert info["Turbo4DLoadInput"]["input"]["required"]["video"][1].get("video_upload") is True
    # the example video was copied into the input folder when the pack loaded
    assert "turbo4d_example.mp4" in info["Turbo4DLoadInput"]["input"]["required"]["video"][1]["options"]


# --- ComfyUI's own nodes on our model -------------------------------------------------------------
def test_stock_ksampler_drives_the_model_through_multiview_conditioning(comfy):
    prompt = {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DSyntheticScene", "inputs": {"seed": 2, "views": 2, "frames": 3, "size": 32,
                                                                "elevation": 20.0, "azimuth_start": 0.0,
                                                                "azimuth_span": 360.0}},
        "3": {"class_type": "Turbo4DMultiViewConditioning",
              "inputs": {"model": ["1", 0], "input": ["2", 0], "views": 2, "frames": 3, "elevation": 20.0,
                         "azimuth_span": 360.0}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["3", 2], "seed": 0, "steps": 3, "cfg": 2.0,
                                                   "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                   "denoise": 1.0}},
        "5": {"class_type": "Turbo4DLatentToImage", "inputs": {"latent": ["4", 0]}},
        "6": {"class_type": "Turbo4DSaveMultiView", "inputs": {"images": ["5", 0], "views": 2, "fps": 8.0,
                                                               "filename_prefix": "test/ksampler", "scale": 1}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "test/ksampler_latent"}},
    }
    entry = comfy.run(prompt, timeout=120)
    grid = [f for f in comfy.output_files(entry) if f.endswith("grid.png")]
    assert len(grid) == 1
    assert Image.open(grid[0]).size == (3 * 32, 2 * 32)  # columns = frames, rows = views
    latent_dir = os.path.join(comfy.output_directory, "test")
    latents = [f for f in os.listdir(latent_dir) if f.startswith("ksampler_latent") and f.endswith(".latent")]
    assert latents, "SaveLatent wrote nothing"
    from safetensors.torch import load_file
    samples = load_file(os.path.join(latent_dir, latents[0]))["latent_tensor"]
    assert samples.shape == (6, 3, 32, 32) and torch.isfinite(samples).all()
    # our OUTER_SAMPLE wrapper ran under the stock KSampler too: 3 steps -> 3 (batched cond+uncond) calls
    assert re.search(r"Turbo4D: .*compute 100\.0% of full", comfy.log_text())


def test_comfy_easycache_node_skips_steps_on_our_model(comfy, random_tiny):
    before = comfy.log_text()
    prompt = small_grid_prompt(views=2, frames=2, steps=10, prefix="test/easycache", model=["9", 0], extra={
        "9": {"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": 1.0, "start_percent": 0.1,
                                                    "end_percent": 0.95, "verbose": False}}})
    prompt["1"]["inputs"]["model_name"] = random_tiny
    entry = comfy.run(prompt, timeout=120)
    log = comfy.log_text()[len(before):]
    m = re.search(r"EasyCache - skipped (\d+)/(\d+) steps", log)
    assert m, log[-3000:]
    skipped, total = int(m.group(1)), int(m.group(2))
    assert total == 10 and skipped >= 1
    text = entry["outputs"]["3"]["text"][0]
    assert text.startswith("Turbo4D:")
    assert len(comfy.output_files(entry)) == 3


def test_custom_weights_from_models_folder(comfy):
    """A real .safetensors exported by turbo_core (the 16 px 'tiny' config) in models/turbo4d/ loads,
    and the sampler resizes the 32 px input to the model's 16 px."""
    from turbo_core.models.io import save_model
    from turbo_core.models.scm_net import CONFIGS, SCMNet

    path = os.path.join(comfy.models_directory, "turbo4d", "tiny_test.safetensors")
    save_model(SCMNet(CONFIGS["tiny"]), path)
    prompt = small_grid_prompt(prefix="test/tiny")
    prompt["1"]["inputs"]["model_name"] = "tiny_test.safetensors"
    entry = comfy.run(prompt, timeout=120)
    grid = [f for f in comfy.output_files(entry) if f.endswith("grid.png")][0]
    assert Image.open(grid).size == (2 * 16, 2 * 16)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_grid_sizes_name_the_input_and_the_fix(comfy):
    # more views / frames than the model takes: refused when queued, before any node runs
    for kw, expect in ((dict(views=2, frames=2, sampler_views=9), ("views=9", "Set views to 1..8")),
                       (dict(views=1, frames=17), ("frames=17", "Set frames to 1..16"))):
        with pytest.raises(PromptRejected) as e:
            comfy.submit(small_grid_prompt(prefix="test/bad", **kw))
        errors = json.dumps(e.value.body["node_errors"])
        assert all(x in errors for x in expect), errors

    msg = run_failing(comfy, small_grid_prompt(views=2, frames=2, sampler_frames=4, prefix="test/bad"))
    assert "only 2 frames" in msg and "frames=4" in msg and "Lower frames" in msg, msg

    # views=0 is below the input's minimum: ComfyUI rejects the graph before it runs, naming the input
    with pytest.raises(PromptRejected) as e:
        comfy.submit(small_grid_prompt(views=2, frames=2, sampler_views=0, prefix="test/bad"))
    errors = json.dumps(e.value.body["node_errors"])
    assert "views" in errors and "smaller than min of 1" in errors
    assert_good_prompt_still_runs(comfy, "grid")


def test_unreadable_video_names_the_file_and_the_fix(comfy):
    with open(os.path.join(comfy.input_directory, "broken_clip.mp4"), "wb") as f:
        f.write(b"this is not a video" * 50)
    prompt = {
        "1": {"class_type": "Turbo4DLoadInput", "inputs": {"video": "broken_clip.mp4", "size": 32, "frame_count": 4,
                                                           "frame_stride": 1, "start_frame": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }
    msg = run_failing(comfy, prompt)
    assert "broken_clip.mp4" in msg and "Re-export it as mp4" in msg, msg
    # the shipped example video loads through the same node: 4 frames at 32 px
    prompt["1"]["inputs"]["video"] = "turbo4d_example.mp4"
    entry = comfy.run(prompt, timeout=60)
    assert len(entry["outputs"]["2"]["images"]) == 4


def test_corrupt_and_foreign_weights_name_the_file_and_the_fix(comfy, tmp_path):
    from safetensors.torch import save_file

    from turbo_core.models.io import save_model
    from turbo_core.models.scm_net import CONFIGS, SCMNet

    folder = os.path.join(comfy.models_directory, "turbo4d")
    good = str(tmp_path / "good.safetensors")
    save_model(SCMNet(CONFIGS["tiny"]), good)
    data = open(good, "rb").read()
    with open(os.path.join(folder, "corrupt_test.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    save_file({"x_embedder.proj.weight": torch.zeros(64, 16, 2, 2)}, os.path.join(folder, "foreign_test.safetensors"))

    for name, expect in (("corrupt_test.safetensors", "corrupt"), ("foreign_test.safetensors", "not a Turbo4D")):
        prompt = small_grid_prompt(prefix="test/bad")
        prompt["1"]["inputs"]["model_name"] = name
        msg = run_failing(comfy, prompt)
        assert name in msg and "model_name" in msg and expect in msg, msg
        assert re.search(r"(export it again|Pick a Turbo4D model|download)", msg), msg
    assert_good_prompt_still_runs(comfy, "weights")


def test_foreign_model_into_the_sampler_names_the_loader(comfy):
    """A real non-Turbo4D MODEL: ComfyUI's own Load Diffusion Model node reading a tiny SD3-family
    file (detected by ComfyUI from its keys and shapes)."""
    from safetensors.torch import save_file

    folder = os.path.join(comfy.models_directory, "diffusion_models")
    os.makedirs(folder, exist_ok=True)
    save_file({"x_embedder.proj.weight": torch.zeros(64, 16, 2, 2),
               "joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(192, 64),
               "final_layer.linear.weight": torch.zeros(64, 64)}, os.path.join(folder, "tiny_sd3_test.safetensors"))
    prompt = small_grid_prompt(prefix="test/bad", model=["8", 0], extra={
        "8": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3_test.safetensors",
                                                     "weight_dtype": "default"}}})
    msg = run_failing(comfy, prompt)
    assert "MultiView Sampler" in msg and "'model' input is a SD3 model" in msg, msg
    assert "Turbo4D Model Loader" in msg
    assert_good_prompt_still_runs(comfy, "foreign")


def test_stock_latent_of_the_wrong_size_names_the_fix(comfy):
    prompt = {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DSyntheticScene", "inputs": {"seed": 2, "views": 2, "frames": 2, "size": 32,
                                                                "elevation": 20.0, "azimuth_start": 0.0,
                                                                "azimuth_span": 360.0}},
        "3": {"class_type": "Turbo4DMultiViewConditioning",
              "inputs": {"model": ["1", 0], "input": ["2", 0], "views": 2, "frames": 2, "elevation": 20.0,
                         "azimuth_span": 360.0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "test/bad_latent"}},
    }
    msg = run_failing(comfy, prompt)
    assert "4 images of 8x8" in msg and "32x32" in msg and "latent output of 'MultiView Conditioning'" in msg, msg


def test_images_input_takes_precedence_over_the_video(comfy):
    prompt = {
        "1": {"class_type": "Turbo4DSyntheticScene", "inputs": {"seed": 4, "views": 2, "frames": 4, "size": 32,
                                                                "elevation": 20.0, "azimuth_start": 0.0,
                                                                "azimuth_span": 360.0}},
        # 8 ground-truth images, every third from the second: 3 frames (the 16-frame video would give 5)
        "2": {"class_type": "Turbo4DLoadInput", "inputs": {"video": "turbo4d_example.mp4", "size": 32,
                                                           "frame_count": 0, "frame_stride": 3, "start_frame": 1,
                                                           "images": ["1", 1]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    entry = comfy.run(prompt, timeout=60)
    assert len(entry["outputs"]["3"]["images"]) == 3
    prompt["2"]["inputs"].pop("images")
    entry = comfy.run(prompt, timeout=60)
    assert len(entry["outputs"]["3"]["images"]) == 5
