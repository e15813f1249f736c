"""How SV4D and SV4D 2.0 cover a long V x F grid with passes of the size they were trained on,
as Stability's reference scripts do it (scripts/sampling/simple_video_sample_4d.py and
simple_video_sample_4d2.py of Stability-AI/generative-models), written as plain data so that the
ComfyUI node only executes it and tests can check it without a model.

The output is an image matrix of F frames x (1 + V) views. View 0 is the input video itself; the
V novel views are sampled. A `Pass` samples some frames x the V views at once; its conditioning is
the input video at its frames (CLIP tokens and VAE latents, per frame) and the latents of the V
novel views at one already known `reference` frame (`cond_view`, read by the motion blocks).

SV4D (5 frames x 8 views a pass, 21 frames):
1. frame 0's views come from SV3D (outside this plan);
2. one anchor pass samples frames 4, 8, 12, 16, 20, referencing frame 0;
3. dense passes sample the windows 0-4, 4-8, ..., 16-20, in that order. Each step of a dense pass
   alternates the frame order: at even steps (0, 2, ...) the model sees the window reversed
   (20, 19, ... within the window) and references the window's last frame (an anchor); at odd
   steps it sees the window in order and references the first frame. The latent of every frame
   persists across steps by frame identity; only the order the network sees (and so the frame
   embedding each frame gets, the reference views and the guidance scale by position) changes.
   Every dense window rewrites all of its frames, anchors and its first frame included.

SV4D 2.0 (12 frames x 4 views) and its 8-view model (5 x 8): chunks sampled one after another,
each referencing the first frame of the chunk, which an earlier chunk produced; the first chunk
has no reference (its `cond_view` is zero). Chunks start at 0 and then at
min(previous start + T - 1, F - T): for 21 frames that is 0, 9 (12 x 4) and 0, 4, 8, 12, 16
(5 x 8), the reference scripts' chunks. Where the scripts' own rule would reference a frame not
yet generated or leave frames out (other frame counts), this rule keeps one frame of overlap.
A video shorter than one chunk is sampled as one shorter chunk.

What alternating means for cross-step caches (Turbo4D's accelerators): between two steps of a
dense pass the sequence at position i holds another frame, conditioned on other reference views,
so comparing or reusing activations by position across consecutive steps mixes frames. The glue
keeps the accelerator state per frame order (the order joins the stream key): each cache entry
is compared with and reused at the step two calls earlier, whose sequences hold the same frames
in the same order with the same conditioning, i.e. the entries are keyed by frame identity.

The guiders (sgm.modules.diffusionmodules.guiders) scale CFG per image position in the pass:
- linear (SV4D 2.0): linspace(min, max, T*V) over positions (frame-major);
- spatiotemporal (SV4D, SV4D 2.0 8-view): min + (max - min) * (0.5 * t / (T-1) + 0.5 * tri(v / (V-1))),
  tri(u) = 2 |u - round(u)|, for the t-th frame and v-th view of the pass.
Sigmas: EDM discretisation, sigma_min 0.002, sigma_max 700, rho 7, then 0 (the scripts' values;
the yaml's 500 is overridden), Euler steps without churn; ComfyUI's "karras" scheduler and "euler"
sampler compute the same (tests/test_host_sv4d.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 700.0, 7.0


@dataclass(frozen=True)
class Variant:
    """One released model and the reference script's settings for it."""

    name: str
    title: str
    frames_per_pass: int       # T
    views: int                 # V novel views (plus the input view 0)
    guider: str                # "linear" | "spatiotemporal"
    cfg: float                 # max_scale
    min_cfg: float             # min_scale
    steps: int
    elevation: float           # degrees: SV4D absolute (SV3D's), SV4D 2.0 relative to the input view
    azimuths: tuple            # degrees of views 1..V relative to the input view
    anchors: bool              # SV4D's anchor + alternating dense passes
    frame_ratio: float         # input preparation: object box side / frame side (turbo_core/sv4d_input.py)


# SV4D 2.0's script also sets "min_cfg": 2.0, which its linear guider never receives (only max_scale
# is passed; LinearPredictionGuider's min_scale stays 1.0): 1.0 is what the reference runs.
VARIANTS = {
    "sv4d": Variant("sv4d", "SV4D", 5, 8, "spatiotemporal", 2.0, 1.0, 20, 10.0,
                    # SV3D's 21-view orbit, subsampled at views 2, 5, 7, 9, 12, 14, 16, 19
                    tuple(360.0 * k / 21 for k in (2, 5, 7, 9, 12, 14, 16, 19)), True, 0.917),
    "sv4d2": Variant("sv4d2", "SV4D 2.0", 12, 4, "linear", 2.0, 1.0, 50, 0.0,
                     (60.0, 120.0, 180.0, 240.0), False, 0.9),
    "sv4d2_8views": Variant("sv4d2_8views", "SV4D 2.0 (8 views)", 5, 8, "spatiotemporal", 2.5, 1.5, 50, 0.0,
                            (30.0, 75.0, 120.0, 165.0, 210.0, 255.0, 300.0, 330.0), False, 0.9),
}

# SV3D_u's 21 output views in the order it writes them; SV4D reads views 2, 5, ... after moving
# the last one (the input view, azimuth 0) to the front.
SV3D_VIEWS = 21
SV3D_SUBSAMPLE = (0, 2, 5, 7, 9, 12, 14, 16, 19)


def variant_for(version: str, use_3d_attention: bool) -> Variant:
    """The variant of a loaded network: SV4D, SV4D 2.0, or SV4D 2.0's 8-view model (same keys as
    SV4D 2.0, camera attention over the views)."""
    if version == "sv4d":
        return VARIANTS["sv4d"]
    if version == "sv4d2":
        return VARIANTS["sv4d2"] if use_3d_attention else VARIANTS["sv4d2_8views"]
    raise ValueError(f"unknown SV4D version {version!r}; expected 'sv4d' or 'sv4d2'")


def reversed_at(alternate: bool, step: int) -> bool:
    """Whether the network sees a pass's frames reversed at `step`: an alternating pass (SV4D's dense
    windows) reverses them at even steps, starting with step 0, as the reference script does."""
    return bool(alternate) and step % 2 == 0


@dataclass(frozen=True)
class Pass:
    kind: str                         # "anchor" | "dense" | "chunk"
    frames: tuple                     # output frames sampled together, forward order
    reference: Optional[int]          # frame whose novel views condition the pass; None = zeros
    reverse_reference: Optional[int] = None  # alternating passes: the reference in reversed order
    alternate: bool = False           # the frame order alternates every step

    def reversed_at(self, step: int) -> bool:
        return reversed_at(self.alternate, step)

    def order_at(self, step: int) -> tuple:
        return tuple(reversed(self.frames)) if self.reversed_at(step) else self.frames

    def reference_at(self, step: int) -> Optional[int]:
        return self.reverse_reference if self.reversed_at(step) else self.reference


def sv4d_frame_counts(frames_per_pass: int = 5) -> tuple:
    """Frame counts SV4D's anchor + dense scheme covers: 1 + k*(T-1) with k = 1..T."""
    return tuple(1 + k * (frames_per_pass - 1) for k in range(1, frames_per_pass + 1))


def sv4d_plan(frames: int = 21, frames_per_pass: int = 5) -> list[Pass]:
    """SV4D: anchor frames T-1, 2(T-1), ... in one pass (referencing frame 0, SV3D's views), then
    the dense windows [t0, t0 + T - 1] for t0 = 0, T-1, ..., alternating the order every step."""
    t = frames_per_pass
    allowed = sv4d_frame_counts(t)
    if t < 2 or frames not in allowed:
        raise ValueError(f"SV4D covers {', '.join(map(str, allowed))} frames (1 + {t - 1}k: anchor frames every "
                         f"{t - 1} frames, at most {t} of them, then dense windows of {t}); got frames={frames}. "
                         f"Set frames to one of these.")
    anchors = tuple(range(t - 1, frames, t - 1))
    plan = [Pass("anchor", anchors, reference=0)]
    for t0 in range(0, frames - 1, t - 1):
        window = tuple(range(t0, t0 + t))
        plan.append(Pass("dense", window, reference=window[0], reverse_reference=window[-1], alternate=True))
    return plan


def chunk_plan(frames: int, frames_per_pass: int) -> list[Pass]:
    """SV4D 2.0: chunks of T frames, each referencing its first frame (generated by an earlier
    chunk), the first with no reference; starts 0, then min(start + T - 1, F - T)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    t = min(frames_per_pass, frames)
    plan, t0 = [Pass("chunk", tuple(range(t)), reference=None)], 0
    while t0 + t < frames:
        t0 = min(t0 + t - 1, frames - t)
        plan.append(Pass("chunk", tuple(range(t0, t0 + t)), reference=t0))
    return plan


def plan_for(variant: Variant, frames: int) -> list[Pass]:
    return sv4d_plan(frames, variant.frames_per_pass) if variant.anchors else chunk_plan(frames, variant.frames_per_pass)


def check_plan(plan: list[Pass], frames: int, first_frame_known: bool) -> None:
    """Every frame is produced and every reference is known before the pass that reads it."""
    known = {0} if first_frame_known else set()
    for p in plan:
        for r in (p.reference, p.reverse_reference):
            if r is not None and r not in known:
                raise ValueError(f"pass {p} references frame {r} before it is generated")
        known.update(p.frames)
    missing = set(range(frames)) - known
    if missing:
        raise ValueError(f"the plan leaves frames {sorted(missing)} out")


# --- cameras -------------------------------------------------------------------------------------
def camera_radians(variant: Variant, elevation: float, azimuths: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(polar, azimuth) radians of the V novel views as the scripts feed them: polar =
    deg2rad(90 - elevation) mod 2 pi, azimuth relative to the input view, mod 2 pi. For SV4D
    elevation is SV3D's (absolute); for SV4D 2.0 it is relative to the input view's."""
    az = torch.tensor(azimuths if azimuths is not None else variant.azimuths, dtype=torch.float64)
    if az.numel() != variant.views:
        raise ValueError(f"{variant.title} samples {variant.views} views; got {az.numel()} azimuths")
    polar = torch.full((variant.views,), math.radians(90.0 - elevation), dtype=torch.float64) % (2 * math.pi)
    return polar.float(), (torch.deg2rad(az) % (2 * math.pi)).float()


def sv3d_reference_views(n_images: int) -> list[int]:
    """Which images of SV3D_u's output are SV4D's views 0..8 at frame 0: SV3D_u writes the input
    view last, the script rolls it to the front and keeps views 0, 2, 5, 7, 9, 12, 14, 16, 19.
    9 images are taken as views 0..8 as they are, 8 as views 1..8."""
    if n_images == SV3D_VIEWS:
        return [(v - 1) % SV3D_VIEWS for v in SV3D_SUBSAMPLE]
    if n_images == len(SV3D_SUBSAMPLE):
        return list(range(n_images))
    if n_images == len(SV3D_SUBSAMPLE) - 1:
        return [-1] + list(range(n_images))  # -1: view 0 is the input frame anyway
    raise ValueError(f"first_frame_views has {n_images} images; give SV3D_u's 21 views (as SV3D writes them), "
                     f"or the 9 views 0..8, or the 8 novel views 1..8 of the first frame")


# --- guidance and sigmas -------------------------------------------------------------------------
def triangle_wave(u: torch.Tensor) -> torch.Tensor:
    return 2 * (u - torch.floor(u + 0.5)).abs()


def guidance_scales(guider: str, frames: int, views: int, cfg: float, min_cfg: float) -> torch.Tensor:
    """(frames * views,) CFG scale per image position of a pass, frame-major (t, v)."""
    n = frames * views
    if guider == "linear":
        return torch.linspace(min_cfg, cfg, n)
    if guider == "spatiotemporal":
        s = torch.zeros(frames, views)
        s += torch.linspace(0, 1, frames)[:, None] * 0.5
        s += triangle_wave(torch.linspace(0, 1, views))[None, :] * 0.5
        return s.flatten() * (cfg - min_cfg) + min_cfg
    raise ValueError(f"unknown guider {guider!r}; expected 'linear' or 'spatiotemporal'")


def frame_permutation(frames: int, views: int, reverse: bool) -> torch.Tensor:
    """Image indices (frame-major) that put a pass's images in the order the network sees them."""
    idx = torch.arange(frames * views).view(frames, views)
    return (idx.flip(0) if reverse else idx).flatten()


def batch_frame_permutation(frames: int, views: int, batch: int, reverse: bool) -> torch.Tensor:
    """frame_permutation for `batch` passes stacked (the CFG halves of one call)."""
    per = frames * views
    return (frame_permutation(frames, views, reverse)[None] + per * torch.arange(batch)[:, None]).flatten()


def reference_latents(cond_view: torch.Tensor, batch: int, frames: int, views: int, channels: int,
                      reverse: bool) -> torch.Tensor:
    """(batch * views, channels, h, w): the views' reference latents a pass conditions on, in the
    frame order the network sees. `cond_view` (N, channels * k, h, w) repeats a batch item's
    references on each of its images; k = 2 for alternating passes (forward | reversed reference)."""
    k = cond_view.shape[1] // channels
    cv = cond_view.view(batch, frames, views, k, channels, *cond_view.shape[-2:])[:, 0]
    return cv[:, :, 1 if (reverse and k > 1) else 0].reshape(batch * views, channels, *cond_view.shape[-2:])


class PassGuidance:
    """The reference guider of one pass: classifier-free guidance with a scale per image position
    (`guidance_scales`). In a step whose frames the network sees reversed, image (t, v) of the
    sampler's frame order sits at position (T-1-t, v)."""

    def __init__(self, scales: torch.Tensor, views: int, p: "Pass"):
        self.p = p
        self.scales = scales
        self.reversed_scales = scales[frame_permutation(len(p.frames), views, True)]

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, sigma: float, sample_sigmas) -> torch.Tensor:
        s = self.reversed_scales if self.p.reversed_at(step_index(sigma, sample_sigmas)) else self.scales
        s = s.to(cond.device, cond.dtype).repeat(cond.shape[0] // s.numel()).view(-1, *([1] * (cond.dim() - 1)))
        return uncond + (cond - uncond) * s


def edm_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """The reference's EDMDiscretization(steps) with the final 0 appended (float32)."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def step_index(sigma: float, sample_sigmas) -> int:
    """Which step of `sample_sigmas` a model call at `sigma` belongs to (the last schedule entry
    not below it; calls between entries, as second-order samplers make, belong to the earlier)."""
    if sample_sigmas is None:
        return 0
    s = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().cpu()
    sig = float(sigma) * (1 - 1e-5)
    return max(int((s > sig).sum().item()) - 1, 0)
