"""Behaviour that newer ComfyUI releases changed under the pack, held the same on every version the
suite runs against (CI: 0.3.75; scripts/setup_host.sh installs a newer tree with TURBO4D_COMFY_GIT).

Since 0.8.0 ComfyUI checks the value of every V3 combo against its option list before the graph
runs. A file name that is not (or no longer) in the list must still reach the pack's own message
naming the folder and the fix, and must not reject a graph that does not read the file at all."""
import pytest

from comfy_host import PromptFailed, PromptRejected


def _failure_message(comfy, prompt) -> str:
    """The message the user gets, whether ComfyUI rejects the graph or the node fails when it runs."""
    try:
        comfy.run(prompt, timeout=120)
    except PromptFailed as e:
        return e.message
    except PromptRejected as e:
        return str(e)
    pytest.fail("the prompt ran to success")


def _scene(seed=3, views=2, frames=3):
    return {"class_type": "Turbo4DSyntheticScene",
            "inputs": {"seed": seed, "views": views, "frames": frames, "size": 32, "elevation": 20.0,
                       "azimuth_start": 0.0, "azimuth_span": 360.0}}


def test_missing_model_file_names_the_folder_and_the_fix(comfy):
    prompt = {
        "1": {"class_type": "Turbo4DModelLoader",
              "inputs": {"model_name": "gone_model_test.safetensors", "weight_dtype": "auto"}},
        "2": _scene(),
        "3": {"class_type": "Turbo4DMultiViewSampler",
              "inputs": {"model": ["1", 0], "input": ["2", 0], "views": 2, "frames": 3, "elevation": 20.0,
                         "azimuth_span": 360.0, "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "karras"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    msg = _failure_message(comfy, prompt)
    assert "Value not in list" not in msg, msg
    assert "gone_model_test.safetensors" in msg and "models/turbo4d/" in msg, msg
    assert "Turbo4D Model Loader" in msg and "embedded default" in msg, msg


def test_missing_video_names_the_file_and_the_fix(comfy):
    prompt = {
        "1": {"class_type": "Turbo4DLoadInput", "inputs": {"video": "gone_clip_test.mp4", "size": 32,
                                                           "frame_count": 2, "frame_stride": 1, "start_frame": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }
    msg = _failure_message(comfy, prompt)
    assert "Value not in list" not in msg, msg
    assert "gone_clip_test.mp4" in msg and "Load 4D Input" in msg and "upload" in msg, msg


def test_connected_images_run_whatever_the_video_name(comfy):
    """The video widget keeps the name of a file since deleted (or of another machine's input
    folder); with images connected the node never reads it, so the graph must run."""
    prompt = {
        "1": _scene(seed=4, views=2, frames=3),
        "2": {"class_type": "Turbo4DLoadInput", "inputs": {"video": "gone_clip_test.mp4", "size": 32,
                                                           "frame_count": 0, "frame_stride": 1, "start_frame": 0,
                                                           "images": ["1", 1]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    entry = comfy.run(prompt, timeout=60)
    assert len(entry["outputs"]["3"]["images"]) == 2 * 3
