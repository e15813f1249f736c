"""Turbo4D Report: the plots of one accelerated run as an IMAGE (and a preview on the node).

The plots are drawn by turbo_core/run_report.py: the model calls x blocks map, the change signals
against their thresholds, and quality against speed when the full-compute result of the same seed
is wired in.
"""
from __future__ import annotations

import math

import torch

from comfy_api.latest import io, ui

from turbo_core.accel.stats import RunStats
from turbo_core.metrics import mean_quality
from turbo_core.run_report import headline, report_image, run_payload

from .events import UI_KEY
from .types import Turbo4DStats

NODE = "Turbo4D Report"


def _as_stats(value, name: str) -> RunStats:
    if not isinstance(value, RunStats):
        raise ValueError(f"{NODE}: '{name}' is not the run_stats of a Turbo4D sampling run (got "
                         f"{type(value).__name__}). Connect the run_stats output of 'MultiView Sampler'.")
    return value


def image_quality(reference: torch.Tensor, images: torch.Tensor) -> dict:
    """Mean per-image PSNR (dB; inf when identical) and SSIM of ComfyUI IMAGEs (B, H, W, C) in [0, 1]."""
    if reference.shape != images.shape:
        raise ValueError(f"{NODE}: 'reference' has shape {tuple(reference.shape)} but 'images' has "
                         f"{tuple(images.shape)}. Wire the full-compute and the accelerated images of the "
                         f"same grid (same views, frames and size).")
    return mean_quality(reference[..., :3].movedim(-1, -3), images[..., :3].movedim(-1, -3), data_range=1.0)


class Turbo4DReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Turbo4DReport",
            display_name="Turbo4D Report",
            category="Turbo4D/report",
            description="Plots of what one accelerated run did: which blocks ran, were cached, pruned or "
                        "bypassed at every model call, the change signals against their thresholds, and "
                        "(with the full-compute result of the same seed wired in) quality against speed.",
            is_output_node=True,
            inputs=[
                Turbo4DStats.Input("run_stats", tooltip="run_stats of the accelerated MultiView Sampler."),
                io.Image.Input("images", optional=True,
                               tooltip="The accelerated result (MultiView Sampler images), for PSNR/SSIM."),
                io.Image.Input("reference", optional=True,
                               tooltip="The full-compute result of the same seed and settings (a second "
                                       "MultiView Sampler on the model without accelerator nodes)."),
                Turbo4DStats.Input("reference_stats", optional=True,
                                   tooltip="run_stats of that full-compute run: adds the measured wall-clock "
                                           "speedup and the time saved."),
            ],
            outputs=[
                io.Image.Output("report", display_name="report", tooltip="The plots, one image (save or preview it)."),
                io.String.Output("summary", display_name="summary", tooltip="The headline figures as one line."),
            ],
        )

    @classmethod
    def execute(cls, run_stats, images=None, reference=None, reference_stats=None) -> io.NodeOutput:
        stats = _as_stats(run_stats, "run_stats")
        payload = run_payload(stats)
        quality = None
        if (images is None) != (reference is None):
            missing = "reference" if reference is None else "images"
            raise ValueError(f"{NODE}: PSNR/SSIM need both 'images' and 'reference'; '{missing}' is not "
                             f"connected. Connect it, or disconnect the other one.")
        if images is not None or reference_stats is not None:
            quality = {}
            if images is not None:
                quality.update(image_quality(reference, images))
            sp = payload["summary"].get("compute_speedup")
            quality["speedup"] = sp
            quality["speedup_kind"] = "compute"
            if reference_stats is not None:
                ref = _as_stats(reference_stats, "reference_stats")
                if ref.seconds > 0 and stats.seconds > 0:
                    quality["wall_speedup"] = ref.seconds / stats.seconds
                    quality["reference_seconds"] = ref.seconds
                    quality["speedup"] = quality["wall_speedup"]
                    quality["speedup_kind"] = "wall-clock"
            if "psnr" not in quality:
                quality.pop("speedup")  # no quality measured: no quality-vs-speed point
        img = report_image(payload, quality)
        image = torch.from_numpy(img).float().div(255.0).unsqueeze(0)
        line = "Turbo4D report: " + headline(payload["summary"])
        if quality and quality.get("psnr") is not None:
            q = quality["psnr"]
            line += ", PSNR vs reference " + ("exact" if math.isinf(q) else f"{q:.2f} dB")
            if quality.get("ssim") is not None:
                line += f", SSIM {quality['ssim']:.4f}"
        if quality and quality.get("wall_speedup") is not None:
            line += f", wall-clock {quality['wall_speedup']:.2f}x"
        shown = dict(payload, quality={k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                       for k, v in (quality or {}).items()})
        return io.NodeOutput(image, line, ui={"images": ui.PreviewImage(image, cls=cls).values,
                                              UI_KEY: [shown], "text": [line]})


NODES = [Turbo4DReport]
