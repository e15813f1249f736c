"""Save MultiView: a V x F grid PNG and one browser-playable H.264 mp4 per view."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import folder_paths
from comfy.cli_args import args
from comfy_api.latest import io

from turbo_core.video_io import grid, to_uint8, upscale_nearest, write_mp4

from . import files
from .layout import VIEWS_TOOLTIP, layout_input, resolve


class SaveMultiView(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DSaveMultiView",
            display_name="Save MultiView",
            category="Turbo4D/output",
            description="Writes a V x F grid PNG (rows = views, columns = frames; it holds the workflow like "
                        "ComfyUI's own PNGs) and one H.264 mp4 per view to ComfyUI's output folder.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="V x F images in view-major order (image v*F + f is view v at "
                                                 "frame f), as MultiView Sampler and Synthetic 4D Scene give them."),
                layout_input(),
                io.Int.Input("views", default=4, min=1, max=64, tooltip=VIEWS_TOOLTIP),
                io.Float.Input("fps", default=8.0, min=0.1, max=120.0, step=0.1, tooltip="Frame rate of the mp4s."),
                io.String.Input("filename_prefix", default="turbo4d/multiview",
                                tooltip="Output file prefix, relative to ComfyUI's output folder; may hold "
                                        "%date% style fields like the stock Save Image."),
                io.Int.Input("scale", default=4, min=1, max=16,
                             tooltip="Each pixel becomes a scale x scale block in the saved files, so small "
                                     "renders are visible; 1 keeps the native pixels."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, images, views: int, fps: float, filename_prefix: str, scale: int,
                layout=None) -> io.NodeOutput:
        grid_layout = resolve("Save MultiView", images, layout, views)
        views, frames = grid_layout.views, grid_layout.frames
        pix = upscale_nearest(to_uint8(images[..., :3]), scale)
        h, w = pix.shape[1:3]
        files.output_prefix("Save MultiView", "filename_prefix", filename_prefix)  # no way out of output/
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, w, h)
        stem = f"{name}_{counter:05}_"

        grid_name = f"{stem}grid.png"
        Image.fromarray(grid(pix, views, frames)).save(os.path.join(folder, grid_name), pnginfo=cls._png_info(),
                                                         compress_level=4)
        videos = []
        for v in range(views):
            vid_name = f"{stem}view{v:02d}.mp4"
            write_mp4(os.path.join(folder, vid_name), np.ascontiguousarray(pix[v * frames:(v + 1) * frames]), fps)
            videos.append({"filename": vid_name, "subfolder": subfolder, "type": "output"})
        ui = {"images": [{"filename": grid_name, "subfolder": subfolder, "type": "output"}],
              "videos": videos, "grid": [{"views": views, "frames": frames}]}
        return io.NodeOutput(ui=ui)

    @classmethod
    def _png_info(cls):
        if args.disable_metadata:
            return None
        info = PngInfo()
        hidden = cls.hidden
        if hidden is not None and hidden.prompt is not None:
            info.add_text("prompt", json.dumps(hidden.prompt))
        if hidden is not None and hidden.extra_pnginfo is not None:
            for k, v in hidden.extra_pnginfo.items():
                info.add_text(k, json.dumps(v))
        return info


NODES = [SaveMultiView]
