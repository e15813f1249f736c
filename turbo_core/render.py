"""Point-cloud renders of a video from a new camera path: what TrajectoryCrafter is conditioned on.

Each frame is lifted to a point cloud with its depth map and splatted into the new camera
(forward warp): every source pixel lands at its projected position, spread bilinearly over the
four nearest target pixels, weighted so the nearest surface wins (a soft z-buffer); target pixels
no point reaches are holes, which the diffusion model fills. Pure PyTorch, after the reference's
`models/utils.py` (Warper.forward_warp, bilinear_splatting, clean_points, sphere2pose,
generate_traj_specified) and `demo.py` (get_poses, the depth conversion of models/infer.py):

- depth: a depth estimator's disparity (near = bright), normalised to [0, 1] over the whole video,
  becomes depth 10000 / (3900 * disparity), clipped to [near, far];
- intrinsics: focal 500 px and the principal point at the centre for 1024 x 576 frames; other
  sizes keep that field of view (focal = 500 / 1024 of the width);
- the camera path ("target" mode, "gradual"): the source camera sits `radius` in front of the
  point at the first frame's central depth (radius = that depth x radius_scale, at most 5), and
  frame f's target camera is rotated about that point by theta (up) and phi (right), moved
  forward by r x radius and panned by x (right) and y (up), each ramped linearly from 0 at the
  first frame to its value at the last;
- the weights: bilinear proximity / exp(50 log(1 + d) / max log(1 + d)) with d the target depth
  (clamped to [0, 1000]), per frame.

One deliberate difference: points that land behind the target camera are dropped (the reference
lets them splat, with the largest weight, where their negative depth projects them).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_FOCAL = 500.0 / 1024.0  # focal length / image width of the reference's intrinsics
NEAR, FAR = 1e-4, 1e4
MAX_RADIUS = 5.0

# Camera paths: (theta up, phi right, r forward x radius, x right, y up), the reference's
# target_pose. "custom" takes the node's own values.
CAMERA_PRESETS = {
    "orbit_left": (0.0, -30.0, 0.0, 0.0, 0.0),
    "orbit_right": (0.0, 30.0, 0.0, 0.0, 0.0),
    "orbit_up": (20.0, 0.0, 0.0, 0.0, 0.0),
    "orbit_down": (-20.0, 0.0, 0.0, 0.0, 0.0),
    "orbit_left_dolly_in": (0.0, -30.0, 0.3, 0.0, 0.0),  # run.sh's example
    "dolly_in": (0.0, 0.0, 0.5, 0.0, 0.0),
    "dolly_out": (0.0, 0.0, -0.5, 0.0, 0.0),
    "pan_left": (0.0, 0.0, 0.0, -1.0, 0.0),
    "pan_right": (0.0, 0.0, 0.0, 1.0, 0.0),
    "pan_up": (0.0, 0.0, 0.0, 0.0, 1.0),
    "pan_down": (0.0, 0.0, 0.0, 0.0, -1.0),
}


def disparity_to_depth(disparity: torch.Tensor, near: float = NEAR, far: float = FAR) -> torch.Tensor:
    """A video's relative disparity (F, H, W), any range, near = large -> metric-like depth as the
    reference converts DepthCrafter's output: normalised to [0, 1] over the whole video, times
    3900, at least 1e-5, depth = 10000 / that, clipped to [near, far]."""
    d = disparity.float()
    lo, hi = d.min(), d.max()
    if float(hi - lo) <= 0:
        raise ValueError("the depth map is constant over the whole video: it has no depth to render from")
    d = (d - lo) / (hi - lo) * 3900.0
    d = d.clamp_min(1e-5)
    return (10000.0 / d).clamp(near, far)


def intrinsics(width: int, height: int, focal: float = REFERENCE_FOCAL) -> torch.Tensor:
    """3 x 3 pinhole intrinsics: focal = focal x width pixels, principal point at the centre."""
    f = focal * width
    return torch.tensor([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def _initial_pose() -> torch.Tensor:
    return torch.tensor([[-1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def sphere_to_pose(pose: torch.Tensor, theta: float, phi: float, r: float, x: float, y: float) -> torch.Tensor:
    """sphere2pose: move the (4, 4) pose by -r along z, +y along y, -x along x, then rotate it
    about the world x axis by theta and the y axis by phi (degrees)."""
    p = pose.clone()
    p[2, 3] -= r
    p[1, 3] += y
    p[0, 3] -= x
    th, ph = math.radians(theta), math.radians(phi)
    ct, st = math.cos(th), math.sin(th)
    cp, sp = math.cos(ph), math.sin(ph)
    rx = torch.tensor([[1, 0, 0, 0], [0, ct, -st, 0], [0, st, ct, 0], [0, 0, 0, 1]], dtype=p.dtype)
    ry = torch.tensor([[cp, 0, sp, 0], [0, 1, 0, 0], [-sp, 0, cp, 0], [0, 0, 0, 1]], dtype=p.dtype)
    return ry @ (rx @ p)


def camera_path(frames: int, radius: float, theta: float = 0.0, phi: float = 0.0, r: float = 0.0,
                x: float = 0.0, y: float = 0.0) -> torch.Tensor:
    """(frames, 4, 4) target poses ramping linearly from the source camera (frame 0) to
    (theta, phi, r x radius, x, y) at the last frame, `radius` in front of the orbit centre."""
    ramps = [np.linspace(0, v, frames).astype(np.float32) for v in (theta, phi, r * radius, x, y)]
    base = _initial_pose()
    poses = torch.stack([sphere_to_pose(base, *(float(a[i]) for a in ramps)) for i in range(frames)])
    poses[:, 2, 3] += radius
    return poses


def orbit_radius(depth: torch.Tensor, radius_scale: float = 1.0) -> float:
    """The orbit radius: the first frame's depth at its central pixel x radius_scale, at most 5."""
    h, w = depth.shape[-2:]
    return min(float(depth.reshape(-1, h, w)[0, h // 2, w // 2]) * float(radius_scale), MAX_RADIUS)


def forward_warp(frame: torch.Tensor, depth: torch.Tensor, pose_src: torch.Tensor, pose_tgt: torch.Tensor,
                 K_src: torch.Tensor, K_tgt: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Splats frames (B, C, H, W) in [-1, 1] with depths (B, 1, H, W) from poses (B, 4, 4) into the
    target poses: -> (warped (B, C, H, W), holes at -1; valid (B, 1, H, W), 1 where a point landed)."""
    b, c, h, w = frame.shape
    K_tgt = K_src if K_tgt is None else K_tgt
    frame, depth = frame.float(), depth.float()
    transform = pose_tgt.float() @ torch.linalg.inv(pose_src.float())                # (B, 4, 4)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).to(frame.device)          # (H, W, 3)
    rays = torch.einsum("bij,hwj->bhwi", torch.linalg.inv(K_src.float()).to(frame.device), pix)
    points = rays * depth[:, 0, :, :, None]                                            # (B, H, W, 3)
    points = torch.einsum("bij,bhwj->bhwi", transform[:, :3, :3].to(frame.device), points) \
        + transform[:, None, None, :3, 3].to(frame.device)
    proj = torch.einsum("bij,bhwj->bhwi", K_tgt.float().to(frame.device), points)
    z = proj[..., 2]
    front = z > 0
    pos = proj[..., :2] / torch.where(front, z, torch.ones_like(z))[..., None]          # (B, H, W, 2) x, y
    return _splat(frame, z, pos, front)


def _splat(frame: torch.Tensor, z: torch.Tensor, pos: torch.Tensor, front: torch.Tensor):
    b, c, h, w = frame.shape
    off = pos + 1  # one pixel of border on each side, cropped at the end
    lo = torch.floor(off)
    hi = torch.ceil(off)
    size = torch.tensor([w + 1, h + 1], dtype=off.dtype, device=off.device)
    off = torch.minimum(off.clamp_min(0), size)
    lo = torch.minimum(lo.clamp_min(0), size)
    hi = torch.minimum(hi.clamp_min(0), size)
    fx, fy = off[..., 0] - lo[..., 0], off[..., 1] - lo[..., 1]
    cx, cy = hi[..., 0] - off[..., 0], hi[..., 1] - off[..., 1]
    log_d = torch.log1p(z.clamp(0, 1000))
    denom = log_d.flatten(1).amax(dim=1).clamp_min(1e-12).view(b, 1, 1)
    base = front.float() / torch.exp(log_d / denom * 50.0)
    corners = [((1 - fy) * (1 - fx), lo[..., 1], lo[..., 0]), ((1 - cy) * (1 - fx), hi[..., 1], lo[..., 0]),
               ((1 - fy) * (1 - cx), lo[..., 1], hi[..., 0]), ((1 - cy) * (1 - cx), hi[..., 1], hi[..., 0])]
    acc = frame.new_zeros(b, (h + 2) * (w + 2), c)
    wacc = frame.new_zeros(b, (h + 2) * (w + 2), 1)
    values = frame.permute(0, 2, 3, 1).reshape(b, -1, c)
    for prox, row, col in corners:
        weight = (prox * base).reshape(b, -1, 1)
        index = (row.long() * (w + 2) + col.long()).reshape(b, -1, 1)
        acc.scatter_add_(1, index.expand(-1, -1, c), values * weight)
        wacc.scatter_add_(1, index, weight)
    acc = acc.view(b, h + 2, w + 2, c)[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
    wacc = wacc.view(b, h + 2, w + 2, 1)[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
    valid = wacc > 0
    warped = torch.where(valid, acc / wacc.clamp_min(1e-30), torch.full_like(acc, -1.0)).clamp(-1, 1)
    return warped, valid.to(frame.dtype)


def clean_holes(warped: torch.Tensor, valid: torch.Tensor, kernel: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's --mask option (clean_points): grow the holes by a kernel x kernel dilation,
    which removes the thin fringes of stray points along depth edges; -> (warped, valid)."""
    hole = (valid < 0.5).float()
    grown = F.max_pool2d(hole, kernel, stride=1, padding=kernel // 2)
    keep = 1.0 - grown
    return ((warped + 1) / 2 * keep) * 2 - 1, keep


def render_video(frames: torch.Tensor, depth: torch.Tensor, theta: float = 0.0, phi: float = 0.0, r: float = 0.0,
                 x: float = 0.0, y: float = 0.0, radius_scale: float = 1.0, focal: float = REFERENCE_FOCAL,
                 clean: bool = True, progress: Optional[Callable[[int], None]] = None) -> dict:
    """frames (F, 3, H, W) in [-1, 1], depth (F, H, W) metric-like (disparity_to_depth) -> the
    "gradual" render: frame f warped from its own camera (the path's first pose) to the path's
    pose f. Returns {"render": (F, 3, H, W) in [-1, 1] (holes -1), "valid": (F, 1, H, W),
    "radius", "poses"}."""
    n, _, h, w = frames.shape
    if depth.shape[0] < n or tuple(depth.shape[-2:]) != (h, w):
        raise ValueError(f"depth {tuple(depth.shape)} must cover the {n} frames at {h} x {w}")
    radius = orbit_radius(depth, radius_scale)
    poses = camera_path(n, radius, theta, phi, r, x, y)
    K = intrinsics(w, h, focal)[None]
    out, valid = [], []
    for i in range(n):
        wf, vf = forward_warp(frames[i:i + 1], depth[i:i + 1, None], poses[:1], poses[i:i + 1], K)
        if clean:
            wf, vf = clean_holes(wf, vf)
        out.append(wf)
        valid.append(vf)
        if progress is not None:
            progress(i + 1)
    return {"render": torch.cat(out), "valid": torch.cat(valid), "radius": radius, "poses": poses}
