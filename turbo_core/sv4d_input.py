"""The input preparation of SV4D's reference scripts (scripts/demo/sv4d_helpers.py, preprocess_video,
in Stability-AI/generative-models), as torch maths on ComfyUI-style images.

SV4D and SV4D 2.0 were trained on objects filling a fixed share of a white square frame; the scripts
bring a video to that framing before anything else:

1. one box for the whole video: a square centred on the frame's centre, just large enough to hold
   every frame's object. The object is the pixels that are not white (channel mean at most 250 of
   255) or, for an RGBA video, the pixels that are not fully transparent;
2. that box goes in the middle of a larger empty square, so that the box is `frame_ratio` of its
   side (SV4D's script: 0.917, SV4D 2.0's: 0.9); what lies outside the video is empty;
3. the alpha is composited over white (empty counts as transparent), and the square resized to the
   model's size with a Lanczos filter (3 lobes, widened when downscaling so that it also
   antialiases, the filter PIL's `Image.LANCZOS` uses).

The scripts composite after resizing the RGBA square; Lanczos resampling is linear and keeps a
constant, so compositing first gives the same image (up to the scripts' 8-bit rounding).
"""
from __future__ import annotations

import functools

import torch

WHITE_THRESHOLD = 250 / 255  # the scripts' "white": a channel mean above 250 of 255
LANCZOS_LOBES = 3


def object_box(images: torch.Tensor, white_threshold: float = WHITE_THRESHOLD) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), end-exclusive, of the object in all frames together; images (N, H, W, C)
    in [0, 1], C = 3 (the object is what is not white) or 4 (what is not fully transparent).
    (0, 0, 0, 0) when every pixel is background."""
    if images.shape[-1] == 4:
        mask = images[..., 3] > 0
    else:
        # 8-bit values as the scripts compare them, so that 250/255 is not lost to float rounding
        mask = torch.round(images[..., :3].float() * 255).mean(-1) <= white_threshold * 255 + 1e-6
    mask = mask.any(0)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return 0, 0, 0, 0
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def box_half_side(height: int, width: int, box: tuple[int, int, int, int]) -> int:
    """Half the side of the square around the frame's centre (height // 2, width // 2) that holds
    `box`; an empty box gives the square around the whole frame."""
    y0, x0, y1, x1 = box
    cy, cx = height // 2, width // 2
    return max(cy - y0, cx - x0, y1 - cy, x1 - cx, 1)


@functools.lru_cache(maxsize=8)  # every frame of a video has the same sizes
def lanczos_matrix(n_in: int, n_out: int, lobes: int = LANCZOS_LOBES) -> torch.Tensor:
    """(n_out, n_in) float32 weights resampling one axis of n_in pixels to n_out: output pixel i is centred
    at input coordinate (i + 0.5) * n_in / n_out; the Lanczos kernel is stretched by the scale when
    downscaling (so it low-passes); rows are normalised, so edges renormalise over the pixels that
    exist."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    pos = torch.arange(n_in, dtype=torch.float64) + 0.5
    x = (pos[None, :] - centres[:, None]) / stretch
    w = torch.sinc(x) * torch.sinc(x / lobes)
    w = torch.where(x.abs() < lobes, w, torch.zeros_like(w))
    return (w / w.sum(1, keepdim=True)).float()


def lanczos_resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, height, width, C), separable Lanczos (lanczos_matrix on each axis) as two
    matrix products in float32; values may overshoot [0, 1] as Lanczos does."""
    n, h, w, c = images.shape
    mh, mw = lanczos_matrix(h, height), lanczos_matrix(w, width)
    out = torch.empty(n, height, width, c)
    for i in range(n):
        x = images[i].float().permute(2, 0, 1)               # (C, H, W)
        out[i] = (mh @ x @ mw.T).permute(1, 2, 0)
    return out


def prepare_sv4d_input(images: torch.Tensor, size: int, frame_ratio: float,
                       white_threshold: float = WHITE_THRESHOLD) -> torch.Tensor:
    """The reference scripts' framing of an input video: images (N, H, W, C) in [0, 1], C = 1, 3 or
    4 (RGBA) -> (N, size, size, 3) in [0, 1]. See the module docstring."""
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"the input video must be an IMAGE batch (frames, height, width, 1/3/4 channels); "
                         f"got shape {tuple(images.shape)}")
    if not 0 < frame_ratio <= 1:
        raise ValueError(f"frame_ratio={frame_ratio}: the object box's share of the frame must be in (0, 1]")
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    n, h, w, c = images.shape
    half = box_half_side(h, w, object_box(images, white_threshold))
    side = max(int(2 * half / frame_ratio), 1)
    # The box (a square around the frame's centre) goes in the middle of the padded square, so a
    # frame pixel (y, x) lands at (y + dy, x + dx); the box may reach past the frame, which is empty.
    dy, dx = side // 2 - h // 2, side // 2 - w // 2
    y0, x0 = max(h // 2 - half, 0, -dy), max(w // 2 - half, 0, -dx)
    y1, x1 = min(h // 2 + half, h, side - dy), min(w // 2 + half, w, side - dx)
    out = torch.empty(n, size, size, 3)
    for i in range(n):  # a frame at a time: the padded squares of a whole HD video are large
        canvas = torch.ones(1, side, side, 3)
        rgb = images[i, y0:y1, x0:x1, :3].float()
        if c == 4:
            a = images[i, y0:y1, x0:x1, 3:4].float()
            rgb = rgb * a + (1 - a)
        canvas[0, y0 + dy:y1 + dy, x0 + dx:x1 + dx] = rgb
        out[i] = lanczos_resize(canvas, size, size)[0].clamp(0, 1)
    return out


def describe(frame_ratio: float) -> str:
    return f"object crop at frame ratio {frame_ratio:g}, alpha over white, Lanczos"

