"""SV4D and SV4D 2.0 in ComfyUI: finding their files for the Turbo4D Model Loader, and the
"MultiView Sampler (SV4D)" node that runs the reference scripts' sampling schemes
(turbo_core/sampling_plans.py) with ComfyUI's stock CLIP_VISION and VAE.

Files: an SV4D file is recognised by its keys (turbo_core.models.sv4d.detect_sv4d on the
safetensors header, no tensor read), in ComfyUI's `diffusion_models` and `checkpoints` folders as
well as models/turbo4d/; both the full Stability checkpoint and a UNet-only file load (only the
`model.diffusion_model.` tensors are read).

Sampling, per pass of the plan: the input frames of the pass through CLIP vision (one token per
frame) and the VAE (concat latents), the novel views at the pass's reference frame through the VAE
(cond_view), the cameras into the 1280-d vector; ComfyUI's sampler (euler / karras by default:
the reference's Euler EDM sampler and EDM sigmas) with the reference guider's per-image CFG scale;
the samples are decoded with the VAE into the frames x views image matrix, which later passes read
their reference views from (decoded and encoded again, as the reference does).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from turbo_core.accel.stats import RunStats
from turbo_core.accel.storage import cache_budget
from turbo_core.memory import plan
from turbo_core.models.io import CheckpointError
from turbo_core.models.sv4d import detect_sv4d, load_sv4d, parameter_count, read_sv4d_config
from turbo_core.sampling_plans import (Pass, VARIANTS, camera_radians, check_plan, frame_permutation,
                                       guidance_scales, plan_for, step_index, sv3d_reference_views,
                                       sv4d_frame_counts, variant_for)

from . import events
from . import model as m
from . import model_sv4d as g
from .memory import cache_limit_bytes
from .types import Turbo4DStats

log = logging.getLogger("turbo4d")

NAMES = {"sv4d": "SV4D", "sv4d2": "SV4D 2.0"}
FOLDERS = ("diffusion_models", "checkpoints")  # ComfyUI's own folders searched for SV4D files
EXTENSIONS = (".safetensors", ".sft")
NODE = "MultiView Sampler (SV4D)"
VIEW_MAJOR = "view-major: image v*F + f is view v at frame f; view 0 is the input video"


# --- files ---------------------------------------------------------------------------------------
_header_cache: dict = {}


def sv4d_version_of(path: str) -> Optional[str]:
    """"sv4d" / "sv4d2" when a safetensors file's key names are an SV4D UNet's, else None (cached
    by size and mtime: ComfyUI asks for the node list often)."""
    if not path.lower().endswith(EXTENSIONS):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime)
    if key not in _header_cache:
        version = None
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                version = detect_sv4d(f.keys())
        except Exception:  # not a readable safetensors file: not ours to judge here
            version = None
        _header_cache[key] = version
    return _header_cache[key]


def sv4d_files() -> list[str]:
    """Names of the SV4D files in ComfyUI's diffusion_models and checkpoints folders."""
    out = []
    for folder in FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except (KeyError, OSError):
            continue
        for name in names:
            path = folder_paths.get_full_path(folder, name)
            if name not in out and path and sv4d_version_of(path):
                out.append(name)
    return out


def sv4d_path(name: str) -> Optional[str]:
    """Full path of an SV4D file of that name in the diffusion_models or checkpoints folder."""
    for folder in FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            continue
        if path and sv4d_version_of(path):
            return path
    return None


def describe_sv4d(path: str) -> Optional[str]:
    """"SV4D 2.0 UNet (width 320, 2.01 B parameters, ...)" when the file's keys and shapes are an
    SV4D or SV4D 2.0 UNet, else None."""
    try:
        cfg = read_sv4d_config(path)
    except (CheckpointError, OSError, ValueError):
        return None
    mode = ""
    if cfg.version == "sv4d2":
        mode = ", camera attention over pixel groups" if cfg.use_3d_attention else ", camera attention over views (8-view model)"
    return (f"{NAMES[cfg.version]} UNet (width {cfg.model_channels}, "
            f"{parameter_count(cfg) / 1e9:.2f} B parameters{mode})")


def load_sv4d_model(path: str, dtype: Optional[torch.dtype]):
    """The MODEL of an SV4D file. Raises CheckpointError naming the first missing / unexpected
    key when its keys are SV4D-like but not an SV4D UNet's."""
    net = load_sv4d(path, dtype=dtype)
    log.info("Turbo4D: loaded %s: %s", os.path.basename(path), describe_sv4d(path))
    return g.make_sv4d_model_patcher(net, dtype)


# --- sampling ------------------------------------------------------------------------------------
def _square(images: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, size, size, 3): centre crop to a square, resize."""
    x = images[..., :3].movedim(-1, 1).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = comfy.utils.common_upscale(x, size, size, "bilinear", "center")
    return x.movedim(1, -1).clamp(0, 1)


def _encode(vae, images: torch.Tensor, latent_size: int) -> torch.Tensor:
    lat = vae.encode(images).float().cpu()
    if lat.dim() != 4 or lat.shape[1] != g.LATENT_CHANNELS:
        raise ValueError(f"{NODE}: the vae gives latents of shape {tuple(lat.shape)}; SV4D needs an SD 1.x/2.x-style "
                         f"VAE with 4 latent channels (see docs/sv4d.md).")
    if tuple(lat.shape[-2:]) != (latent_size, latent_size):
        raise ValueError(f"{NODE}: the vae turns {images.shape[1]}px images into {lat.shape[-1]}px latents; SV4D "
                         f"needs 8x downsampling ({latent_size}px). Use an SD 1.x/2.x-style VAE (see docs/sv4d.md).")
    return lat


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    img = vae.decode(latents).float().cpu()
    if img.dim() == 5:  # video VAEs return (B, T, H, W, C)
        img = img.reshape(-1, *img.shape[-3:])
    return img[..., :3].clamp(0, 1)


def _cfg_function(scales: torch.Tensor, views: int, p: Pass):
    """ComfyUI's sampler_cfg_function for one pass: the reference guider's scale per image
    position; in reversed steps image (t, v) sits at position (T-1-t, v)."""
    frames = len(p.frames)
    rev = scales[frame_permutation(frames, views, True)]

    def cfg(args):
        cond, uncond = args["cond"], args["uncond"]
        sigma = float(torch.as_tensor(args["sigma"]).flatten()[0])
        to = args.get("model_options", {}).get("transformer_options", {})
        s = rev if p.reversed_at(step_index(sigma, to.get("sample_sigmas"))) else scales
        s = s.to(cond.device, cond.dtype).repeat(cond.shape[0] // s.numel()).view(-1, *([1] * (cond.dim() - 1)))
        return uncond + (cond - uncond) * s

    return cfg


def merge_stats(items: list) -> Optional[RunStats]:
    """One RunStats for the node's passes (each pass is one sampling run)."""
    items = [s for s in items if s is not None]
    if not items:
        return None
    out = RunStats(blocks=items[0].blocks, cost=dict(items[0].cost))
    for s in items:
        for k in ("calls", "chains_ran", "chains_bypassed", "cache_hits", "cache_misses"):
            setattr(out, k, getattr(out, k) + getattr(s, k))
        for k in ("sequences_total", "sequences_computed", "sequences_reused"):
            for a, v in getattr(s, k).items():
                getattr(out, k)[a] += v
        for key, cell in s.per_block.items():
            merged = out.per_block[key]
            for i, v in enumerate(cell):
                merged[i] += v
        for src, per in s.reused_by.items():
            for a, v in per.items():
                out.reused_by[src][a] += v
        out.flops_full += s.flops_full
        out.flops_done += s.flops_done
        out.cache_bytes_peak = max(out.cache_bytes_peak, s.cache_bytes_peak)
        out.timeline.extend(s.timeline)
        out.seconds += s.seconds
        if s.peak_memory_bytes is not None:
            out.peak_memory_bytes = max(out.peak_memory_bytes or 0, s.peak_memory_bytes)
        accs = s.__dict__.get("accelerators")
        if accs:
            out.__dict__.setdefault("accelerators", {}).update(accs)
        par = s.__dict__.get("parallel")
        if par:  # split over processes (Turbo4D Multi-GPU): calls per mode add up over the passes
            acc = out.__dict__.setdefault("parallel", {**par, "calls_by_mode": {}})
            for k, v in par["calls_by_mode"].items():
                acc["calls_by_mode"][k] = acc["calls_by_mode"].get(k, 0) + v
        mem = s.__dict__.get("memory")
        if mem:
            acc = out.__dict__.setdefault("memory", {"retries": 0})
            acc["retries"] += mem.get("retries", 0)
            for k in ("gpu_limit_mb", "gpu_peak_mb", "cpu_peak_mb"):
                if mem.get(k) is not None:
                    acc[k] = max(acc.get(k) or 0, mem[k])
    out.started = min(s.started for s in items)
    return out


def memory_line(mem: Optional[dict]) -> str:
    """Where the accelerators' cache was, and the out-of-memory retries, for the stats line."""
    if not mem:
        return ""
    out = ""
    if mem.get("gpu_limit_mb") is not None:
        out += (f"; cache on GPU {mem['gpu_peak_mb'] / 1024:.1f} of {mem['gpu_limit_mb'] / 1024:.1f} GB allowed, "
                f"in CPU memory {mem['cpu_peak_mb'] / 1024:.1f} GB")
    if mem.get("retries"):
        out += f"; {mem['retries']} out-of-memory retries in smaller pieces"
    return out


def plan_memory(model_patcher, net, images: int, latent: int):
    """(MemoryConfig, CacheBudget or None) of one pass (turbo_core.memory.plan): from the free
    memory of ComfyUI's device, less the weights still to load and the forward's activations, at
    most the Turbo4D Memory node's bound."""
    device = comfy.model_management.get_torch_device()
    if getattr(device, "type", str(device)) != "cuda":
        return None, None
    dtype = net.out[2].weight.dtype
    try:
        to_load = max(int(model_patcher.model_size()) - int(model_patcher.loaded_size()), 0)
    except Exception:  # a patcher without the size API: plan as if loaded
        to_load = 0
    elt = torch.empty((), dtype=model_patcher.model.get_dtype()).element_size()
    return plan(device, net.activation_bytes(images, latent, latent, elt), cache_limit_bytes(model_patcher),
                model_patcher.model.get_dtype(), weights_to_load=to_load)


class SV4DSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DSV4DSampler",
            display_name=NODE,
            category="Turbo4D/sampling",
            description="Novel-view videos from an input video with SV4D or SV4D 2.0, sampled the way Stability's "
                        "reference scripts do (SV4D: anchor frames, then dense windows alternating the frame order "
                        "every step, 9 views; SV4D 2.0: 12-frame chunks of 4 views, or 5 x 8 for the 8-view model). "
                        f"images is {VIEW_MAJOR}.",
            inputs=[
                io.Model.Input("model", tooltip="sv4d.safetensors or sv4d2.safetensors from Turbo4D Model Loader, "
                                                "optionally through the Turbo4D accelerator nodes."),
                io.ClipVision.Input("clip_vision", tooltip="OpenCLIP ViT-H/14 (clip_vision_h.safetensors, the one SVD "
                                                           "and SV3D use): one embedding per input frame."),
                io.Vae.Input("vae", tooltip="An SD 1.x/2.x KL-f8 VAE (e.g. from sv3d_u.safetensors): encodes the input "
                                            "frames and reference views, decodes the result."),
                io.Image.Input("video", tooltip="The input video's frames (object centred, white background), "
                                                "cropped to a square and resized to size."),
                io.Int.Input("frames", default=21, min=0, max=1024,
                             tooltip="Output frames, taken from the start of the video; 0 = all of its frames. "
                                     f"SV4D: one of {', '.join(map(str, sv4d_frame_counts()))}. SV4D 2.0: any."),
                io.Int.Input("size", default=576, min=64, max=2048, step=64,
                             tooltip="Image side in pixels (the models are trained at 576)."),
                io.Float.Input("elevation", default=0.0, min=-89.0, max=89.0, step=0.5,
                               tooltip="Camera elevation of the novel views, degrees. SV4D: SV3D's elevation (the "
                                       "reference script uses 10). SV4D 2.0: relative to the input view (0)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed (pass i uses seed + i)."),
                io.Int.Input("steps", default=50, min=1, max=200,
                             tooltip="Denoising steps per pass (reference: 20 for SV4D, 50 for SV4D 2.0)."),
                io.Float.Input("cfg", default=2.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Largest guidance scale of the reference guider (SV4D, SV4D 2.0: 2.0; "
                                       "8-view: 2.5)."),
                io.Float.Input("min_cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Smallest guidance scale (1.0; 8-view: 1.5). The scale varies over the "
                                       "images of a pass: linearly (SV4D 2.0) or over frames and views (SV4D, 8-view)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="euler = the reference's Euler EDM sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                               tooltip="karras = the reference's EDM sigmas (0.002..700, rho 7)."),
                io.Image.Input("first_frame_views", optional=True,
                               tooltip="SV4D only: the views of the first frame from SV3D_u (its 21 images as "
                                       "VAE Decode gives them, or 9 views 0..8, or the 8 novel views)."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip=f"All (1 + V) x F images, {VIEW_MAJOR}."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="Latents of the V novel views (frame-major: image f*V + v-1)."),
                io.String.Output("stats", display_name="stats",
                                 tooltip="One line on what the runs computed and skipped."),
                Turbo4DStats.Output("run_stats", display_name="run_stats",
                                    tooltip="The passes' counters together, for the Turbo4D report nodes."),
            ],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, video, frames, size, elevation, seed, steps, cfg, min_cfg,
                sampler_name, scheduler, first_frame_views=None) -> io.NodeOutput:
        net = g.get_sv4d_net(model, NODE)
        variant = variant_for(net.cfg.version, net.cfg.use_3d_attention)
        if size % 64:
            raise ValueError(f"{NODE}: size={size} must be a multiple of 64 (the UNet halves the latent three times)")
        if video is None or video.dim() != 4 or video.shape[0] < 1:
            raise ValueError(f"{NODE}: 'video' must be an IMAGE batch of the input frames")
        frames = frames or int(video.shape[0])
        if video.shape[0] < frames:
            raise ValueError(f"{NODE}: the video has {video.shape[0]} frames, fewer than frames={frames}. Lower frames "
                             f"(0 takes all) or load more frames.")
        try:
            plan = plan_for(variant, frames)
            check_plan(plan, frames, first_frame_known=variant.anchors)
        except ValueError as e:
            raise ValueError(f"{NODE}: {variant.title}: {e}") from e
        V, hw = variant.views, size // 8
        inp = _square(video[:frames], size)
        image_matrix = torch.zeros(frames, V + 1, size, size, 3)  # (frame, view 0 = input, novel views)
        image_matrix[:, 0] = inp
        if variant.anchors:
            if first_frame_views is None:
                raise ValueError(f"{NODE}: SV4D needs 'first_frame_views', the views of the first frame from SV3D_u "
                                 f"(ImageOnlyCheckpointLoader sv3d_u.safetensors -> SV3D_Conditioning -> KSampler -> "
                                 f"VAE Decode), as its reference script does. SV4D 2.0 does not.")
            try:
                pick = sv3d_reference_views(int(first_frame_views.shape[0]))
            except ValueError as e:
                raise ValueError(f"{NODE}: {e}") from e
            image_matrix[0, 1:] = _square(first_frame_views[pick[1:]], size)

        emb = clip_vision.encode_image(inp).image_embeds.float().cpu()          # (F, D)
        if emb.shape[-1] != net.cfg.context_dim:
            raise ValueError(f"{NODE}: clip_vision gives {emb.shape[-1]}-d image embeddings; this model needs "
                             f"{net.cfg.context_dim} (OpenCLIP ViT-H/14: clip_vision_h.safetensors).")
        frame_latents = _encode(vae, inp, hw)                                   # (F, 4, h, w)
        polar, azimuth = camera_radians(variant, elevation)
        latents = torch.zeros(frames, V, g.LATENT_CHANNELS, hw, hw)

        reports = []
        for i, p in enumerate(plan):
            samples = cls._sample_pass(model, vae, variant, p, emb, frame_latents, image_matrix, polar, azimuth,
                                       seed + i, steps, cfg, min_cfg, sampler_name, scheduler, hw, reports)
            t = len(p.frames)
            decoded = _decode(vae, samples).view(t, V, size, size, 3)
            for j, f in enumerate(p.frames):
                image_matrix[f, 1:] = decoded[j]
                latents[f] = samples.view(t, V, *samples.shape[1:])[j]
        stats = merge_stats(reports)
        passes = f"{len(plan)} pass" + ("es" if len(plan) != 1 else "")
        line = (stats.format_line(f"Turbo4D {variant.title}, {passes}") if stats is not None
                else "Turbo4D: no stats (the sampling runs did not report)")
        if stats is not None:
            line += memory_line(stats.__dict__.get("memory"))
        images = image_matrix.permute(1, 0, 2, 3, 4).reshape(-1, size, size, 3)
        return io.NodeOutput(images, {"samples": latents.reshape(-1, *latents.shape[2:])}, line, stats,
                             ui={"text": [line], **events.ui_output(stats)})

    @classmethod
    def _sample_pass(cls, model, vae, variant, p: Pass, emb, frame_latents, image_matrix, polar, azimuth, seed,
                     steps, cfg, min_cfg, sampler_name, scheduler, hw, reports) -> torch.Tensor:
        V, T = variant.views, len(p.frames)
        refs = [p.reference] + ([p.reverse_reference] if p.alternate else [])
        views = [(_encode(vae, image_matrix[r, 1:], hw) if r is not None
                  else torch.zeros(V, g.LATENT_CHANNELS, hw, hw)) for r in refs]
        cond_view = torch.cat(views, dim=1).repeat(T, 1, 1, 1)                 # (T*V, 4k, h, w)
        rows = torch.tensor(p.frames).repeat_interleave(V)                     # frame of each image
        cross, concat = emb[rows][:, None], frame_latents[rows]

        def cond(uncond: bool):
            z = torch.zeros_like
            return [[z(cross) if uncond else cross, {
                g.COND_CONCAT: z(concat) if uncond else concat,
                g.COND_VECTOR: g.vector_condition(polar, azimuth, T, uncond),
                g.COND_VIEW: z(cond_view) if uncond else cond_view,
                g.COND_VIEWS: V, g.COND_FRAMES: T, g.COND_ALTERNATE: p.alternate}]]

        mp = model.clone()
        sink = m.StatsSink()
        to = mp.model_options.setdefault("transformer_options", {})
        to[m.REPORTS_KEY] = sink
        memory, budget = plan_memory(mp, g.get_sv4d_net(mp, NODE), 2 * T * V, hw)
        if memory is not None:
            to[g.MEMORY_KEY] = memory
        to[events.LISTENERS_KEY] = [events.RunEvents(total_steps=steps)]
        scales = guidance_scales(variant.guider, T, V, cfg, min_cfg)
        if not torch.allclose(scales, torch.ones_like(scales)):
            mp.set_model_sampler_cfg_function(_cfg_function(scales, V, p), disable_cfg1_optimization=True)
        x = torch.zeros(T * V, g.LATENT_CHANNELS, hw, hw)
        noise = comfy.sample.prepare_noise(x, seed)
        with cache_budget(budget):
            samples = comfy.sample.sample(mp, noise, steps, max(cfg, min_cfg), sampler_name, scheduler, cond(False),
                                          cond(True), x, denoise=1.0,
                                          callback=latent_preview.prepare_callback(mp, steps),
                                          disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        if memory is not None:
            mem = {"retries": memory.retries, **(budget.summary() if budget is not None else {})}
            for st in sink.items:
                st.__dict__["memory"] = mem
            if memory.retries:
                log.warning("Turbo4D %s: %d out-of-memory retries in smaller pieces (%s)", variant.title,
                            memory.retries, memory.messages[-1])
        reports.extend(sink.items)
        log.info("Turbo4D %s: %s pass, frames %s done", variant.title, p.kind, list(p.frames))
        return samples.float().cpu()


NODES = [SV4DSampler]
