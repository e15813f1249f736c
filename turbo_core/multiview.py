"""The V x F grid as tensors: the two image orders, and the per-image condition of one grid.

The model and its latents use the core's frame-major order (batch, frame, view) (see `layout.py`).
People look at a grid view by view, so what a user gets back is view-major: image `v * F + f` is
view v at frame f. These helpers are the only place the two orders meet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .words import count


@dataclass(frozen=True)
class GridLayout:
    """Where the views of a view-major batch of images start: image v * frames + f is view v at
    frame f. An image batch alone cannot say this (4 views x 8 frames and 2 x 16 hold the same 32
    images), so the nodes that make a grid hand one of these on beside it."""
    views: int
    frames: int

    def __post_init__(self):
        if self.views < 1 or self.frames < 1:
            raise ValueError(f"a grid layout needs at least 1 view and 1 frame, got {self.views} x {self.frames}")

    @property
    def images(self) -> int:
        return self.views * self.frames

    def __str__(self) -> str:
        return (f"{self.views} view{'s' if self.views != 1 else ''} x "
                f"{self.frames} frame{'s' if self.frames != 1 else ''}")


def check_grid(views: int, frames: int, max_views: int, max_frames: int, what: str = "views/frames") -> None:
    """Raises a ValueError naming the input and the fix when V or F is out of the model's range."""
    if views < 1:
        raise ValueError(f"views={views}: a grid needs at least 1 view. Set views to 1..{max_views}.")
    if frames < 1:
        raise ValueError(f"frames={frames}: a grid needs at least 1 frame. Set frames to 1..{max_frames}.")
    if views > max_views:
        raise ValueError(f"views={views} is more than this model supports ({max_views}). Set views to 1..{max_views}.")
    if frames > max_frames:
        raise ValueError(f"frames={frames} is more than this model supports ({max_frames}). "
                         f"Set frames to 1..{max_frames}, or load fewer frames.")


def frame_major_to_view_major(x: torch.Tensor, views: int, frames: int) -> torch.Tensor:
    """(B*F*V, ...) stacked (b, f, v) -> (B*V*F, ...) stacked (b, v, f)."""
    n = x.shape[0]
    if n % (views * frames):
        raise ValueError(f"{n} images are not a whole number of {views} x {frames} grids")
    b = n // (views * frames)
    return x.reshape(b, frames, views, *x.shape[1:]).transpose(1, 2).reshape(n, *x.shape[1:])


def grid_condition(video: torch.Tensor, cameras: torch.Tensor, views: int, frames: int) -> dict:
    """The per-image condition of one V x F grid, frame-major like the latents.

    video: (>=frames, 3, H, W) reference-view frames in [-1, 1]; cameras: (views, 2) [azimuth,
    elevation] radians. Returns reference (N, 3, H, W) (every view of frame f sees frame f of the
    reference video, as SV4D concatenates the input frame), camera (N, 2) and frame_index (N,)."""
    if video.shape[0] < frames:
        raise ValueError(f"the input video has {count(int(video.shape[0]), 'frame')}, fewer than frames={frames}")
    if cameras.shape != (views, 2):
        raise ValueError(f"cameras must be ({views}, 2), got {tuple(cameras.shape)}")
    ref = video[:frames].float()
    reference = ref.repeat_interleave(views, dim=0)                    # (F*V, 3, H, W)
    camera = cameras.float().repeat(frames, 1)                         # view v at row f*V + v
    frame_index = torch.arange(frames).repeat_interleave(views)        # frame f at row f*V + v
    return {"reference": reference, "camera": camera, "frame_index": frame_index}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (N, H, W, 3) in [0, 1]."""
    return ((images.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1).contiguous()


def from_unit(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, C) in [0, 1] -> (N, 3, H, W) in [-1, 1] (grey and alpha handled)."""
    x = images.float()
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x[..., :3]
    return (x.movedim(-1, 1) * 2.0 - 1.0).contiguous()


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): centre crop to a square, then area-downscale or
    bilinear-upscale (area keeps small renders from aliasing)."""
    _, _, h, w = images.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = images[:, :, top:top + s, left:left + s].float()
    if s == size:
        return x.contiguous()
    mode = "area" if s > size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(x, size=(size, size), mode=mode, **kw)
