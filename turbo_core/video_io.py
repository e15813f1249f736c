"""Reading a reference video and writing multi-view results: files in, tensors out, and back.

Reading goes through OpenCV (mp4, webm, gif, mov, avi). Writing uses PyAV with libx264 and
yuv420p, because that is what a browser plays: OpenCV's own mp4 writer only has MPEG-4 Part 2
("mp4v"), which Chromium and so ComfyUI's frontend refuse.
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch

from .words import count

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov", ".avi", ".mkv", ".m4v")


class VideoReadError(ValueError):
    """A video that cannot be used, with the file and the fix in the message."""


def read_video(path: str, frame_count: int = 0, frame_stride: int = 1, start_frame: int = 0) -> tuple[torch.Tensor, float]:
    """Frames (F, 3, H, W) in [-1, 1] RGB and the effective fps (source fps / stride).

    Takes frames start_frame, start_frame + stride, ... until frame_count frames (0 = to the end).
    Returns fewer than frame_count frames when the video ends first; the caller decides."""
    import cv2

    name = os.path.basename(path)
    if frame_stride < 1:
        raise VideoReadError(f"frame_stride={frame_stride}: it must be at least 1.")
    if start_frame < 0 or frame_count < 0:
        raise VideoReadError("start_frame and frame_count must not be negative.")
    if not os.path.isfile(path):
        raise VideoReadError(f"video file not found: {path}. Put it in ComfyUI's input folder or upload it "
                             f"on the Load 4D Input node.")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise VideoReadError(f"{name} could not be opened as a video: it is damaged or not a video. "
                                 f"Re-export it as mp4 (H.264) or webm, or connect frames to the images input.")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        frames, index = [], 0
        while frame_count == 0 or len(frames) < frame_count:
            ok, bgr = cap.read()
            if not ok:
                break
            if index >= start_frame and (index - start_frame) % frame_stride == 0:
                frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise VideoReadError(f"no frame could be decoded from {name}: the file is empty, damaged or not a video. "
                             f"Re-export it as mp4 (H.264) or webm, or connect frames to the images input.")
    if not frames:
        raise VideoReadError(f"{name} has {count(index, 'frame')}, so start_frame={start_frame} is past its end. "
                             f"Set start_frame below {index}.")
    arr = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    fps = fps / frame_stride if fps > 0 else 8.0
    return arr / 127.5 - 1.0, fps


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE (N, H, W, 3) in [0, 1] -> uint8 numpy (N, H, W, 3)."""
    return (images.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def upscale_nearest(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> each pixel a factor x factor block, so tiny renders stay crisp on screen."""
    if factor <= 1:
        return images
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows*cols, H, W, C) in row-major order -> one (rows*H, cols*W, C) image."""
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows} x {cols} grid")
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def write_mp4(path: str, frames: np.ndarray, fps: float, crf: int = 16) -> None:
    """(F, H, W, 3) uint8 RGB -> H.264 (yuv420p) mp4 that browsers play. Odd sizes are padded by one
    pixel (yuv420p needs even sides)."""
    import av

    f, h, w, _ = frames.shape
    ph, pw = h + (h % 2), w + (w % 2)
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1000) if fps > 0 else Fraction(8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
