"""Where a 4D run starts: a reference video (a file or an IMAGE batch), or a procedural scene with
ground truth for every view."""
from __future__ import annotations

import logging
import os
import shutil

import torch

import folder_paths
from comfy_api.latest import io

from turbo_core.data.synth4d import SceneConfig, make_scene
from turbo_core.multiview import from_unit, square_resize, to_unit
from turbo_core.video_io import VIDEO_EXTENSIONS, VideoReadError, read_video
from turbo_core.words import count

from . import files, loaders
from .layout import layout_output, remember
from .model import PACK_DIR
from .types import Turbo4DInput, Turbo4DScene

log = logging.getLogger("turbo4d")

NODE = "Load 4D Input"
EXAMPLE_VIDEO = "turbo4d_example.mp4"
EXAMPLE_SOURCE = os.path.join(PACK_DIR, "workflows", "assets", EXAMPLE_VIDEO)


def install_example_video(input_dir: str | None = None) -> str | None:
    """Copies the shipped example video into ComfyUI's input folder once (when the list of input
    videos is first read, not on import), so the example workflow finds it; never overwrites a
    user's file of the same name."""
    input_dir = input_dir or folder_paths.get_input_directory()
    dst = os.path.join(input_dir, EXAMPLE_VIDEO)
    try:
        if os.path.isfile(EXAMPLE_SOURCE) and not os.path.exists(dst):
            os.makedirs(input_dir, exist_ok=True)
            shutil.copyfile(EXAMPLE_SOURCE, dst)
        return dst
    except OSError as e:
        log.warning("Turbo4D: could not copy the example video to %s (%s)", dst, e)
        return None


_example_installed = False


def input_videos() -> list[str]:
    global _example_installed
    if not _example_installed:  # once a process, like the copy on import it replaces
        install_example_video()
        _example_installed = True
    d = folder_paths.get_input_directory()
    try:
        names = [f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))]
    except OSError:
        names = []
    return sorted(f for f in names if f.lower().endswith(VIDEO_EXTENSIONS))


def video_path(video: str) -> str:
    """The video's path inside ComfyUI's input folder (nodes/files.py refuses a way out)."""
    return files.input_file(NODE, "video", video)


def _select(frames: torch.Tensor, frame_count: int, frame_stride: int, start_frame: int) -> torch.Tensor:
    sel = frames[start_frame::frame_stride]
    return sel[:frame_count] if frame_count > 0 else sel


class Load4DInput(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        videos = input_videos()
        return io.Schema(
            node_id="Turbo4DLoadInput",
            display_name="Load 4D Input",
            category="Turbo4D/input",
            description="The reference-view video of a 4D run: a video file from ComfyUI's input folder "
                        "(mp4, webm, gif, mov, avi), or an IMAGE batch, which takes precedence.",
            inputs=[
                io.Combo.Input("video", options=videos, default=EXAMPLE_VIDEO if EXAMPLE_VIDEO in videos else None,
                               upload=io.UploadType.video,
                               tooltip="A video in ComfyUI's input folder; upload one with the button. "
                                       "Ignored when the images input is connected."),
                io.Int.Input("size", default=32, min=8, max=1024, step=1,
                             tooltip="Frames are centre-cropped to a square and resized to size x size "
                                     f"pixels; use the model's resolution ({embedded_size()}). The MultiView "
                                     "nodes resize any other size to the model's, and their stats say so."),
                io.Int.Input("frame_count", default=8, min=0, max=4096,
                             tooltip="How many frames to take; 0 takes all of them."),
                io.Int.Input("frame_stride", default=1, min=1, max=64,
                             tooltip="Take every n-th frame (2 halves the frame rate)."),
                io.Int.Input("start_frame", default=0, min=0, max=100000,
                             tooltip="Index of the first frame to take."),
                io.Image.Input("images", optional=True,
                               tooltip="Optional frames of the reference view as an IMAGE batch; when "
                                       "connected they are used instead of the video file."),
            ],
            outputs=[
                Turbo4DInput.Output("input", display_name="input",
                                    tooltip="The reference video for the MultiView nodes."),
                io.Image.Output("frames", display_name="frames",
                                tooltip="The frames as loaded and resized, for a preview."),
            ],
        )

    @classmethod
    def validate_inputs(cls, video):
        # Declaring video here exempts it from ComfyUI's own option-list check (ComfyUI 0.8+ checks
        # V3 combos before the graph runs): a stale name must not reject a graph whose images input
        # is connected, and a missing file gets execute's message naming the file and the fix.
        return True

    @classmethod
    def fingerprint_inputs(cls, video, size, frame_count, frame_stride, start_frame, images=None):
        try:
            path = video_path(video) if video else ""
        except files.FileRefused:  # execute says why; nothing outside the folder is looked at
            return f"{video}:refused"
        mtime = os.path.getmtime(path) if path and os.path.exists(path) else None
        return f"{video}:{mtime}"

    @classmethod
    def execute(cls, video: str, size: int, frame_count: int, frame_stride: int, start_frame: int,
                images: torch.Tensor | None = None) -> io.NodeOutput:
        if images is not None:
            frames = _select(from_unit(images), frame_count, frame_stride, start_frame)
            if frames.shape[0] == 0:
                raise ValueError(f"Load 4D Input: the images input has {count(int(images.shape[0]), 'image')}, so "
                                 f"start_frame={start_frame} is past its end. Lower start_frame.")
            fps, source = 8.0, count(int(images.shape[0]), "image")
        else:
            if not video:
                raise ValueError("Load 4D Input: no video selected and no images connected. Upload a video "
                                 "or connect an IMAGE batch to images.")
            path = video_path(video)
            try:
                frames, fps = read_video(path, frame_count, frame_stride, start_frame)
            except VideoReadError as e:
                raise ValueError(f"Load 4D Input, video={video!r}: {e}") from e
            source = video
        frames = square_resize(frames, size)
        data = {"video": frames, "fps": float(fps), "source": source}
        return io.NodeOutput(data, to_unit(frames))


def embedded_size() -> str:
    cfg = loaders.scm_configs().get(loaders.EMBEDDED)
    return f"{cfg.image_size} for the embedded model" if cfg is not None else "see the model's config"


def embedded_limits() -> tuple:
    """The embedded model's limits for the scene's tooltips, from its config."""
    cfg = loaders.scm_configs().get(loaders.EMBEDDED)
    if cfg is None:
        return "see the model's config", "see the model's config"
    return f"{cfg.max_views} for the embedded model", f"{cfg.max_frames} for the embedded model"


class Synthetic4DScene(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        lim = embedded_limits()
        return io.Schema(
            node_id="Turbo4DSyntheticScene",
            display_name="Synthetic 4D Scene",
            category="Turbo4D/input",
            description="A procedural moving scene rendered from a ring of cameras: the reference view's "
                        "video as input, and the exact ground truth of every view and frame to compare with.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Which scene; the same seed gives the same scene on every machine."),
                io.Int.Input("views", default=4, min=1, max=64,
                             tooltip="Number of cameras on the ring (V); view 0 is the reference view. The "
                                     f"ground truth may have more views than a model samples ({lim[0]})."),
                io.Int.Input("frames", default=8, min=1, max=256,
                             tooltip="Number of frames (F). The sampler takes at most the model's max_frames "
                                     f"from the start ({lim[1]})."),
                io.Int.Input("size", default=32, min=8, max=512,
                             tooltip="Image side in pixels; use the model's resolution (32 for the embedded model)."),
                io.Float.Input("elevation", default=20.0, min=-89.0, max=89.0, step=0.5,
                               tooltip="Camera elevation above the floor plane, degrees."),
                io.Float.Input("azimuth_start", default=0.0, min=-360.0, max=360.0, step=1.0,
                               tooltip="Azimuth of view 0 (the reference view), degrees."),
                io.Float.Input("azimuth_span", default=360.0, min=0.0, max=360.0, step=1.0,
                               tooltip="The views spread evenly over this many degrees: "
                                       "azimuth_v = start + span * v / views."),
            ],
            outputs=[
                Turbo4DInput.Output("input", display_name="input", tooltip="The reference view's video."),
                io.Image.Output("ground_truth", display_name="ground_truth",
                                tooltip="All V x F ground-truth images, view-major: image v*F + f is view v "
                                        "at frame f."),
                Turbo4DScene.Output("scene", display_name="scene",
                                    tooltip="The scene's settings, cameras and ground truth."),
                layout_output("ground_truth"),
            ],
        )

    @classmethod
    def execute(cls, seed: int, views: int, frames: int, size: int, elevation: float, azimuth_start: float,
                azimuth_span: float) -> io.NodeOutput:
        cfg = SceneConfig(size=size, views=views, frames=frames, elevation_deg=elevation,
                          azimuth_start_deg=azimuth_start, azimuth_span_deg=azimuth_span)
        scene = make_scene(seed, cfg)
        gt = scene["ground_truth"].cpu()                                    # (F, V, 3, H, W)
        view_major = gt.transpose(0, 1).reshape(views * frames, *gt.shape[2:])
        data = {"video": scene["video"].cpu(), "fps": 8.0, "source": f"synthetic scene seed {seed}",
                "ground_truth": gt, "cameras": scene["cameras"].cpu()}
        info = {"seed": seed, "config": cfg, "cameras": scene["cameras"].cpu(), "ground_truth": gt,
                "masks": scene.get("masks")}
        truth = to_unit(view_major)
        return io.NodeOutput(data, truth, info, remember(truth, views, frames))


NODES = [Load4DInput, Synthetic4DScene]
