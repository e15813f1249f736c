"""MultiView Preview: the V x F result as an interactive viewer inside the node.

The node writes every (view, frame) image as a small PNG to ComfyUI's temp folder and returns
their names in its ui output; web/turbo4d_preview.js builds the viewer (frame slider, one button per
view, play the frames, play the orbit) from it. The pixels are kept at their native size; the
browser scales them up without smoothing.
"""
from __future__ import annotations

import os
import uuid

from PIL import Image

import folder_paths
from comfy_api.latest import io

from turbo_core.video_io import to_uint8

from .layout import VIEWS_TOOLTIP, layout_input, resolve

UI_KEY = "turbo4d_preview"
SUBFOLDER = "turbo4d_preview"


class MultiViewPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DMultiViewPreview",
            display_name="MultiView Preview",
            category="Turbo4D/output",
            description="An interactive viewer of the V x F result inside the node: drag the slider to "
                        "scrub frames, click a view to switch camera, Play runs the frames, Orbit moves "
                        "the camera around while time runs. Nothing is saved to the output folder.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="V x F images in view-major order (image v*F + f is view v at "
                                                 "frame f), as MultiView Sampler and Synthetic 4D Scene give them."),
                layout_input(),
                io.Int.Input("views", default=4, min=1, max=64, tooltip=VIEWS_TOOLTIP),
                io.Float.Input("fps", default=8.0, min=0.5, max=60.0, step=0.5, tooltip="Playback speed."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, images, views: int, fps: float, layout=None) -> io.NodeOutput:
        grid_layout = resolve("MultiView Preview", images, layout, views)
        views, frames = grid_layout.views, grid_layout.frames
        pix = to_uint8(images[..., :3])
        folder = os.path.join(folder_paths.get_temp_directory(), SUBFOLDER)
        os.makedirs(folder, exist_ok=True)
        stem = uuid.uuid4().hex[:12]
        cells = []
        for v in range(views):
            row = []
            for f in range(frames):
                name = f"{stem}_v{v:02d}_f{f:03d}.png"
                Image.fromarray(pix[v * frames + f]).save(os.path.join(folder, name), compress_level=1)
                row.append({"filename": name, "subfolder": SUBFOLDER, "type": "temp"})
            cells.append(row)
        h, w = int(pix.shape[1]), int(pix.shape[2])
        return io.NodeOutput(ui={UI_KEY: [{"views": views, "frames": frames, "width": w, "height": h,
                                           "fps": float(fps), "cells": cells}]})


NODES = [MultiViewPreview]
