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

from turbo_core.accel.stats import MemoryReport, RunStats
from turbo_core.memory import cache_budget, plan
from turbo_core.models.io import CheckpointError
from turbo_core.models.sv4d import (LOADER_VARIANTS, detect_sv4d, load_sv4d, parameter_count, read_sv4d_config,
                                    sv4d_variant_note)
from turbo_core.sv4d_input import describe as describe_prep, prepare_sv4d_input
from turbo_core.sampling_plans import (Pass, PassGuidance, VARIANTS, camera_radians, check_plan, guidance_scales,
                                       plan_for, sv3d_reference_views, sv4d_frame_counts, variant_for)
from turbo_core.words import count

from . import events
from . import files
from . import model as m
from . import model_sv4d as g
from .layout import layout_output, remember
from .memory_limit import cache_limit_bytes
from .types import Turbo4DStats

log = logging.getLogger("turbo4d")

NAMES = {"sv4d": "SV4D", "sv4d2": "SV4D 2.0"}
FOLDERS = ("diffusion_models", "checkpoints")  # ComfyUI's own folders searched for SV4D files
EXTENSIONS = (".safetensors", ".sft")
NODE = "MultiView Sampler (SV4D)"
VIEW_MAJOR = "view-major: image v*F + f is view v at frame f; view 0 is the input video"
ELEVATION_CFG = ("auto", "custom")      # auto: the variant's reference-script values
INPUT_PREP = ("reference", "centre crop")


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


def sv4d_path(name: str, node: str = "Turbo4D Model Loader", input_name: str = "model_name") -> Optional[str]:
    """Full path of an SV4D file of that name in the diffusion_models or checkpoints folder
    (nodes/files.py refuses a name or a link leading out of the folder before it is opened)."""
    for folder in FOLDERS:
        path = files.model_file(node, input_name, folder, name)
        if path and sv4d_version_of(path):
            return path
    return None


def describe_config(cfg) -> str:
    """"SV4D 2.0 UNet (width 320, 2.01 B parameters, ...)" of a loaded or read SV4DConfig."""
    mode = ""
    if cfg.version == "sv4d2":
        mode = ", camera attention over pixel groups" if cfg.use_3d_attention else ", camera attention over views (8-view model)"
    return (f"{NAMES[cfg.version]} UNet (width {cfg.model_channels}, "
            f"{parameter_count(cfg) / 1e9:.2f} B parameters{mode})")


def describe_other(path: str) -> str:
    """What a file in diffusion_models / checkpoints that is not an SV4D file is, for the loader's
    message: read from its name and its safetensors header only (a pickle is never opened)."""
    from turbo_core.models.io import FORMAT, PICKLE_SUFFIXES

    if path.lower().endswith(PICKLE_SUFFIXES):
        return ("a pickled checkpoint, which Turbo4D never opens (unpickling can run code); SV4D files are "
                ".safetensors")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a damaged header
        return f"not a readable .safetensors file ({e}); it may be truncated or in another format"
    if meta.get("format") == FORMAT:
        return "a Turbo4D network, which loads from models/turbo4d/: move it there"
    unet = [k for k in keys if k.startswith("model.diffusion_model.") or k.startswith("input_blocks.")]
    kind = "a UNet without SV4D's motion blocks" if unet else "another model family's weights"
    return (f"a safetensors file of {len(keys)} tensors, {kind} (e.g. {keys[0]!r}); an SV4D / SV4D 2.0 UNet has "
            f"'...motion_blocks.0...' tensors") if keys else "an empty safetensors file"


def describe_sv4d(path: str, variant: str = "auto") -> Optional[str]:
    """describe_config of the file at `path` when its keys and shapes are an SV4D or SV4D 2.0 UNet,
    else None."""
    try:
        return describe_config(read_sv4d_config(path, variant=variant))
    except (CheckpointError, OSError, ValueError):
        return None


def load_sv4d_model(path: str, dtype: Optional[torch.dtype], variant: str = "auto"):
    """The MODEL of an SV4D file. `variant` is the loader's choice (turbo_core.models.sv4d.
    resolve_variant); raises CheckpointError naming the first missing / unexpected key when its
    keys are SV4D-like but not an SV4D UNet's, or saying what contradicts the chosen variant."""
    net = load_sv4d(path, dtype=dtype, variant=variant)
    log.info("Turbo4D: loaded %s: %s; %s", os.path.basename(path), describe_config(net.cfg),
             sv4d_variant_note(path, variant))
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


def _cfg_function(guidance: PassGuidance):
    """ComfyUI's sampler_cfg_function for one pass: its reference guider."""

    def cfg(args):
        to = args.get("model_options", {}).get("transformer_options", {})
        return guidance(args["cond"], args["uncond"], float(torch.as_tensor(args["sigma"]).flatten()[0]),
                        to.get("sample_sigmas"))

    return cfg


def plan_memory(model_patcher, net, images: int, latent: int):
    """(MemoryConfig, CacheBudget or None) of one pass (turbo_core.memory.plan): from the free
    memory of ComfyUI's device, less the weights still to load and the forward's activations, at
    most the Turbo4D Memory node's bound."""
    device = comfy.model_management.get_torch_device()
    if getattr(device, "type", str(device)) != "cuda":
        return None, None
    try:
        to_load = max(int(model_patcher.model_size()) - int(model_patcher.loaded_size()), 0)
    except Exception:  # a patcher without the size API: plan as if loaded
        to_load = 0
    dtype = model_patcher.model.get_dtype()
    return plan(device, net.activation_bytes(images, latent, latent, dtype.itemsize), cache_limit_bytes(model_patcher),
                dtype, weights_to_load=to_load)


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
                io.Image.Input("video", tooltip="The input video's frames (one object, centred, on a white "
                                                "background), prepared as input_prep says."),
                io.Int.Input("frames", default=21, min=0, max=1024,
                             tooltip="Output frames, taken from the start of the video; 0 = all of its frames. "
                                     f"SV4D: one of {', '.join(map(str, sv4d_frame_counts()))}. SV4D 2.0: any."),
                io.Int.Input("size", default=576, min=64, max=2048, step=64,
                             tooltip="Image side in pixels (the models are trained at 576)."),
                io.Float.Input("elevation", default=0.0, min=-89.0, max=89.0, step=0.5,
                               tooltip="Camera elevation of the novel views, degrees; read only when elevation_cfg "
                                       "is custom. SV4D: SV3D's elevation (the reference script uses 10). SV4D 2.0: "
                                       "relative to the input view (the script uses 0)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed (pass i uses seed + i)."),
                io.Int.Input("steps", default=50, min=1, max=200,
                             tooltip="Denoising steps per pass (reference: 20 for SV4D, 50 for SV4D 2.0)."),
                io.Float.Input("cfg", default=2.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Largest guidance scale of the reference guider (SV4D, SV4D 2.0: 2.0; "
                                       "8-view: 2.5); read only when elevation_cfg is custom."),
                io.Float.Input("min_cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Smallest guidance scale (1.0; 8-view: 1.5); read only when elevation_cfg is "
                                       "custom. The scale varies over the images of a pass: linearly (SV4D 2.0) or "
                                       "over frames and views (SV4D, 8-view)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="euler = the reference's Euler EDM sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                               tooltip="karras = the reference's EDM sigmas (0.002..700, rho 7)."),
                io.Combo.Input("elevation_cfg", options=list(ELEVATION_CFG), default="auto", optional=True,
                               tooltip="auto: the loaded model's reference-script elevation, cfg and min_cfg (" +
                                       "; ".join(f"{v.title}: {v.elevation:g} deg, {v.cfg:g} / {v.min_cfg:g}"
                                                 for v in VARIANTS.values()) +
                                       "), so the three widgets above are not read; custom: the widgets' values. "
                                       "The stats line says which values ran."),
                io.Combo.Input("input_prep", options=list(INPUT_PREP), default="reference", optional=True,
                               tooltip="reference: the reference scripts' preparation: one square box around the "
                                       "non-white object of all frames (for an RGBA video, its non-transparent "
                                       "pixels), padded so the box is the model's frame ratio (SV4D 0.917, SV4D 2.0 "
                                       "0.9) of the frame, alpha over white, Lanczos resize to size. Give it the "
                                       "uncropped frames (an RGBA IMAGE, e.g. from Join Image with Alpha, keeps its "
                                       "alpha). centre crop: the centre square, resized bilinearly (alpha dropped)."),
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
                layout_output("images (1 + V views: the input view, then the novel ones)"),
            ],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, video, frames, size, elevation, seed, steps, cfg, min_cfg,
                sampler_name, scheduler, elevation_cfg="auto", input_prep="reference",
                first_frame_views=None) -> io.NodeOutput:
        net = g.get_sv4d_net(model, NODE)
        variant = variant_for(net.cfg.version, net.cfg.use_3d_attention)
        if elevation_cfg not in ELEVATION_CFG:
            raise ValueError(f"{NODE}: elevation_cfg={elevation_cfg!r}; pick one of {list(ELEVATION_CFG)}.")
        if input_prep not in INPUT_PREP:
            raise ValueError(f"{NODE}: input_prep={input_prep!r}; pick one of {list(INPUT_PREP)}.")
        if elevation_cfg == "auto":
            elevation, cfg, min_cfg = variant.elevation, variant.cfg, variant.min_cfg
        if size % 64:
            raise ValueError(f"{NODE}: size={size} must be a multiple of 64 (the UNet halves the latent three times)")
        if video is None or video.dim() != 4 or video.shape[0] < 1:
            raise ValueError(f"{NODE}: 'video' must be an IMAGE batch of the input frames")
        frames = frames or int(video.shape[0])
        if video.shape[0] < frames:
            raise ValueError(f"{NODE}: the video has {count(int(video.shape[0]), 'frame')}, fewer than frames={frames}. Lower frames "
                             f"(0 takes all) or load more frames.")
        try:
            plan = plan_for(variant, frames)
            check_plan(plan, frames, first_frame_known=variant.anchors)
        except ValueError as e:
            raise ValueError(f"{NODE}: {variant.title}: {e}") from e
        V, hw = variant.views, size // 8
        if input_prep == "reference":
            try:
                inp = prepare_sv4d_input(video[:frames], size, variant.frame_ratio)
            except ValueError as e:
                raise ValueError(f"{NODE}: video: {e}") from e
        else:
            inp = _square(video[:frames], size)
        source = "the model's reference" if elevation_cfg == "auto" else "custom"
        prep = describe_prep(variant.frame_ratio) if input_prep == "reference" else "centre crop"
        settings = f"elevation {elevation:g} deg, cfg {min_cfg:g}..{cfg:g} ({source}), input: {prep}"
        log.info("Turbo4D %s: %s", variant.title, settings)
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
        stats = RunStats.merge(reports)
        passes = f"{len(plan)} pass" + ("es" if len(plan) != 1 else "")
        line = (stats.format_line(f"Turbo4D {variant.title}, {passes}") if stats is not None
                else "Turbo4D: no stats (the sampling runs did not report)")
        line += f"; {settings}"
        images = image_matrix.permute(1, 0, 2, 3, 4).reshape(-1, size, size, 3)
        return io.NodeOutput(images, {"samples": latents.reshape(-1, *latents.shape[2:])}, line, stats,
                             remember(images, V + 1, frames), ui={"text": [line], **events.ui_output(stats)})

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
            mp.set_model_sampler_cfg_function(_cfg_function(PassGuidance(scales, V, p)),
                                              disable_cfg1_optimization=True)
        x = torch.zeros(T * V, g.LATENT_CHANNELS, hw, hw)
        noise = comfy.sample.prepare_noise(x, seed)
        with cache_budget(budget):
            samples = comfy.sample.sample(mp, noise, steps, max(cfg, min_cfg), sampler_name, scheduler, cond(False),
                                          cond(True), x, denoise=1.0,
                                          callback=latent_preview.prepare_callback(mp, steps),
                                          disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        if memory is not None:
            placed = budget.summary() if budget is not None else {}
            for st in sink.items:
                st.memory = MemoryReport(memory.retries, placed.get("gpu_limit_mb"), placed.get("gpu_peak_mb"),
                                         placed.get("cpu_peak_mb"))
            if memory.retries:
                log.warning("Turbo4D %s: %d out-of-memory retries in smaller pieces (%s)", variant.title,
                            memory.retries, memory.messages[-1])
        reports.extend(sink.items)
        log.info("Turbo4D %s: %s pass, frames %s done", variant.title, p.kind, list(p.frames))
        return samples.float().cpu()


NODES = [SV4DSampler]
