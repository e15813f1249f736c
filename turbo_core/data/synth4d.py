"""Procedural 4D scenes with exact ground truth for every view and frame.

A scene is a floor disc under a sky gradient holding 1..max_primitives spheres, ellipsoids and
boxes that travel, spin and pulse over the clip. Each (frame, view) is ray cast analytically
from a ring of pinhole cameras, so the whole (frame, view) grid is exact ground truth for a
multi-view video model that sees only the reference view's video.

Every random number of a scene comes from one CPU torch.Generator seeded with the scene's seed,
so a seed names the same scene on every device and batch; only the rendering runs on `device`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SceneConfig:
    size: int = 32  # square image side in pixels
    views: int = 4
    frames: int = 8
    elevation_deg: float = 20.0  # camera elevation of the orbit
    azimuth_start_deg: float = 0.0  # azimuth of view 0 = the reference (input) view
    azimuth_span_deg: float = 360.0  # views spread evenly over this span: az_v = start + span * v / views
    radius: float = 4.0  # orbit radius; cameras look at the origin
    fov_deg: float = 40.0
    max_primitives: int = 3


_FLOOR_Z = -0.6
_FLOOR_RADIUS = 1.8
_LIGHT = (0.4, 0.25, 0.9)  # towards the light; from above and to one side so shading varies by view
_AMBIENT = 0.35
_DIFFUSE = 0.65
_SHADOW = 0.5  # darkening at the centre of a primitive's blob shadow

# Rays per rendering chunk: on a CPU small chunks keep the working set in cache, on a GPU large
# chunks keep the kernels busy; both bound memory for any batch size.
_CHUNK_RAYS_CPU = 1 << 15
_CHUNK_RAYS_GPU = 1 << 22

# Layout of the uniform numbers drawn per scene, then per primitive slot. Scene fields come
# first so that raising max_primitives leaves the floor, sky and earlier primitives unchanged.
_SCENE_FIELDS = (("count", 1), ("floor_hue", 5), ("floor_sat", 4), ("floor_val", 4), ("sky", 5))
_PRIM_FIELDS = (
    ("kind", 1), ("size", 3), ("color", 6), ("checker", 1), ("freq", 1), ("offset", 3),
    ("base", 3), ("amp", 3), ("mfreq", 3), ("mphase", 3), ("axis", 2), ("angle0", 1), ("spin", 1),
    ("pulse", 3), ("pphase", 3), ("pfreq", 1),
)  # fmt: skip


def _width(fields):
    return sum(n for _, n in fields)


def _split(u, fields):
    out, i = {}, 0
    for name, n in fields:
        out[name] = u[..., i : i + n]
        i += n
    return out


def _hsv(h, s, v):
    """(...) hue/saturation/value in [0, 1] -> (..., 3) RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype) + h[..., None] * 6) % 6
    return v[..., None] * (1 - s[..., None] * torch.minimum(k, 4 - k).clamp(0, 1))


def _rotation(axis, angle):
    """Rodrigues: unit axis (..., 3), angle (...) -> (..., 3, 3)."""
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))
    c, s = angle.cos()[..., None, None], angle.sin()[..., None, None]
    eye = torch.eye(3, dtype=axis.dtype)
    return c * eye + s * cross + (1 - c) * axis[..., :, None] * axis[..., None, :]


def camera_angles(cfg: SceneConfig, device=None) -> torch.Tensor:
    """(views, 2) float32 [azimuth, elevation] in radians; view 0 is the reference view."""
    v = torch.arange(cfg.views, dtype=torch.float64)
    az = math.radians(cfg.azimuth_start_deg) + math.radians(cfg.azimuth_span_deg) * v / cfg.views
    el = torch.full_like(az, math.radians(cfg.elevation_deg))
    return torch.stack([az, el], -1).to(device=device, dtype=torch.float32)


def _camera_rays(cfg: SceneConfig):
    """Eye positions (V, 3) and unit ray directions (V, 3, P), P = H*W in row-major pixel order."""
    az, el = camera_angles(cfg).double().unbind(-1)
    ce, se = el.cos(), el.sin()
    eye = cfg.radius * torch.stack([ce * az.cos(), ce * az.sin(), se], -1)
    fwd = -eye / cfg.radius
    # cross(fwd, z) written out: stays defined when the camera looks straight down
    right = torch.stack([-az.sin(), az.cos(), torch.zeros_like(az)], -1)
    up = torch.linalg.cross(right, fwd)
    n = cfg.size
    half = math.tan(math.radians(cfg.fov_deg) / 2)
    coords = (2 * (torch.arange(n, dtype=torch.float64) + 0.5) / n - 1) * half
    u = coords.repeat(n)  # pixel column, left to right
    w = -coords.repeat_interleave(n)  # pixel row, top of the image is up
    dirs = fwd[:, :, None] + right[:, :, None] * u + up[:, :, None] * w
    return eye, dirs / dirs.norm(dim=1, keepdim=True)


def _background_weights(eye, dirs):
    """Per-ray weights (V, 6, P) of the 4 floor corner colours, sky horizon and sky zenith,
    plus floor hit positions (V, 2, P) and floor hit distances (V, P), inf where the floor is missed.
    """
    dz = dirs[:, 2]
    t = (_FLOOR_Z - eye[:, 2, None]) / dz
    xy = eye[:, :2, None] + t[:, None] * dirs[:, :2]
    r2 = (xy * xy).sum(1) / _FLOOR_RADIUS**2
    floor = (t > 0) & (r2 < 1)
    tx, ty = (xy / _FLOOR_RADIUS * 0.5 + 0.5).clamp(0, 1).unbind(1)
    light = torch.tensor(_LIGHT, dtype=dirs.dtype)
    # Lambert on the flat floor, and a darker rim so the disc edge reads against the sky
    lit = (_AMBIENT + _DIFFUSE * light[2] / light.norm()) * (1 - 0.3 * r2.clamp(0, 1) ** 2)
    corners = torch.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty], 1) * lit[:, None]
    zenith = (dz * 2.5 + 0.1).clamp(0, 1)
    below = 1 - 0.4 * (-dz * 4).clamp(0, 1)  # rays that pass beside the disc see a dimmer horizon
    sky = torch.stack([(1 - zenith) * below, zenith], 1)
    f = floor[:, None].to(dirs.dtype)
    weights = torch.cat([corners * f, sky * (1 - f)], 1)
    return weights, torch.where(floor[:, None], xy, 0.0), torch.where(floor, t, math.inf)


def _scene_params(seeds, cfg: SceneConfig, generator_device):
    """Everything random about the scenes, as float64 CPU tensors per instance (scene, frame)."""
    S, F, K = len(seeds), cfg.frames, cfg.max_primitives
    ns, npr = _width(_SCENE_FIELDS), _width(_PRIM_FIELDS)
    rows = []
    for seed in seeds:
        g = torch.Generator(device=generator_device).manual_seed(int(seed))
        rows.append(torch.rand(ns + K * npr, generator=g, device=generator_device, dtype=torch.float64))
    u = torch.stack(rows).cpu() if rows else torch.zeros(0, ns + K * npr, dtype=torch.float64)
    sc = _split(u[:, :ns], _SCENE_FIELDS)
    pr = _split(u[:, ns:].reshape(S, K, npr), _PRIM_FIELDS)
    tau = 2 * math.pi

    # Floor corners share a hue family but differ, so each azimuth sees its own floor colour.
    fh = sc["floor_hue"]
    floor = _hsv(fh[:, :1] + 0.7 * (fh[:, 1:] - 0.5), 0.25 + 0.45 * sc["floor_sat"], 0.35 + 0.5 * sc["floor_val"])
    sk = sc["sky"]
    horizon = _hsv(sk[:, 0], 0.05 + 0.15 * sk[:, 1], 0.85 + 0.15 * sk[:, 2])
    zenith = _hsv(sk[:, 0], 0.3 + 0.35 * sk[:, 3], 0.7 + 0.25 * sk[:, 4])
    bg_colors = torch.cat([floor, horizon[:, None], zenith[:, None]], 1)  # (S, 6, 3)

    count = 1 + (sc["count"] * K).long().clamp(max=K - 1)
    active = torch.arange(K) < count  # (S, K)
    kind = pr["kind"][..., 0]
    is_box = kind >= 2 / 3
    sz = pr["size"]
    round_ = torch.where(kind[..., None] < 1 / 3, 0.3 + 0.2 * sz[..., :1], 0.22 + 0.33 * sz)  # sphere, ellipsoid
    size = torch.where(is_box[..., None], 0.22 + 0.23 * sz, round_)
    c = pr["color"]
    color1 = _hsv(c[..., 0], 0.55 + 0.4 * c[..., 1], 0.75 + 0.25 * c[..., 2])
    # second colour near the complement and darker, so the texture is visible on any base
    color2 = _hsv(c[..., 0] + 0.35 + 0.3 * c[..., 3], 0.4 + 0.5 * c[..., 4], 0.3 + 0.4 * c[..., 5])

    t = (torch.arange(F, dtype=torch.float64) / F)[None, :, None, None]  # (1, F, 1, 1)
    # t stops short of 1 so no frequency makes the last frame repeat the first
    b = pr["base"]
    rad, ang = 0.55 * b[..., 0].sqrt(), tau * b[..., 1]
    base = torch.stack([rad * ang.cos(), rad * ang.sin(), -0.2 + 0.4 * b[..., 2]], -1)
    amp = pr["amp"] * torch.tensor([0.18, 0.18, 0.12]).double() + torch.tensor([0.1, 0.1, 0.04]).double()
    wave = torch.sin(tau * ((0.4 + 0.6 * pr["mfreq"])[:, None] * t + pr["mphase"][:, None]))
    center = base[:, None] + amp[:, None] * wave  # (S, F, K, 3), within ~1.2 of the origin

    ax = pr["axis"]
    az, zc = tau * ax[..., 0], 2 * ax[..., 1] - 1
    axis = torch.stack([(1 - zc**2).sqrt() * az.cos(), (1 - zc**2).sqrt() * az.sin(), zc], -1)
    sp = pr["spin"][..., 0] - 0.5
    spin = torch.sign(sp) * (0.4 + 1.6 * sp.abs()) * math.pi  # at least 0.4 pi over the clip
    angle = tau * pr["angle0"][..., 0][:, None] + spin[:, None] * t[..., 0]
    rot = _rotation(axis[:, None].expand(-1, F, -1, -1), angle)  # (S, F, K, 3, 3) local -> world

    pulse = 1 + (0.08 + 0.17 * pr["pulse"])[:, None] * torch.sin(
        tau * ((0.5 + pr["pfreq"])[:, None] * t + pr["pphase"][:, None])
    )
    scale = size[:, None] * pulse  # (S, F, K, 3)

    light = torch.tensor(_LIGHT, dtype=torch.float64)
    light = light / light.norm()
    # blob shadow: primitive centre projected along the light onto the floor
    shadow_xy = center[..., :2] - light[:2] * ((center[..., 2:] - _FLOOR_Z) / light[2])
    shadow_r = scale.mean(-1) * 1.2

    def per_frame(x):
        return x[:, None].expand(S, F, *x.shape[1:])

    p = {
        "to_local": rot.transpose(-1, -2) / scale[..., None],  # world offset -> unit primitive frame
        "center": center,
        "inv_scale": 1 / scale,
        "light": (rot.transpose(-1, -2) @ light),  # light direction in the rotated frame
        "is_box": per_frame(is_box),
        "active": per_frame(active),
        "checker": per_frame(pr["checker"][..., 0] < 0.5),
        "freq": per_frame(0.9 + 1.1 * pr["freq"][..., 0]),
        "offset": per_frame(pr["offset"]),
        "color1": per_frame(color1),
        "color2": per_frame(color2),
        "shadow_xy": shadow_xy,
        "shadow_r2": shadow_r**2,
        "bg_colors": per_frame(bg_colors),
    }
    return {k: v.reshape(S * F, *v.shape[2:]) for k, v in p.items()}


def _render(p, eye, dirs, bg_weights, floor_xy, floor_t):
    """Render n instances for V views: images (n, V, 3, P) in [0, 1] and foreground (n, V, P)."""
    n, K = p["center"].shape[:2]
    V, _, P = dirs.shape
    m = p["to_local"]  # (n, K, 3, 3)

    o = ((eye[None, None] - p["center"][:, :, None])[..., None, :] * m[:, :, None]).sum(-1)  # (n, K, V, 3)
    o = o[..., None]  # (n, K, V, 3, 1)
    # ray directions in every primitive's frame, (n, K, V, 3, P); elementwise rather than matmul
    # so TF32 settings cannot perturb the geometry
    d = m[:, :, None, :, 0, None] * dirs[:, None, 0]
    d = d.addcmul_(m[:, :, None, :, 1, None], dirs[:, None, 1]).addcmul_(m[:, :, None, :, 2, None], dirs[:, None, 2])

    # unit sphere (sphere, ellipsoid): |o + t d|^2 = 1, nearest root
    a = (d * d).sum(-2)
    b = (d * o).sum(-2)
    c = (o * o).sum(-2) - 1
    disc = b * b - a * c
    t_sphere = (-b - disc.clamp(min=0).sqrt()) / a
    hit_sphere = (disc > 0) & (t_sphere > 0)

    # unit box [-1, 1]^3: slab test; the entering axis gives the face normal
    inv = d.reciprocal()
    t1, t2 = (-1 - o) * inv, (1 - o) * inv
    t_near, axis = torch.minimum(t1, t2).max(-2)
    t_far = torch.maximum(t1, t2).amin(-2)
    hit_box = (t_near <= t_far) & (t_near > 0)

    is_box = p["is_box"][:, :, None, None]
    hit = torch.where(is_box, hit_box, hit_sphere) & p["active"][:, :, None, None]
    t = torch.where(hit, torch.where(is_box, t_near, t_sphere), math.inf)  # (n, K, V, P)

    # Shading of every primitive, then the nearest one per pixel wins.
    local = o + torch.where(hit, t, 0)[..., None, :] * d  # hit point in the unit frame
    face = torch.arange(3, device=d.device)[:, None] == axis[..., None, :]
    normal = torch.where(is_box[..., None], torch.where(face, -d.sign(), 0), local)
    normal = normal * p["inv_scale"][:, :, None, :, None]  # inverse-transpose of the scaling
    lambert = (normal * p["light"][:, :, None, :, None]).sum(-2) * (normal * normal).sum(-2).clamp(min=1e-24).rsqrt()
    shade = _AMBIENT + _DIFFUSE * lambert.clamp(min=0)

    cells = torch.floor(local * p["freq"][:, :, None, None, None] + p["offset"][:, :, None, :, None])
    parity = torch.where(p["checker"][:, :, None, None], cells.sum(-2), cells[..., 0, :]).remainder(2)
    c1 = p["color1"][:, :, None, :, None]
    albedo = c1 + (p["color2"][:, :, None, :, None] - c1) * parity[..., None, :]
    color = albedo * shade[..., None, :]  # (n, K, V, 3, P)

    t_min, k = t.min(1)  # (n, V, P)
    fg = t_min < floor_t
    color = color.gather(1, k[:, None, :, None, :].expand(n, 1, V, 3, P))[:, 0]

    bgc = p["bg_colors"][:, None, :, :, None]  # (n, 1, 6, 3, 1)
    bg = (bgc * bg_weights[None, :, :, None, :]).sum(2)  # (n, V, 3, P)
    dist = floor_xy[None, None] - p["shadow_xy"][:, :, None, :, None]  # (n, K, V, 2, P)
    blob = torch.exp(-(dist * dist).sum(-2) / p["shadow_r2"][:, :, None, None])
    blob = blob * p["active"][:, :, None, None]
    shadow = (1 - _SHADOW * blob).prod(1)  # (n, V, P); floor_xy is 0 off the floor, handled below
    shadow = torch.where(torch.isfinite(floor_t), shadow, 1.0)
    bg = bg * shadow[:, :, None]

    image = torch.where(fg[:, :, None], color, bg).clamp(0, 1)
    return image, fg


def render_batch(
    seeds: Sequence[int] | torch.Tensor, cfg: SceneConfig, device=None, generator_device=None
) -> dict:
    """Render scenes for all frames and views.

    Returns {"images": (S, F, V, 3, H, W) float32 in [-1, 1], frame-major like SV4D's (b, t, v),
    "cameras": (V, 2) float32 [azimuth, elevation] radians, "masks": (S, F, V, 1, H, W) float32,
    1 where a primitive is the nearest hit}.
    device defaults to the seeds tensor's device, else CPU. generator_device is where the seeded
    generators draw; keep the default CPU for scenes that do not depend on the device.
    """
    if isinstance(seeds, torch.Tensor):
        device = seeds.device if device is None else device
        seeds = seeds.flatten().tolist()
    else:
        seeds = [int(s) for s in seeds]
    device = torch.device("cpu" if device is None else device)
    S, F, V, H = len(seeds), cfg.frames, cfg.views, cfg.size

    eye, dirs = _camera_rays(cfg)
    bg_weights, floor_xy, floor_t = _background_weights(eye, dirs)
    params = _scene_params(seeds, cfg, generator_device or "cpu")

    def dev(x):
        return x.to(device=device, dtype=torch.float32 if x.is_floating_point() else x.dtype)

    eye, dirs, bg_weights, floor_xy, floor_t = map(dev, (eye, dirs, bg_weights, floor_xy, floor_t))
    params = {k: dev(v) for k, v in params.items()}

    images = torch.empty(S * F, V, 3, H * H, device=device)
    masks = torch.empty(S * F, V, H * H, device=device)
    budget = _CHUNK_RAYS_CPU if device.type == "cpu" else _CHUNK_RAYS_GPU
    step = max(1, budget // (V * H * H))
    for i in range(0, S * F, step):
        chunk = {k: v[i : i + step] for k, v in params.items()}
        image, fg = _render(chunk, eye, dirs, bg_weights, floor_xy, floor_t)
        images[i : i + step] = image
        masks[i : i + step] = fg
    return {
        "images": (images * 2 - 1).reshape(S, F, V, 3, H, H),
        "cameras": camera_angles(cfg, device),
        "masks": masks.reshape(S, F, V, 1, H, H),
    }


def make_scene(seed: int, cfg: SceneConfig, device=None) -> dict:
    """One scene: the reference view's video (F, 3, H, W) and ground truth for all views (F, V, 3, H, W)."""
    out = render_batch([seed], cfg, device)
    gt = out["images"][0]
    return {"video": gt[:, 0], "ground_truth": gt, "cameras": out["cameras"], "masks": out["masks"][0]}
