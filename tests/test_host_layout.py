"""The V x F layout travels with the images (nodes/layout.py), on the real server: a 4-view run
saved or previewed by a node whose own views says 2 still gives one file per real view, holding
that view's frames and nothing else; where the layout is not wired, a views count that disagrees
with the sampler's grid is refused before any file is written; an IMAGE batch from any other node
is still split by the typed views count, as before."""
import os

import av
import numpy as np
import pytest
from PIL import Image

from comfy_host import PromptFailed

V, F = 4, 2


def grid_prompt(prefix: str, save_views: int, wire_layout: bool, preview: bool = True) -> dict:
    """Loader -> Synthetic 4D Scene -> a 4 x 2 MultiView Sampler run -> Save MultiView (+ Preview),
    and ComfyUI's stock Save Image on the same images: the batch in its true order, image by image."""
    p = {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DSyntheticScene",
              "inputs": {"seed": 11, "views": V, "frames": F, "size": 32, "elevation": 20.0, "azimuth_start": 0.0,
                         "azimuth_span": 360.0}},
        "3": {"class_type": "Turbo4DMultiViewSampler",
              "inputs": {"model": ["1", 0], "input": ["2", 0], "views": V, "frames": F, "elevation": 20.0,
                         "azimuth_span": 360.0, "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "karras"}},
        "4": {"class_type": "Turbo4DSaveMultiView",
              "inputs": {"images": ["3", 0], "views": save_views, "fps": 8.0, "filename_prefix": prefix, "scale": 4}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"{prefix}_stock"}},
    }
    if preview:
        p["6"] = {"class_type": "Turbo4DMultiViewPreview", "inputs": {"images": ["3", 0], "views": save_views,
                                                                      "fps": 8.0}}
    if wire_layout:
        p["4"]["inputs"]["layout"] = ["3", 4]
        if preview:
            p["6"]["inputs"]["layout"] = ["3", 4]
    return p


def _png(comfy, item, folder=None) -> np.ndarray:
    base = folder or comfy.output_directory
    return np.asarray(Image.open(os.path.join(base, item.get("subfolder", ""), item["filename"])).convert("RGB"),
                      dtype=np.int16)


def _mp4(path) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def _temp_directory(comfy) -> str:
    return os.path.join(comfy.base_dir, "temp")


def test_four_view_run_saved_with_views_2_gives_the_four_true_views(comfy):
    entry = comfy.run(grid_prompt("test/layout_wired", save_views=2, wire_layout=True), timeout=180)
    truth = np.stack([_png(comfy, it) for it in entry["outputs"]["5"]["images"]])  # (V*F, 32, 32, 3), v*F + f
    assert truth.shape[0] == V * F
    assert min(np.abs(truth[i] - truth[j]).mean() for i in range(V * F) for j in range(V * F) if i != j) > 1.0, \
        "the test needs distinguishable images"

    out = entry["outputs"]["4"]
    assert out["grid"] == [{"views": V, "frames": F}]
    assert len(out["videos"]) == V
    grid = _png(comfy, out["images"][0])[::4, ::4]  # scale 4: every 4th pixel is one source pixel
    assert grid.shape == (V * 32, F * 32, 3)
    for v in range(V):
        for f in range(F):
            assert np.abs(grid[v * 32:(v + 1) * 32, f * 32:(f + 1) * 32] - truth[v * F + f]).max() <= 1, (v, f)
        frames = _mp4(os.path.join(comfy.output_directory, out["videos"][v]["subfolder"], out["videos"][v]["filename"]))
        assert frames.shape[0] == F, (v, frames.shape)
        small = frames.reshape(F, 32, 4, 32, 4, 3).mean(axis=(2, 4))  # undo the 4x nearest upscale
        for f in range(F):
            err = np.abs(small[f][None] - truth).mean(axis=(1, 2, 3))
            # H.264 is lossy: frame f of view v is the closest image of the batch, and close.
            assert int(err.argmin()) == v * F + f and err[v * F + f] < 6.0, (v, f, err.round(2))

    # The preview splits the same way (its PNGs are lossless).
    data = entry["outputs"]["6"]["turbo4d_preview"][0]
    assert (data["views"], data["frames"]) == (V, F)
    for v in range(V):
        for f in range(F):
            cell = _png(comfy, data["cells"][v][f], _temp_directory(comfy))
            assert np.abs(cell - truth[v * F + f]).max() <= 1, (v, f)


def test_views_that_disagree_with_an_unwired_sampler_are_refused_before_any_file(comfy):
    for node in ("4", "6"):  # Save MultiView, then MultiView Preview
        prefix = f"test/layout_refused_{node}"
        prompt = grid_prompt(prefix, save_views=V, wire_layout=False)
        prompt[node]["inputs"]["views"] = 2
        with pytest.raises(PromptFailed) as e:
            comfy.run(prompt, timeout=180)
        msg = e.value.message
        assert e.value.node_type == prompt[node]["class_type"], e.value
        assert "4 views x 2 frames" in msg and "views=2" in msg and "layout" in msg and "set views to 4" in msg, msg
    folder = os.path.join(comfy.output_directory, "test")
    written = [f for f in os.listdir(folder) if f.startswith("layout_refused_4_0")]  # Save's own files
    assert not written, written
    # The matching count still saves, unwired (a workflow from before the layout socket).
    entry = comfy.run(grid_prompt("test/layout_unwired", save_views=V, wire_layout=False), timeout=180)
    assert entry["outputs"]["4"]["grid"] == [{"views": V, "frames": F}] and len(entry["outputs"]["4"]["videos"]) == V


def test_images_from_another_node_are_split_by_views_and_checked_against_a_wired_layout(comfy):
    # Through a stock node the batch is a new IMAGE: the typed views decides, as for any IMAGE.
    prompt = grid_prompt("test/layout_other", save_views=2, wire_layout=False, preview=False)
    prompt["7"] = {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}}
    prompt["4"]["inputs"]["images"] = ["7", 0]
    entry = comfy.run(prompt, timeout=180)
    assert entry["outputs"]["4"]["grid"] == [{"views": 2, "frames": V * F // 2}]
    # The same batch with the sampler's layout wired: split into the sampler's 4 views.
    prompt["4"]["inputs"]["layout"] = ["3", 4]
    entry = comfy.run(prompt, timeout=180)
    assert entry["outputs"]["4"]["grid"] == [{"views": V, "frames": F}]
    # A layout that does not describe the images is refused, naming both.
    prompt["8"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["3", 0], "batch_index": 0, "length": 6}}
    prompt["4"]["inputs"]["images"] = ["8", 0]
    with pytest.raises(PromptFailed) as e:
        comfy.run(prompt, timeout=180)
    msg = e.value.message
    assert "4 views x 2 frames = 8 images" in msg and "holds 6" in msg and "same node" in msg, msg


def test_every_grid_node_outputs_its_layout(comfy):
    """Synthetic 4D Scene's ground truth and MultiView Latent to Image (after the stock KSampler)
    carry their layout too."""
    prompt = {
        "1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": "embedded default", "weight_dtype": "auto"}},
        "2": {"class_type": "Turbo4DSyntheticScene",
              "inputs": {"seed": 11, "views": 3, "frames": 2, "size": 32, "elevation": 20.0, "azimuth_start": 0.0,
                         "azimuth_span": 360.0}},
        "3": {"class_type": "Turbo4DMultiViewConditioning",
              "inputs": {"model": ["1", 0], "input": ["2", 0], "views": 3, "frames": 2, "elevation": 20.0,
                         "azimuth_span": 360.0}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["3", 2], "seed": 0, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0}},
        "5": {"class_type": "Turbo4DLatentToImage", "inputs": {"latent": ["4", 0]}},
        "6": {"class_type": "Turbo4DSaveMultiView", "inputs": {"images": ["5", 0], "layout": ["5", 1], "views": 1,
                                                               "fps": 8.0, "filename_prefix": "test/layout_ks",
                                                               "scale": 1}},
        "7": {"class_type": "Turbo4DMultiViewPreview", "inputs": {"images": ["2", 1], "layout": ["2", 3], "views": 1,
                                                                  "fps": 8.0}},
    }
    entry = comfy.run(prompt, timeout=180)
    assert entry["outputs"]["6"]["grid"] == [{"views": 3, "frames": 2}]
    data = entry["outputs"]["7"]["turbo4d_preview"][0]
    assert (data["views"], data["frames"]) == (3, 2)
    info = comfy.object_info()
    for node, slot in (("Turbo4DMultiViewSampler", 4), ("Turbo4DLatentToImage", 1), ("Turbo4DSyntheticScene", 3),
                       ("Turbo4DSV4DSampler", 4)):
        assert info[node]["output"][slot] == "TURBO4D_LAYOUT" and info[node]["output_name"][slot] == "layout", node
    for node in ("Turbo4DSaveMultiView", "Turbo4DMultiViewPreview"):
        assert info[node]["input"]["optional"]["layout"][0] == "TURBO4D_LAYOUT", node
