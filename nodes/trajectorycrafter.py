"""TrajectoryCrafter in ComfyUI: camera redirection of a video (a new camera path over the same
scene), accelerated by the Turbo4D nodes.

Files (README, "TrajectoryCrafter"): the transformer in models/diffusion_models/ (diffusers'
layout, one file or shards with their index, `transformer.` prefix or none), the CogVideoX VAE in
models/vae/ (with the config.json diffusers saves beside it), the T5 v1.1 XXL text encoder in
models/text_encoders/ loaded with ComfyUI's own CLIPLoader (type sd3: T5 alone, no attention mask).

The graph: Load Video (source) and a depth video or depth node -> TrajectoryCrafter Render (the
point-cloud render and its hole mask from a camera path) -> TrajectoryCrafter Conditioning (with
TrajectoryCrafter Text Encode's positive and negative) -> TrajectoryCrafter Sampler (the
reference's DDIM; or ComfyUI's KSampler) -> TrajectoryCrafter Decode. The maths is in turbo_core
(models/trajectorycrafter*.py, render.py); these nodes only adapt ComfyUI's types to it.
"""
from __future__ import annotations

import logging
import math
import os

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd1_clip
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from turbo_core.models import cogvideox_vae
from turbo_core.models.diffusers_files import read_config, read_shapes, weight_files
from turbo_core.models.io import CheckpointError
from turbo_core.models.trajectorycrafter import is_trajectorycrafter_file, load_trajectorycrafter
from turbo_core.models.trajectorycrafter_sampling import (DEFAULT_CFG, DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_SEED,
                                                          DEFAULT_STEPS, DEFAULT_WIDTH, NOISE_AUG_STRENGTH,
                                                          REFERENCE_FRAMES, TEXT_TOKENS, check_frames, check_size,
                                                          conditioning_latents, decode_video, images_to_video,
                                                          latent_frames, noise_like, sample_ddim, t5_tokens_to_length,
                                                          trailing_sigmas, trailing_step_sigmas)
from turbo_core.render import CAMERA_PRESETS, REFERENCE_FOCAL, disparity_to_depth, render_video

from . import events
from . import files
from . import model as m
from . import model_trajectorycrafter as g
from .types import Turbo4DStats

log = logging.getLogger("turbo4d")

CATEGORY = "Turbo4D/trajectorycrafter"
CogVideoXVAEType = io.Custom("COGVIDEOX_VAE")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXTENSIONS = (".safetensors", ".sft")
SAMPLER_REFERENCE = "trajectorycrafter_ddim"
SCHEDULER_REFERENCE = "trailing"
CUSTOM = "custom"

_file_cache: dict = {}


def _recognised(path: str, test) -> bool:
    """Cached by size and mtime: ComfyUI lists the node inputs often."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (path, st.st_size, st.st_mtime, test.__name__)
    if key not in _file_cache:
        try:
            _file_cache[key] = bool(test(path))
        except Exception:  # an unreadable file is not ours to judge here; loading it says why
            _file_cache[key] = False
    return _file_cache[key]


def _listed(folder: str, test) -> list[str]:
    """Names in one of ComfyUI's model folders whose files `test` recognises; of a sharded model
    only its first shard (loading it loads all of them)."""
    try:
        names = folder_paths.get_filename_list(folder)
    except OSError:
        return []
    out = []
    for name in names:
        if not name.lower().endswith(EXTENSIONS):
            continue
        path = folder_paths.get_full_path(folder, name)
        if path is None or not _recognised(path, test):
            continue
        try:
            shards = weight_files(path)
        except CheckpointError:
            continue
        if os.path.abspath(shards[0]) == os.path.abspath(path):
            out.append(name)
    return out


def _is_cogvideox_vae(path: str) -> bool:
    keys = set(read_shapes(weight_files(path)))
    return any(p + cogvideox_vae.MARKER in keys and p + "decoder.conv_in.conv.weight" in keys
               for p in ("", cogvideox_vae.PREFIX))


def transformer_files() -> list[str]:
    return _listed("diffusion_models", is_trajectorycrafter_file)


def vae_files() -> list[str]:
    return _listed("vae", _is_cogvideox_vae)


def _full_path(folder: str, name: str, node: str, what: str) -> str:
    """The file's path in one of ComfyUI's model folders (nodes/files.py refuses a name or a link
    leading out of it)."""
    path = files.model_file(node, what, folder, name) if name else None
    if path is None:
        raise ValueError(f"{node}: {what}={name!r} is not in ComfyUI's models/{folder}/ folder. Put the file there "
                         f"(README, 'TrajectoryCrafter' says which) and refresh the page.")
    return path


def _fingerprint(folder: str, name: str, *rest) -> str:
    try:
        path = files.model_file("TrajectoryCrafter", "name", folder, name) if name else None
        stamp = [(f, os.path.getmtime(f)) for f in weight_files(path)] if path else "missing"
    except (ValueError, OSError):  # CheckpointError, FileRefused: execute says why
        stamp = "missing"
    return f"{name}:{stamp}:{rest}"


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


# --- loaders -------------------------------------------------------------------------------------
class TrajectoryCrafterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterLoader",
            display_name="TrajectoryCrafter Loader",
            category="Turbo4D/loaders",
            description="Loads TrajectoryCrafter's transformer (CogVideoX-Fun 5B InP with the Ref-DiT perceiver) from "
                        "ComfyUI's diffusion_models folder as a MODEL for TrajectoryCrafter Sampler, ComfyUI's KSampler "
                        "and the Turbo4D accelerators. safetensors only.",
            inputs=[
                io.Combo.Input("model_name", options=transformer_files(),
                               tooltip="A transformer in diffusers' layout in models/diffusion_models/: one .safetensors "
                                       "file, or shards with their diffusion_pytorch_model.safetensors.index.json "
                                       "(listed as their first shard; all shards load). Keep the config.json diffusers "
                                       "saves beside the weights."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto",
                               tooltip="Precision of the weights. auto: bf16 on a GPU that runs it (the reference's), "
                                       "else fp32."),
            ],
            outputs=[io.Model.Output("model", display_name="model", tooltip="The TrajectoryCrafter transformer.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, weight_dtype):
        return _fingerprint("diffusion_models", model_name, weight_dtype)

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str) -> io.NodeOutput:
        node = "TrajectoryCrafter Loader"
        if weight_dtype not in DTYPES:
            raise ValueError(f"{node}: weight_dtype={weight_dtype!r}; pick one of {list(DTYPES)}.")
        path = _full_path("diffusion_models", model_name, node, "model_name")
        try:
            shards = weight_files(path)
            dtype = DTYPES[weight_dtype]
            if dtype is None:  # decided before loading, so each tensor is cast as it is read (no second copy)
                params = sum(math.prod(s) for s in read_shapes(shards).values())
                dtype = comfy.model_management.unet_dtype(comfy.model_management.get_torch_device(), params,
                                                          g.TrajectoryCrafterModelConfig.supported_inference_dtypes)
            net = load_trajectorycrafter(path, dtype)
            config = read_config(shards) or {}
        except CheckpointError as e:
            raise ValueError(f"{node}, model_name={model_name!r}: {e}") from e
        options = {"add_noise_in_inpaint_model": bool(config.get("add_noise_in_inpaint_model", False))}
        patcher = g.make_model_patcher(net, dtype, options)
        params = sum(p.numel() for p in net.parameters())
        dtype = patcher.model.get_dtype()
        c = net.cfg
        line = (f"TrajectoryCrafter: {params / 1e9:.2f} B parameters, {c.num_layers} blocks x {c.inner_dim}, "
                f"{c.num_perceivers} perceivers, {str(dtype).replace('torch.', '')} "
                f"({_gb(params * torch.empty((), dtype=dtype).element_size())}), render noise "
                f"{'on' if options['add_noise_in_inpaint_model'] else 'off'} (config.json)")
        log.info("%s: %s", node, line)
        return io.NodeOutput(patcher, ui={"text": [line]})


class TrajectoryCrafterVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterVAELoader",
            display_name="TrajectoryCrafter VAE Loader",
            category="Turbo4D/loaders",
            description="Loads the CogVideoX VAE (3D causal, 4x in time, 8x in space, 16 channels) from ComfyUI's vae "
                        "folder, for TrajectoryCrafter Conditioning and Decode. Needs diffusers (pip install "
                        "'diffusers>=0.32'). safetensors only.",
            inputs=[
                io.Combo.Input("vae_name", options=vae_files(),
                               tooltip="CogVideoX-Fun-V1.1-5b-InP's vae/diffusion_pytorch_model.safetensors in "
                                       "models/vae/ (a subfolder with its config.json beside it is best)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: bf16 on a GPU that runs it (the reference's), else fp32."),
            ],
            outputs=[CogVideoXVAEType.Output("vae", display_name="vae", tooltip="The CogVideoX VAE.")],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name, dtype):
        return _fingerprint("vae", vae_name, dtype)

    @classmethod
    def execute(cls, vae_name: str, dtype: str) -> io.NodeOutput:
        node = "TrajectoryCrafter VAE Loader"
        if dtype not in DTYPES:
            raise ValueError(f"{node}: dtype={dtype!r}; pick one of {list(DTYPES)}.")
        path = _full_path("vae", vae_name, node, "vae_name")
        want = DTYPES[dtype]
        if want is None:
            device = comfy.model_management.vae_device()
            want = torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32
        try:
            vae = cogvideox_vae.load(path, want)
        except CheckpointError as e:
            raise ValueError(f"{node}, vae_name={vae_name!r}: {e}") from e
        except ImportError as e:
            raise ValueError(f"{node}: {e}") from e
        return io.NodeOutput(g.CogVideoXVAE(vae, vae_name))


# --- text ------------------------------------------------------------------------------------------
def _t5_encoders(clip) -> list:
    return [mod for mod in clip.cond_stage_model.modules()
            if isinstance(mod, comfy.sd1_clip.SDClipModel) and mod.special_tokens.get("pad") == 0
            and mod.special_tokens.get("end") == 1]


class TrajectoryCrafterTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterTextEncode",
            display_name="TrajectoryCrafter Text Encode",
            category=CATEGORY,
            description=f"A prompt through the T5 v1.1 XXL encoder as TrajectoryCrafter's pipeline encodes it: "
                        f"{TEXT_TOKENS} tokens (text, end token, padding), no attention mask.",
            inputs=[
                io.Clip.Input("clip", tooltip="t5xxl (fp16 or fp8) from ComfyUI's Load CLIP with type sd3 (T5 alone, "
                                              "no attention mask, as the reference)."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt. The reference captions the video's middle frame (BLIP-2) and "
                                        "appends '. The video is of high quality, ...'; the negative is its fixed "
                                        "list of defects. ComfyUI's (word:1.2) weighting applies; write \\( \\) for "
                                        "literal parentheses."),
            ],
            outputs=[io.Conditioning.Output("conditioning", display_name="conditioning",
                                            tooltip=f"The T5 states (1, {TEXT_TOKENS}, 4096).")],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        node = "TrajectoryCrafter Text Encode"
        if clip is None:
            raise ValueError(f"{node}: 'clip' is not connected. Load t5xxl with ComfyUI's Load CLIP (type sd3).")
        encoders = _t5_encoders(clip)
        if not encoders:
            raise ValueError(f"{node}: this CLIP has no T5 XXL encoder. Load t5xxl_fp16.safetensors (or fp8) with "
                             f"ComfyUI's Load CLIP, type sd3.")
        if any(e.enable_attention_masks for e in encoders):
            raise ValueError(f"{node}: this CLIP masks the T5 padding (Load CLIP type mochi or ltxv); TrajectoryCrafter's "
                             f"T5 attends over all {TEXT_TOKENS} tokens. Load t5xxl with type sd3 (or pixart).")
        tokens = clip.tokenize(text)
        if "t5xxl" not in tokens:
            raise ValueError(f"{node}: this CLIP's tokenizer gives no T5 tokens; load t5xxl with type sd3.")
        batches = tokens["t5xxl"]
        flat = [t for b in batches for t in b]
        ids = [int(t[0]) if isinstance(t, (tuple, list)) else int(t) for t in flat]
        n_text = next((i for i, v in enumerate(ids) if v == 1), len(ids))
        tokens = dict(tokens)
        tokens["t5xxl"] = [t5_tokens_to_length(flat, TEXT_TOKENS)]
        cond = clip.encode_from_tokens_scheduled(tokens)
        line = f"{min(n_text, TEXT_TOKENS - 1)} text tokens + end token, padded to {TEXT_TOKENS}"
        if n_text > TEXT_TOKENS - 1:
            line += f" (truncated from {n_text}, as the reference truncates)"
            log.warning("%s: prompt of %d tokens truncated to %d", node, n_text, TEXT_TOKENS - 1)
        return io.NodeOutput(cond, ui={"text": [line]})


# --- render ----------------------------------------------------------------------------------------
class TrajectoryCrafterRender(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterRender",
            display_name="TrajectoryCrafter Render",
            category=CATEGORY,
            description="The point-cloud render TrajectoryCrafter conditions on: each frame lifted with its depth map "
                        "and forward-warped (soft z-buffer splatting) into a new camera path; holes where no point "
                        "lands are what the model fills. As the reference's 'target' camera, 'gradual' mode.",
            inputs=[
                io.Image.Input("video", tooltip="The source video's frames (any size; the reference renders at 1024 x 576)."),
                io.Image.Input("depth", tooltip="A depth map per frame from any depth node or a depth video "
                                                "(DepthCrafter, Depth Anything, ...), resized to the video."),
                io.Int.Input("frames", default=DEFAULT_FRAMES, min=0, max=4096,
                             tooltip="How many frames to render from the start; 0 = all."),
                io.Combo.Input("camera", options=list(CAMERA_PRESETS) + [CUSTOM], default="orbit_left",
                               tooltip="The camera path, reached at the last frame from the source camera: orbit (about "
                                       "the point at the first frame's central depth), dolly (forward/back), pan. "
                                       "custom: theta, phi, r, x, y below."),
                io.Float.Input("theta", default=0.0, min=-90.0, max=90.0, step=0.5,
                               tooltip="custom only: degrees up (the reference keeps |theta| < 60)."),
                io.Float.Input("phi", default=-30.0, min=-180.0, max=180.0, step=0.5,
                               tooltip="custom only: degrees to the right (|phi| < 60 in the reference)."),
                io.Float.Input("r", default=0.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="custom only: forward by r x the orbit radius (r < 0.6 in the reference)."),
                io.Float.Input("x", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="custom only: pan to the right, scene units (|x| < 4 in the reference)."),
                io.Float.Input("y", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="custom only: pan upward, scene units (|y| < 4 in the reference)."),
                io.Float.Input("radius_scale", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="The orbit radius is the first frame's central depth times this (at most 5)."),
                io.Float.Input("focal", default=REFERENCE_FOCAL, min=0.05, max=5.0, step=0.01,
                               tooltip="Focal length / image width (the reference: 500 px at 1024 wide)."),
                io.Boolean.Input("depth_is_disparity", default=True,
                                 tooltip="On: bright = near (what depth estimators output; the reference's "
                                         "DepthCrafter). Off: bright = far."),
                io.Boolean.Input("clean_holes", default=True,
                                 tooltip="Grow the holes by 5 x 5 pixels, removing stray points along depth edges "
                                         "(the reference's --mask, on in its example)."),
            ],
            outputs=[
                io.Image.Output("render", display_name="render", tooltip="The render from the new camera path; holes black."),
                io.Mask.Output("mask", display_name="mask", tooltip="1 where the render has a hole (the model fills it)."),
                io.String.Output("stats", display_name="stats", tooltip="What was rendered: frames, radius, hole share."),
            ],
        )

    @classmethod
    def execute(cls, video, depth, frames, camera, theta, phi, r, x, y, radius_scale, focal, depth_is_disparity,
                clean_holes) -> io.NodeOutput:
        node = "TrajectoryCrafter Render"
        if video is None or video.dim() != 4 or video.shape[0] < 1:
            raise ValueError(f"{node}: 'video' must be an IMAGE batch of the source frames.")
        n = frames or int(video.shape[0])
        if video.shape[0] < n:
            raise ValueError(f"{node}: the video has {video.shape[0]} frames, fewer than frames={n}. Lower frames "
                             f"(0 takes all) or load more.")
        if depth is None or depth.dim() != 4 or depth.shape[0] < n:
            got = "nothing" if depth is None else f"{depth.shape[0]} images"
            raise ValueError(f"{node}: 'depth' must hold a depth map for each of the {n} frames, got {got}.")
        if camera == CUSTOM:
            pose = (theta, phi, r, x, y)
        elif camera in CAMERA_PRESETS:
            pose = CAMERA_PRESETS[camera]
        else:
            raise ValueError(f"{node}: camera={camera!r}; pick one of {list(CAMERA_PRESETS) + [CUSTOM]}.")
        h, w = int(video.shape[1]), int(video.shape[2])
        src = video[:n, ..., :3].float().permute(0, 3, 1, 2) * 2 - 1
        d = depth[:n, ..., :3].float().mean(-1)
        if tuple(d.shape[-2:]) != (h, w):
            d = torch.nn.functional.interpolate(d[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        if not depth_is_disparity:
            d = 1.0 - d
        try:
            metric = disparity_to_depth(d)
        except ValueError as e:
            raise ValueError(f"{node}: 'depth': {e}") from e
        pbar = comfy.utils.ProgressBar(n)

        def progress(i):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(i, n)

        out = render_video(src, metric, *pose, radius_scale=radius_scale, focal=focal, clean=clean_holes,
                           progress=progress)
        render = ((out["render"] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
        mask = (1.0 - out["valid"][:, 0]).contiguous()
        line = (f"TrajectoryCrafter render: {n} frames at {w} x {h}, camera {camera} (theta {pose[0]:g}, phi {pose[1]:g}, "
                f"r {pose[2]:g}, x {pose[3]:g}, y {pose[4]:g}), orbit radius {out['radius']:.3g}, holes "
                f"{float(mask.mean()) * 100:.1f}% (last frame {float(mask[-1].mean()) * 100:.1f}%)")
        log.info(line)
        return io.NodeOutput(render, mask, line, ui={"text": [line]})


# --- conditioning ----------------------------------------------------------------------------------
def _frames_of(images, n: int, node: str, what: str):
    if images is None or images.dim() < 3 or images.shape[0] < n:
        got = "nothing" if images is None else f"{images.shape[0]} frames"
        raise ValueError(f"{node}: '{what}' must have at least frames={n} frames, got {got}. Lower frames or "
                         f"connect a longer batch.")
    return images[:n]


def _with(conditioning, values: dict):
    out = []
    for c in conditioning:
        d = dict(c[1])
        d.update(values)
        out.append([c[0], d])
    return out


class TrajectoryCrafterConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterConditioning",
            display_name="TrajectoryCrafter Conditioning",
            category=CATEGORY,
            description="What TrajectoryCrafter is conditioned on, built as its pipeline builds it: the render with its "
                        "holes blanked and its mask through the VAE (channels 16..32 of the model's input), the first "
                        f"{REFERENCE_FRAMES} source frames through the VAE for the perceiver, on the prompts' T5 states; "
                        "and the empty latent to sample.",
            inputs=[
                io.Model.Input("model", tooltip="The TrajectoryCrafter MODEL (its config.json decides the render noise)."),
                CogVideoXVAEType.Input("vae", tooltip="The CogVideoX VAE (TrajectoryCrafter VAE Loader)."),
                io.Conditioning.Input("positive", tooltip="The prompt from TrajectoryCrafter Text Encode."),
                io.Conditioning.Input("negative", tooltip="The negative prompt from TrajectoryCrafter Text Encode."),
                io.Image.Input("video", tooltip="The source video's frames."),
                io.Image.Input("render", tooltip="The point-cloud render from the new camera path (TrajectoryCrafter "
                                                 "Render, or any node: holes are taken from the mask)."),
                io.Mask.Input("mask", tooltip="1 where the render has a hole (TrajectoryCrafter Render's mask)."),
                io.Int.Input("frames", default=DEFAULT_FRAMES, min=1, max=4096, step=8,
                             tooltip="Frames from the start of each input: 8k + 1 (49 in the reference), so that "
                                     "the VAE decodes as many frames as it encodes."),
                io.Int.Input("width", default=DEFAULT_WIDTH, min=16, max=4096, step=16,
                             tooltip="Sampling width, a multiple of 16 (the reference: 672)."),
                io.Int.Input("height", default=DEFAULT_HEIGHT, min=16, max=4096, step=16,
                             tooltip="Sampling height, a multiple of 16 (the reference: 384)."),
                io.Combo.Input("reference", options=["first", "last"], default="first",
                               tooltip=f"Which {REFERENCE_FRAMES} source frames the perceiver sees: the first (the "
                                       f"reference's gradual and direct modes) or the last (its bullet-time mode)."),
                io.Int.Input("seed", default=DEFAULT_SEED, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the reference frames' VAE posterior sample and the render noise."),
                io.Float.Input("noise_aug_strength", default=NOISE_AUG_STRENGTH, min=0.0, max=1.0, step=0.0001,
                               tooltip="Std of the noise added to the render before encoding, applied when the "
                                       "checkpoint's config.json sets add_noise_in_inpaint_model (as the pipeline)."),
            ],
            outputs=[
                # ids differ from the inputs' (V3 wants them unique across both); names are the display names
                io.Conditioning.Output("positive_out", display_name="positive",
                                       tooltip="The prompt with the render, mask and reference latents."),
                io.Conditioning.Output("negative_out", display_name="negative",
                                       tooltip="The negative prompt with the same latents."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The empty latent (1, 16, frames', height/8, width/8) to sample."),
                io.String.Output("stats", display_name="stats", tooltip="Sizes, hole share and render noise."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, video, render, mask, frames, width, height, reference, seed,
                noise_aug_strength) -> io.NodeOutput:
        node = "TrajectoryCrafter Conditioning"
        net = g.get_net(model, node)
        if not isinstance(vae, g.CogVideoXVAE):
            raise ValueError(f"{node}: 'vae' must come from TrajectoryCrafter VAE Loader.")
        try:
            check_frames(frames)
            check_size(height, width)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from e
        for name, cond in (("positive", positive), ("negative", negative)):
            if not cond or cond[0][0].dim() != 3:
                raise ValueError(f"{node}: '{name}' is not a text conditioning; connect TrajectoryCrafter Text Encode.")
            dim = cond[0][0].shape[-1]
            if dim != net.cfg.text_embed_dim:
                raise ValueError(f"{node}: '{name}' has {dim}-wide text states; this model takes "
                                 f"{net.cfg.text_embed_dim} (T5 v1.1 XXL: load t5xxl with Load CLIP, type sd3).")
            if cond[0][0].shape[1] != TEXT_TOKENS:
                log.warning("%s: '%s' has %d tokens; the reference encodes %d (TrajectoryCrafter Text Encode pads "
                            "to it)", node, name, cond[0][0].shape[1], TEXT_TOKENS)
        src = _frames_of(video, frames, node, "video")
        ren = _frames_of(render, frames, node, "render")
        if mask is None:
            raise ValueError(f"{node}: 'mask' is not connected (1 where the render has holes).")
        msk = mask if mask.dim() == 3 else mask.reshape(-1, *mask.shape[-2:])
        msk = _frames_of(msk, frames, node, "mask")
        if reference == "first":
            ref_frames = _frames_of(video, REFERENCE_FRAMES, node, "video")[:REFERENCE_FRAMES]
        elif frames >= REFERENCE_FRAMES:
            ref_frames = src[-REFERENCE_FRAMES:]  # the last of the sampled frames, as the bullet-time mode
        else:
            raise ValueError(f"{node}: reference='last' takes the last {REFERENCE_FRAMES} of the {frames} frames; "
                             f"raise frames to {REFERENCE_FRAMES + 7} or more, or use 'first'.")
        add_noise = bool(model.model.pipeline_options.get("add_noise_in_inpaint_model", False))
        strength = float(noise_aug_strength) if add_noise else 0.0

        pbar = comfy.utils.ProgressBar(3)
        module = vae.load(height, width)
        p = next(module.parameters())

        def tensor(images, mode="bilinear"):
            return images_to_video(images, height, width, mode).to(p.device)

        def step():
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update(1)

        rendered = tensor(ren[..., :3]) * 2 - 1
        hole = tensor(msk[..., None].float(), "nearest")
        refs = tensor(ref_frames[..., :3]) * 2 - 1
        gen = torch.Generator(device=p.device).manual_seed(int(seed))
        out = conditioning_latents(module, rendered, hole, refs, strength, gen, progress=step)
        holder = g.ReferenceLatents(out["reference"])
        values = {g.COND_INPAINT: out["inpaint"], g.COND_REFERENCE: holder}
        t = latent_frames(frames)
        latent = {"samples": torch.zeros(1, g.LATENT_CHANNELS, t, height // 8, width // 8)}
        line = (f"TrajectoryCrafter conditioning: {frames} frames at {width} x {height} -> latents {t} x {height // 8} "
                f"x {width // 8}, holes {float((hole >= 0.5).float().mean()) * 100:.1f}%, reference = {reference} "
                f"{REFERENCE_FRAMES} frames ({out['reference'].shape[1]} latent frames), render noise "
                f"{strength:g}" + ("" if add_noise else " (config.json: add_noise_in_inpaint_model off)"))
        log.info(line)
        return io.NodeOutput(_with(positive, values), _with(negative, values), latent, line, ui={"text": [line]})


# --- sampling ---------------------------------------------------------------------------------------
def sigmas_for(model, scheduler: str, steps: int) -> torch.Tensor:
    ms = model.get_model_object("model_sampling")
    if scheduler == SCHEDULER_REFERENCE:
        return trailing_sigmas(ms.sigmas, steps)
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()


def sampler_for(model, sampler_name: str, scheduler: str, steps: int):
    if sampler_name == SAMPLER_REFERENCE:
        ms = model.get_model_object("model_sampling")
        opts = {"zero_snr_sigma": float(ms.sigma_max)}
        if scheduler == SCHEDULER_REFERENCE:
            opts["step_sigmas"] = trailing_step_sigmas(ms.sigmas, steps)
        return comfy.samplers.KSAMPLER(sample_ddim, extra_options=opts)
    return comfy.samplers.sampler_object(sampler_name)


class TrajectoryCrafterSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterSampler",
            display_name="TrajectoryCrafter Sampler",
            category=CATEGORY,
            description="Samples the redirected video's latents with the reference's DDIM (v-prediction, zero terminal "
                        "SNR, trailing timesteps, eta 0) through ComfyUI's sampling, so the Turbo4D accelerators "
                        "(Chain Bypass whole steps included), previews, progress and interrupt work as with KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="TrajectoryCrafter from its loader, optionally through the Turbo4D "
                                                "accelerator nodes and Turbo4D Multi-GPU (the CFG halves of every "
                                                "call on two GPUs)."),
                io.Conditioning.Input("positive", tooltip="TrajectoryCrafter Conditioning's positive."),
                io.Conditioning.Input("negative", tooltip="TrajectoryCrafter Conditioning's negative."),
                io.Latent.Input("latent", tooltip="TrajectoryCrafter Conditioning's latent."),
                io.Int.Input("seed", default=DEFAULT_SEED, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed (drawn in the reference's frame-major order on the CPU)."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=1000, tooltip="Denoising steps (reference: 50)."),
                io.Float.Input("cfg", default=DEFAULT_CFG, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance against the negative prompt (reference: 6; 1 turns "
                                       "it off and halves the work)."),
                io.Combo.Input("sampler_name", options=[SAMPLER_REFERENCE] + list(comfy.samplers.KSampler.SAMPLERS),
                               default=SAMPLER_REFERENCE,
                               tooltip=f"{SAMPLER_REFERENCE}: the reference's DDIM, its first step at zero SNR exactly. "
                                       f"ComfyUI's samplers work too (euler = DDIM but for that first step, which they "
                                       f"take at ComfyUI's finite stand-in)."),
                io.Combo.Input("scheduler", options=[SCHEDULER_REFERENCE] + list(comfy.samplers.KSampler.SCHEDULERS),
                               default=SCHEDULER_REFERENCE,
                               tooltip=f"{SCHEDULER_REFERENCE}: the reference's timesteps (999, 979, ... for 50 steps; "
                                       f"ComfyUI's simple equals it when steps divides 1000)."),
            ],
            outputs=[
                io.Latent.Output("latent_out", display_name="latent",
                                 tooltip="The sampled latents, for TrajectoryCrafter Decode."),
                io.String.Output("stats", display_name="stats", tooltip="One line on what the run computed and skipped."),
                Turbo4DStats.Output("run_stats", display_name="run_stats",
                                    tooltip="The run's counters, for the Turbo4D Report node."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler) -> io.NodeOutput:
        node = "TrajectoryCrafter Sampler"
        g.get_net(model, node)
        x = latent.get("samples") if isinstance(latent, dict) else None
        if x is None or x.dim() != 5 or x.shape[1] != g.LATENT_CHANNELS:
            shape = None if x is None else tuple(x.shape)
            raise ValueError(f"{node}: 'latent' {shape} is not a CogVideoX video latent (1, 16, frames, h, w): connect "
                             f"TrajectoryCrafter Conditioning's latent.")
        if sampler_name != SAMPLER_REFERENCE and sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"{node}: sampler_name={sampler_name!r} is unknown.")
        if scheduler != SCHEDULER_REFERENCE and scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"{node}: scheduler={scheduler!r} is unknown.")
        mp = model.clone()
        sink = m.StatsSink()
        to = mp.model_options.setdefault("transformer_options", {})
        to[m.REPORTS_KEY] = sink
        to[events.LISTENERS_KEY] = [events.RunEvents(total_steps=steps)]
        sigmas = sigmas_for(mp, scheduler, steps)
        noise = noise_like(x, seed)
        callback = latent_preview.prepare_callback(mp, steps)
        samples = comfy.sample.sample_custom(mp, noise, cfg, sampler_for(mp, sampler_name, scheduler, steps), sigmas, positive, negative,
                                             x, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                             seed=seed)
        samples = samples.float().cpu()
        stats = sink.items[-1] if sink.items else None
        label = f"Turbo4D TrajectoryCrafter ({sampler_name}, {scheduler}, {steps} steps, cfg {cfg:g})"
        line = stats.format_line(label) if stats is not None else f"{label}: no stats (the sampling run did not report)"
        out = dict(latent)
        out["samples"] = samples
        return io.NodeOutput(out, line, stats, ui={"text": [line], **events.ui_output(stats)})


class TrajectoryCrafterDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DTrajectoryCrafterDecode",
            display_name="TrajectoryCrafter Decode",
            category=CATEGORY,
            description="The sampled latents through the CogVideoX VAE: the redirected video's frames.",
            inputs=[
                CogVideoXVAEType.Input("vae", tooltip="The CogVideoX VAE (TrajectoryCrafter VAE Loader)."),
                io.Latent.Input("latent", tooltip="TrajectoryCrafter Sampler's latent (or KSampler's)."),
            ],
            outputs=[io.Image.Output("images", display_name="images",
                                     tooltip="The frames: 4 (T - 1) + 1 for T latent frames (49 for 13).")],
        )

    @classmethod
    def execute(cls, vae, latent) -> io.NodeOutput:
        node = "TrajectoryCrafter Decode"
        if not isinstance(vae, g.CogVideoXVAE):
            raise ValueError(f"{node}: 'vae' must come from TrajectoryCrafter VAE Loader.")
        x = latent.get("samples") if isinstance(latent, dict) else None
        if x is None or x.dim() != 5 or x.shape[1] != g.LATENT_CHANNELS:
            raise ValueError(f"{node}: 'latent' is not a CogVideoX video latent (1, 16, frames, h, w).")
        pbar = comfy.utils.ProgressBar(1)
        module = vae.load(x.shape[-2] * 8, x.shape[-1] * 8)
        p = next(module.parameters())
        images = decode_video(module, x.to(device=p.device))
        pbar.update(1)
        return io.NodeOutput(images)


NODES = [TrajectoryCrafterLoader, TrajectoryCrafterVAELoader, TrajectoryCrafterTextEncode, TrajectoryCrafterRender,
         TrajectoryCrafterConditioning, TrajectoryCrafterSampler, TrajectoryCrafterDecode]
