"""The grid nodes against the model's limits on a real ComfyUI server: views / frames beyond what
any Turbo4D model here takes (read from the models' configs) are refused when the prompt is
queued, before a node runs, with the limits in the message, and the widgets' range and tooltips
say the limit; an input not at the model's size is resized, and the run's log line, stats text
and canvas figures say so; counts of one read '1 frame'."""
import json
import re

import pytest

from comfy_host import PromptFailed, PromptRejected
from test_host_server import small_grid_prompt


def node_errors(comfy, prompt) -> str:
    with pytest.raises(PromptRejected) as e:
        comfy.submit(prompt)
    return json.dumps(e.value.body["node_errors"])


def conditioning_prompt(views, frames, size=32, video="turbo4d_example.mp4") -> dict:
    """Load 4D Input -> MultiView Conditioning -> stock KSampler -> MultiView Latent to Image."""
    return {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DLoadInput", "inputs": {"video": video, "size": size, "frame_count": 2,
                                                           "frame_stride": 1, "start_frame": 0}},
        "3": {"class_type": "Turbo4DMultiViewConditioning",
              "inputs": {"model": ["1", 0], "input": ["2", 0], "views": views, "frames": frames, "elevation": 20.0,
                         "azimuth_span": 360.0}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["3", 2], "seed": 0, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0}},
        "5": {"class_type": "Turbo4DLatentToImage", "inputs": {"latent": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def test_views_and_frames_beyond_the_model_are_refused_when_queued(comfy):
    before = len(comfy.get("/history") or {})
    errors = node_errors(comfy, small_grid_prompt(views=64, frames=2, prefix="test/limits"))
    assert "MultiView Sampler: views=64" in errors and "at most 8 views (max_views in its config)" in errors, errors
    assert "Set views to 1..8" in errors, errors
    errors = node_errors(comfy, small_grid_prompt(views=2, frames=2, sampler_frames=256, prefix="test/limits"))
    assert "frames=256" in errors and "at most 16 frames (max_frames in its config)" in errors, errors
    assert "Set frames to 1..16" in errors, errors
    errors = node_errors(comfy, conditioning_prompt(views=9, frames=2))
    assert "MultiView Conditioning: views=9" in errors and "Set views to 1..8" in errors, errors
    assert len(comfy.get("/history") or {}) == before  # nothing was queued, so nothing ran


def test_grid_widgets_range_and_tooltips_state_the_models_limits(comfy):
    info = comfy.object_info()
    for node in ("Turbo4DMultiViewSampler", "Turbo4DMultiViewConditioning"):
        req = info[node]["input"]["required"]
        views, frames = req["views"][1], req["frames"][1]
        assert views["max"] == 8 and frames["max"] == 16, (views, frames)
        assert "8 views for the embedded model" in views["tooltip"], views["tooltip"]
        assert "16 frames for the embedded model" in frames["tooltip"], frames["tooltip"]


def test_input_resized_to_the_model_size_is_said_in_the_log_and_the_figures(comfy):
    note = "input 64x64 downscaled to 32x32, the size the model was trained at"
    prompt = small_grid_prompt(views=2, frames=2, steps=2, prefix="test/resized", extra={
        "2": {"class_type": "Turbo4DLoadInput", "inputs": {"video": "turbo4d_example.mp4", "size": 64,
                                                           "frame_count": 2, "frame_stride": 1, "start_frame": 0}}})
    before = comfy.log_text()
    entry = comfy.run(prompt, timeout=120)
    out = entry["outputs"]["3"]
    assert out["text"][0].startswith("Turbo4D:") and out["text"][0].endswith(note), out["text"][0]
    assert out["turbo4d"][0]["summary"]["notes"] == [note]
    log = comfy.log_text()[len(before):]
    assert re.search(r"Turbo4D: .*compute .*; " + re.escape(note), log), log[-2000:]
    # at the model's size: no note
    prompt["2"]["inputs"]["size"] = 32
    out = comfy.run(prompt, timeout=120)["outputs"]["3"]
    assert "downscaled" not in out["text"][0] and out["turbo4d"][0]["summary"]["notes"] == []


def test_resize_note_reaches_the_log_line_of_the_stock_ksampler(comfy):
    before = comfy.log_text()
    comfy.run(conditioning_prompt(views=2, frames=2, size=48), timeout=120)
    log = comfy.log_text()[len(before):]
    assert re.search(r"Turbo4D: .*; input 48x48 downscaled to 32x32", log), log[-2000:]


def test_counts_of_one_are_singular(comfy):
    msg = None
    with pytest.raises(PromptFailed) as e:
        comfy.run(small_grid_prompt(views=2, frames=2, scene_frames=1, prefix="test/one"), timeout=120)
    msg = e.value.message
    assert "the input has only 1 frame (" in msg and "1 frames" not in msg, msg


def test_stats_line_counts_one_whole_step_in_the_singular():
    from turbo_core.accel.stats import BYPASSED, RunStats

    st = RunStats(blocks=1)
    st.timeline.append({"step": 0, "cells": {0: BYPASSED}})
    assert "(1 whole step)" in st.format_line()
    st.timeline.append({"step": 1, "cells": {0: BYPASSED}})
    assert "(2 whole steps)" in st.format_line()
