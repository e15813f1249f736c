"""The three accelerator nodes: MODEL -> MODEL, each a preset plus advanced inputs.

Each node clones the model and stores one `(name, config)` spec in its transformer_options (the
EasyCache way); the algorithm lives in turbo_core.accel and a fresh run is built from the specs at
every sampling run, so the nodes chain in any order, with each other and with other model patches,
and two accelerated models in one graph share nothing. What a run skipped is reported by the
sampler that ran it (its STRING/TURBO4D_STATS outputs, the log and the canvas).
"""
from __future__ import annotations

import dataclasses
import json
import os

import folder_paths
from comfy_api.latest import io

from turbo_core.accel.bypass import ChainBypassConfig, apply_chain_bypass
from turbo_core.accel.cache import RollingCacheConfig, apply_rolling_cache
from turbo_core.accel.calibrate import load_calibration
from turbo_core.accel.presets import PRESET_NAMES, preset_config
from turbo_core.accel.prune import TokenPrunerConfig, apply_token_pruning

from . import files
from . import model as m

CUSTOM = "custom"
CALIBRATION_FOLDER = "turbo4d_calibration"
PRESETS = list(PRESET_NAMES) + [CUSTOM]
STORAGE = ["native", "fp16", "cpu"]
PRESET_TIP = ("off: full compute. quality / balanced / fast: settings measured on the embedded model "
              "(see BENCHMARKS.md). custom: use the advanced inputs below.")
STORAGE_TIP = ("Where cached activations live (applies to every preset): native (same device and dtype as the model), fp16 (half the "
               "memory), cpu (frees GPU memory, costs transfers).")


def register_calibration_folder() -> str:
    """models/turbo4d_calibration/ in ComfyUI's models directory (and the pack's calibration/
    folder): where Chain Bypass finds calibration files, by name."""
    path = os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)
    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = (
            [path, os.path.join(m.PACK_DIR, "calibration")], {".json"})
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        pass  # a read-only models dir only means no calibration files there
    return path


register_calibration_folder()


def calibration_path(node: str, name: str) -> str:
    """The calibration file's path in its folder; a clear error when it is not there (and
    files.FileRefused for a name or a link leading out of it)."""
    path = files.model_file(node, "calibration_file", CALIBRATION_FOLDER, name, files.FIX_CALIBRATION)
    if path is None:
        raise ValueError(
            f"{node}: calibration_file={name!r} is not in ComfyUI's models/{CALIBRATION_FOLDER}/ folder. Write it "
            f"there with `python -m turbo_core.accel.calibrate --out <ComfyUI>/models/{CALIBRATION_FOLDER}/{name}`, "
            f"or copy the JSON there, and give its name.")
    return path


def _percent_inputs(default_start: float, default_end: float) -> list:
    return [
        io.Float.Input("start_percent", default=default_start, min=0.0, max=1.0, step=0.01,
                       tooltip="custom only: the first part of the schedule always runs in full (layout is decided "
                               "there); acceleration starts at this fraction of the steps."),
        io.Float.Input("end_percent", default=default_end, min=0.0, max=1.0, step=0.01,
                       tooltip="custom only: acceleration stops at this fraction of the steps; the last steps run in "
                               "full to restore fine detail."),
    ]


def _summary(name: str, preset: str, cfg) -> str:
    if cfg is None:
        return f"{name}: off"
    return f"{name}: {preset} {json.dumps(cfg.to_dict(), sort_keys=True)}"


def _apply(node: str, model, mechanism: str, preset: str, custom_cfg, apply_fn, storage: str = None):
    m.get_scm_net(model, node)  # a clear error for a MODEL without SCM attention
    cfg = custom_cfg if preset == CUSTOM else preset_config(mechanism, preset)
    if cfg is not None and storage is not None:
        # Where the cache lives is a memory choice, not a speed/quality one: it applies to presets too.
        cfg = dataclasses.replace(cfg, storage=storage)
    out = model.clone()
    specs = [(n, c) for n, c in m.accelerator_specs(out) if n != mechanism]
    if cfg is not None:
        specs = apply_fn(specs, cfg)
    m.set_accelerator_specs(out, specs)
    return out, _summary(node, preset, cfg)


def _custom(node: str, make):
    try:
        return make()
    except ValueError as e:  # config checks name the field; say which node it came from
        raise ValueError(f"{node}: {e}") from e


class Turbo4DCache(io.ComfyNode):
    """Block level: reuse each spatial / camera / motion attention output across steps."""

    @classmethod
    def define_schema(cls):
        d = RollingCacheConfig()
        return io.Schema(
            node_id="Turbo4DCache", display_name="Turbo4D Cache", category="Turbo4D/accelerate",
            description="Rolling spatiotemporal cache: keeps each SCM sub-attention's output per block and reuses it "
                        "while its input barely changes, refreshing a rotating share of views/frames every step. "
                        "It stands aside on calls more than max_age steps after the previous one (after Chain "
                        "Bypass skipped whole steps), where nothing cached is still valid.",
            inputs=[
                io.Model.Input("model", tooltip="A Turbo4D model (from Turbo4D Model Loader or another Turbo4D node)."),
                io.Combo.Input("preset", options=PRESETS, default="balanced", tooltip=PRESET_TIP),
                io.Float.Input("threshold", default=d.threshold, min=0.0, max=2.0, step=0.005,
                               tooltip="custom only: relative change of an attention's input at which its cached "
                                       "output is recomputed. Higher = faster, less exact; 0 = never reuse."),
                io.Int.Input("max_age", default=d.max_age, min=1, max=50,
                             tooltip="custom only: no cached view/frame is reused more than this many steps after "
                                     "it was computed (the rolling refresh)."),
                *_percent_inputs(d.start_percent, d.end_percent),
                io.Combo.Input("storage", options=STORAGE, default=d.storage, tooltip=STORAGE_TIP),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, model, preset, threshold, max_age, start_percent, end_percent, storage) -> io.NodeOutput:
        node = "Turbo4D Cache"
        cfg = _custom(node, lambda: RollingCacheConfig(threshold=threshold, max_age=max_age, start_percent=start_percent,
                                                       end_percent=end_percent, storage=storage)) \
            if preset == CUSTOM else None
        return io.NodeOutput(*_apply(node, model, "cache", preset, cfg, apply_rolling_cache, storage))


class SemanticPrune(io.ComfyNode):
    """Token level: compute camera and motion attention only where it matters this step."""

    @classmethod
    def define_schema(cls):
        d = TokenPrunerConfig()
        return io.Schema(
            node_id="Turbo4DSemanticPrune", display_name="Semantic Prune", category="Turbo4D/accelerate",
            description="Dynamic semantic-aware token pruning: each step scores the camera and motion attention "
                        "sequences (change since last computed + saliency) and computes only the top share, reusing "
                        "the rest; the share adapts over the steps. Like the cache, it stands aside on calls more "
                        "than max_age steps after the previous one.",
            inputs=[
                io.Model.Input("model", tooltip="A Turbo4D model (from Turbo4D Model Loader or another Turbo4D node)."),
                io.Combo.Input("preset", options=PRESETS, default="balanced", tooltip=PRESET_TIP),
                io.Float.Input("keep_start", default=d.keep_start, min=0.01, max=1.0, step=0.01,
                               tooltip="custom only: share of camera/motion sequences computed when pruning starts."),
                io.Float.Input("keep_end", default=d.keep_end, min=0.01, max=1.0, step=0.01,
                               tooltip="custom only: share computed at the end (linear in between, then adapted by "
                                       "how fast the scene still changes)."),
                io.Float.Input("saliency", default=d.saliency, min=0.0, max=4.0, step=0.05,
                               tooltip="custom only: weight of content saliency (detail within a sequence) against "
                                       "change since the last compute when ranking what to compute."),
                io.Int.Input("max_age", default=d.max_age, min=1, max=50,
                             tooltip="custom only: a skipped sequence is recomputed at the latest after this many steps."),
                *_percent_inputs(d.start_percent, d.end_percent),
                io.Combo.Input("storage", options=STORAGE, default=d.storage, tooltip=STORAGE_TIP),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, model, preset, keep_start, keep_end, saliency, max_age, start_percent, end_percent,
                storage) -> io.NodeOutput:
        node = "Semantic Prune"
        cfg = _custom(node, lambda: TokenPrunerConfig(keep_start=keep_start, keep_end=keep_end, saliency=saliency,
                                                      max_age=max_age, start_percent=start_percent,
                                                      end_percent=end_percent, storage=storage)) \
            if preset == CUSTOM else None
        return io.NodeOutput(*_apply(node, model, "prune", preset, cfg, apply_token_pruning, storage))


class ChainBypass(io.ComfyNode):
    """Chain level: skip a block's whole spatial-camera-motion chain when it would barely change."""

    @classmethod
    def define_schema(cls):
        d = ChainBypassConfig()
        return io.Schema(
            node_id="Turbo4DChainBypass", display_name="Chain Bypass", category="Turbo4D/accelerate",
            description="Adaptive SCM chain bypass: per step and block, reuses the block's cached residual instead of "
                        "running spatial, camera and motion attention and the MLP, when an online estimate of the "
                        "output change stays under the threshold; and per step, skips the whole model call with a "
                        "forecast denoised image when the measured forecast error stays under step_threshold.",
            inputs=[
                io.Model.Input("model", tooltip="A Turbo4D model (from Turbo4D Model Loader or another Turbo4D node)."),
                io.Combo.Input("preset", options=PRESETS, default="balanced", tooltip=PRESET_TIP),
                io.Float.Input("threshold", default=d.threshold, min=0.0, max=2.0, step=0.005,
                               tooltip="custom only: estimated relative output error under which a block is bypassed. "
                                       "Higher = faster, less exact; 0 = never bypass."),
                io.Int.Input("max_consecutive", default=d.max_consecutive, min=0, max=50,
                             tooltip="custom only: a block runs again after this many bypasses in a row."),
                io.Float.Input("step_threshold", default=d.step_threshold, min=0.0, max=2.0, step=0.005,
                               tooltip="custom only: whole steps. Estimated relative error of holding the last "
                                       "denoised image (the error rate is measured at every step that runs) under "
                                       "which the whole model call is skipped. The number of model calls follows "
                                       "this budget, not the step count (presets: 0.03 / 0.1 / 0.2). "
                                       "0 = never skip a whole step."),
                io.Int.Input("step_max_skips", default=d.step_max_skips, min=0, max=10_000,
                             tooltip="custom only: the model runs again after this many whole steps skipped in a "
                                     "row (the presets leave the error estimate alone in charge: 10000)."),
                io.Float.Input("kappa_prior", default=d.kappa_prior, min=0.0, max=100.0, step=0.01,
                               tooltip="custom only: the forecast-error rate to assume before the second model "
                                       "call has run (the run's log reports the measured one as kappa_measured; "
                                       "the presets use 0.4). 0 = always run the second call to measure it."),
                *_percent_inputs(d.start_percent, d.end_percent),
                io.Combo.Input("storage", options=STORAGE, default=d.storage, tooltip=STORAGE_TIP),
                io.String.Input("calibration_file", default="", optional=True,
                                tooltip="Optional: the name of a JSON file written by `python -m "
                                        "turbo_core.accel.calibrate`, in ComfyUI's models/turbo4d_calibration/ "
                                        "folder (or the pack's calibration/ folder); names leading out of the "
                                        "folder are refused. When set it overrides the preset and the custom "
                                        "values."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, model, preset, threshold, max_consecutive, step_threshold, step_max_skips, kappa_prior,
                start_percent, end_percent, storage, calibration_file: str = "") -> io.NodeOutput:
        node = "Chain Bypass"
        if calibration_file and calibration_file.strip():
            path = calibration_path(node, calibration_file.strip())
            try:
                cal = load_calibration(path)
            except (OSError, ValueError) as e:
                raise ValueError(f"{node}: calibration_file={calibration_file.strip()!r}: {e}") from e
            if cal.mechanism != "bypass":
                raise ValueError(f"{node}: calibration_file {path} calibrates '{cal.mechanism}', not the chain "
                                 f"bypass. Use it on the matching node, or calibrate with --mechanism bypass.")
            return io.NodeOutput(*_apply(node, model, "bypass", CUSTOM, cal.config_object(), apply_chain_bypass))
        cfg = _custom(node, lambda: ChainBypassConfig(threshold=threshold, max_consecutive=max_consecutive,
                                                      step_threshold=step_threshold, step_max_skips=step_max_skips,
                                                      kappa_prior=kappa_prior,
                                                      start_percent=start_percent, end_percent=end_percent,
                                                      storage=storage)) \
            if preset == CUSTOM else None
        return io.NodeOutput(*_apply(node, model, "bypass", preset, cfg, apply_chain_bypass, storage))


NODES = [Turbo4DCache, SemanticPrune, ChainBypass]
