"""Sampling a V x F grid: the one-node MultiView Sampler, and the conditioning + decode pair that
lets ComfyUI's own KSampler / SamplerCustom drive the model instead."""
from __future__ import annotations

import logging

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from turbo_core.data.scenes import relative_cameras
from turbo_core.data.synth4d import SceneConfig, camera_angles
from turbo_core.diffusion import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_SCHEDULER, DEFAULT_STEPS
from turbo_core.models.scm_net import SCMNet, SCMNetConfig
from turbo_core.words import count
from turbo_core.multiview import check_grid, frame_major_to_view_major, grid_condition, square_resize, to_unit

from . import events, loaders
from . import model as m
from .layout import layout_output, remember
from .types import Turbo4DInput, Turbo4DStats

log = logging.getLogger("turbo4d")

VIEW_MAJOR = "view-major: image v*F + f is view v at frame f"
GRID_KEY = "turbo4d_grid"  # (views, frames) carried in the LATENT dict; KSampler keeps extra keys


def grid_limits() -> tuple:
    """(embedded model's config or None, largest max_views, largest max_frames, largest image_size)
    over the Turbo4D networks this server has (the embedded one and models/turbo4d/), from
    their configs."""
    configs = loaders.scm_configs()
    emb = configs.get(loaders.EMBEDDED)
    cfgs = list(configs.values()) or [SCMNetConfig()]
    return (emb, max(c.max_views for c in cfgs), max(c.max_frames for c in cfgs),
            max(c.image_size for c in cfgs))


def _embedded(emb, field: str, unit: str) -> str:
    return f"{getattr(emb, field)} {unit} for the embedded model" if emb is not None else "see the model's config"


def _limit_text(emb, field: str, unit: str, largest: int) -> str:
    """Which models take how many views / frames, read from their configs."""
    if emb is None:
        return f"the Turbo4D networks here take at most {largest} {unit} ({field} in their configs)"
    own = f"the embedded model takes at most {getattr(emb, field)} {unit} ({field} in its config)"
    if getattr(emb, field) == largest:
        return own + ", and no network in models/turbo4d/ takes more"
    return own + f", the largest network in models/turbo4d/ {largest}"


def validate_grid(node: str, views, frames):
    """True, or why views / frames fit no Turbo4D model on this server: ComfyUI then refuses the
    prompt when it is queued, before any node runs. The connected model's own limits are checked
    again before sampling (for a model whose limits are below the largest). None: the widget is
    linked, checked when the node runs."""
    emb, mv, mf, _ = grid_limits()
    if views is not None:
        if views < 1:
            return f"{node}: views={views} is smaller than min of 1: a grid needs at least 1 view. Set views to 1..{mv}."
        if views > mv:
            return f"{node}: views={views} is too many: {_limit_text(emb, 'max_views', 'views', mv)}. Set views to 1..{mv}."
    if frames is not None:
        if frames < 0:
            return (f"{node}: frames={frames} is smaller than min of 0 (0 = all of the input's frames). "
                    f"Set frames to 0..{mf}.")
        if frames > mf:
            return (f"{node}: frames={frames} is too many: {_limit_text(emb, 'max_frames', 'frames', mf)}. "
                    f"Set frames to 1..{mf} (or 0 for all of the input's frames).")
    return True


def grid_inputs() -> list:
    emb, mv, mf, _ = grid_limits()
    return [
        io.Model.Input("model", tooltip="A Turbo4D model (Turbo4D Model Loader, optionally through accelerator nodes)."),
        Turbo4DInput.Input("input", tooltip="The reference-view video (Load 4D Input or Synthetic 4D Scene)."),
        io.Int.Input("views", default=4, min=1, max=mv,
                     tooltip=f"Number of views V on the camera ring, view 0 = the reference view. At most the "
                             f"model's max_views ({_embedded(emb, 'max_views', 'views')}); more is refused when "
                             f"the prompt is queued."),
        io.Int.Input("frames", default=8, min=0, max=mf,
                     tooltip=f"Number of frames F taken from the start of the input; 0 = all of its frames. At "
                             f"most the model's max_frames ({_embedded(emb, 'max_frames', 'frames')}); more is "
                             f"refused when the prompt is queued."),
        io.Float.Input("elevation", default=20.0, min=-89.0, max=89.0, step=0.5,
                       tooltip="Elevation of the generated cameras, degrees."),
        io.Float.Input("azimuth_span", default=360.0, min=0.0, max=360.0, step=1.0,
                       tooltip="The views spread evenly over this many degrees of azimuth around the object: "
                               "view v sits span * v / V degrees from the reference view (view 0)."),
    ]


def build_conditioning(node: str, model, data: dict, views: int, frames: int, elevation: float,
                       azimuth_span: float):
    """(positive, negative, latent dict, net) for one grid; every check names the input and the fix."""
    net = m.get_scm_net(model, node)
    if not isinstance(net, SCMNet):
        raise ValueError(f"{node}: the 'model' input is an SV4D / SV4D 2.0 model, which this node cannot condition. "
                         f"Sample it with 'MultiView Sampler (SV4D)'.")
    if not isinstance(data, dict) or "video" not in data:
        raise ValueError(f"{node}: 'input' is not a Turbo4D input. Connect Load 4D Input or Synthetic 4D Scene.")
    video = data["video"]
    frames = frames or int(video.shape[0])
    try:
        check_grid(views, frames, net.cfg.max_views, net.cfg.max_frames)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from e
    if video.shape[0] < frames:
        raise ValueError(
            f"{node}: the input has only {count(int(video.shape[0]), 'frame')} ({data.get('source', 'input')}), fewer than "
            f"frames={frames}. Lower frames (0 takes all), or load more frames on Load 4D Input "
            f"(frame_count, frame_stride, start_frame).")
    size = net.cfg.image_size
    notes = []
    if video.shape[-1] != size or video.shape[-2] != size:
        notes.append(resize_note(video, size))
        log.info("%s: %s", node, notes[-1])
        video = square_resize(video, size)
    # The network was trained on azimuths relative to the reference view, so only the span matters.
    cams = relative_cameras(camera_angles(SceneConfig(views=views, frames=frames, elevation_deg=elevation,
                                                      azimuth_span_deg=azimuth_span)))
    c = grid_condition(video, cams, views, frames)

    def cond(reference):
        return [[torch.zeros(1, 1, 1), {m.COND_REFERENCE: reference, m.COND_CAMERA: c["camera"],
                                        m.COND_FRAME_INDEX: c["frame_index"],
                                        m.COND_VIEWS: views, m.COND_FRAMES: frames, m.NOTES_KEY: notes}]]

    # CFG's negative: the same cameras without the reference video.
    positive, negative = cond(c["reference"]), cond(torch.zeros_like(c["reference"]))
    latent = {"samples": torch.zeros(views * frames, 3, size, size), GRID_KEY: (views, frames)}
    return positive, negative, latent, net


def resize_note(video: torch.Tensor, size: int) -> str:
    """The run's note when the input is not at the model's size (the model was trained at it)."""
    h, w = int(video.shape[-2]), int(video.shape[-1])
    how = "downscaled" if max(h, w) > size else "upscaled" if max(h, w) < size else "cropped"
    return f"input {w}x{h} {how} to {size}x{size}, the size the model was trained at"


def latent_to_view_major(samples: torch.Tensor, views: int, frames: int) -> torch.Tensor:
    return to_unit(frame_major_to_view_major(samples, views, frames))


class MultiViewSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DMultiViewSampler",
            display_name="MultiView Sampler",
            category="Turbo4D/sampling",
            description=f"Generates V views x F frames from the reference video. images is {VIEW_MAJOR}.",
            inputs=grid_inputs() + [
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=200, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=DEFAULT_CFG, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance against the same cameras without the "
                                       "reference video; 1.0 turns it off and halves the work."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=DEFAULT_SAMPLER,
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=DEFAULT_SCHEDULER,
                               tooltip="ComfyUI noise schedule; karras suits this EDM model."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip=f"All V x F images, {VIEW_MAJOR}."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The samples in model order (frame-major: image f*V + v)."),
                io.String.Output("stats", display_name="stats",
                                 tooltip="One line on what the run computed and skipped."),
                Turbo4DStats.Output("run_stats", display_name="run_stats",
                                    tooltip="The run's full counters, for the Turbo4D report nodes."),
                layout_output("images"),
            ],
        )

    @classmethod
    def validate_inputs(cls, views=None, frames=None):
        return validate_grid("MultiView Sampler", views, frames)

    @classmethod
    def execute(cls, model, input, views, frames, elevation, azimuth_span, seed, steps, cfg, sampler_name,
                scheduler) -> io.NodeOutput:
        positive, negative, latent, _ = build_conditioning("MultiView Sampler", model, input, views, frames,
                                                           elevation, azimuth_span)
        views, frames = latent[GRID_KEY]
        mp = model.clone()
        sink = m.StatsSink()
        mp.model_options.setdefault("transformer_options", {})[m.REPORTS_KEY] = sink
        mp.model_options["transformer_options"][events.LISTENERS_KEY] = [events.RunEvents(total_steps=steps)]
        x = latent["samples"]
        noise = comfy.sample.prepare_noise(x, seed)
        callback = latent_preview.prepare_callback(mp, steps)
        samples = comfy.sample.sample(mp, noise, steps, cfg, sampler_name, scheduler, positive, negative, x,
                                      denoise=1.0, callback=callback,
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        samples = samples.float().cpu()
        stats = sink.items[-1] if sink.items else None
        line = stats.format_line() if stats is not None else "Turbo4D: no stats (the sampling run did not report)"
        out_latent = {"samples": samples, GRID_KEY: (views, frames)}
        images = latent_to_view_major(samples, views, frames)
        return io.NodeOutput(images, out_latent, line, stats, remember(images, views, frames),
                             ui={"text": [line], **events.ui_output(stats)})


class MultiViewConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DMultiViewConditioning",
            display_name="MultiView Conditioning",
            category="Turbo4D/sampling",
            description="Positive/negative conditioning and an empty latent for one V x F grid, so that "
                        "ComfyUI's KSampler or SamplerCustom can drive a Turbo4D model. Decode the result "
                        "with MultiView Latent to Image.",
            inputs=grid_inputs(),
            outputs=[
                io.Conditioning.Output("positive", display_name="positive",
                                       tooltip="The reference video, cameras and frame positions."),
                io.Conditioning.Output("negative", display_name="negative",
                                       tooltip="The same without the reference video (for CFG)."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="An empty V x F latent (frame-major) to sample into."),
            ],
        )

    @classmethod
    def validate_inputs(cls, views=None, frames=None):
        return validate_grid("MultiView Conditioning", views, frames)

    @classmethod
    def execute(cls, model, input, views, frames, elevation, azimuth_span) -> io.NodeOutput:
        positive, negative, latent, _ = build_conditioning("MultiView Conditioning", model, input, views, frames,
                                                           elevation, azimuth_span)
        return io.NodeOutput(positive, negative, latent)


class MultiViewLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DLatentToImage",
            display_name="MultiView Latent to Image",
            category="Turbo4D/sampling",
            description=f"Turns a Turbo4D LATENT (pixel space, frame-major) into IMAGE, {VIEW_MAJOR}.",
            inputs=[
                io.Latent.Input("latent", tooltip="A LATENT sampled from MultiView Conditioning's latent."),
            ],
            outputs=[io.Image.Output("images", display_name="images", tooltip=f"All V x F images, {VIEW_MAJOR}."),
                     layout_output("images")],
        )

    @classmethod
    def execute(cls, latent) -> io.NodeOutput:
        grid = latent.get(GRID_KEY)
        samples = latent["samples"]
        if grid is None:
            raise ValueError("MultiView Latent to Image: this LATENT has no V x F grid. Sample into the latent "
                             "of MultiView Conditioning (or take MultiView Sampler's latent).")
        if samples.ndim != 4 or samples.shape[1] != 3:
            raise ValueError(f"MultiView Latent to Image: latent of shape {tuple(samples.shape)} is not a Turbo4D "
                             f"pixel latent (N, 3, H, W). Sample into the latent of MultiView Conditioning.")
        images = latent_to_view_major(samples.float().cpu(), *grid)
        return io.NodeOutput(images, remember(images, *grid))


NODES = [MultiViewSampler, MultiViewConditioning, MultiViewLatentToImage]
