"""The accelerator nodes: MODEL -> MODEL, each a preset plus advanced inputs, one per node of the
mechanism table (turbo_core.accel.mechanisms), generated from it.

Each node clones the model and stores its mechanisms' `(name, config)` specs in its
transformer_options (the EasyCache way); the algorithm lives in turbo_core.accel and a fresh run is
built from the specs at every sampling run, so the nodes chain in any order, with each other and
with other model patches, and two accelerated models in one graph share nothing. What a run skipped
is reported by the sampler that ran it (its STRING/TURBO4D_STATS outputs, the log and the canvas).
"""
from __future__ import annotations

import os
import types

import folder_paths
from comfy_api.latest import io

from turbo_core.accel.calibrate import load_calibration
from turbo_core.accel.mechanisms import PRESET_NAMES, Node, node_configs, nodes, preset_variant, settings_line
from turbo_core.accel.presets import model_family, variant_note
from turbo_core.accel.registry import merge_spec, without

from . import files
from . import model as m

CUSTOM = "custom"
PRESETS = list(PRESET_NAMES) + [CUSTOM]
STORAGE = ["native", "fp16", "cpu"]
PRESET_TIP = ("off: full compute. quality / balanced / fast: settings measured on the embedded model "
              "(see BENCHMARKS.md). custom: use the advanced inputs below.")
STORAGE_TIP = ("Where cached activations live (applies to every preset): native (same device and dtype as the model), fp16 (half the "
               "memory), cpu (frees GPU memory, costs transfers).")
CALIBRATION_TIP = ("Optional: the name of a JSON file written by `python -m turbo_core.accel.calibrate`, in "
                   "ComfyUI's models/turbo4d_calibration/ folder (or the pack's calibration/ folder); names "
                   "leading out of the folder are refused. When set it overrides the preset and the custom values.")
CALIBRATION_FOLDER = "turbo4d_calibration"


def register_calibration_folder() -> str:
    """models/turbo4d_calibration/ in ComfyUI's models directory (and the pack's calibration/
    folder): where Chain Bypass finds calibration files, by name. Registered when first needed, not
    at import."""
    path = os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)
    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = (
            [path, os.path.join(m.PACK_DIR, "calibration")], {".json"})
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        pass  # a read-only models dir only means no calibration files there
    return path


def calibration_path(node: str, name: str) -> str:
    """The calibration file's path in its folder; a clear error when it is not there (and
    files.FileRefused for a name or a link leading out of it)."""
    register_calibration_folder()
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


def _setting_inputs(mechanisms, shown: set, optional: bool = False) -> list:
    out = []
    for mech in mechanisms:
        defaults = mech.config()
        for s in mech.settings:
            if s.name in shown:  # alternatives share a setting (threshold, max_age): one input
                continue
            shown.add(s.name)
            if s.step is None:
                out.append(io.Int.Input(s.name, default=getattr(defaults, s.name), min=s.min, max=s.max,
                                        tooltip=s.tooltip, optional=optional))
            else:
                out.append(io.Float.Input(s.name, default=getattr(defaults, s.name), min=s.min, max=s.max,
                                          step=s.step, tooltip=s.tooltip, optional=optional))
    return out


def _inputs(node: Node, mechanisms) -> list:
    """model, preset, each mechanism's settings (defaults from its config), the shared percent window
    and storage (defaults from the defining mechanism's config), the calibration file; then, on a
    node with methods, the method and the settings only its alternatives have (last and optional,
    so that workflows and API prompts written before a node had methods load and run: with the
    default method and the config's defaults)."""
    d = mechanisms[0].config()
    alternatives = {name for _, name in node.methods}
    out = [io.Model.Input("model", tooltip="A Turbo4D model (from Turbo4D Model Loader or another Turbo4D node)."),
           io.Combo.Input("preset", options=PRESETS, default="balanced", tooltip=PRESET_TIP)]
    shown: set = set()
    out += _setting_inputs([x for x in mechanisms if x is mechanisms[0] or x.name not in alternatives], shown)
    out += _percent_inputs(d.start_percent, d.end_percent)
    out.append(io.Combo.Input("storage", options=STORAGE, default=d.storage, tooltip=STORAGE_TIP))
    if node.calibration_file:
        out.append(io.String.Input("calibration_file", default="", optional=True, tooltip=CALIBRATION_TIP))
    if node.methods:
        labels = [lab for lab, _ in node.methods]
        out.append(io.Combo.Input("method", options=labels, default=labels[0], optional=True, tooltip=(
            f"How the node reuses work; the preset or the custom values apply to the chosen one. {labels[0]} "
            f"(default) is what pays on a GPU (BENCHMARKS.md, 'Per-call levels'); storage applies to "
            f"{labels[-1]} only (the other keeps its cache in 16 bits on the model's device).")))
        out += _setting_inputs([x for x in mechanisms if x.name in alternatives], shown, optional=True)
    return out


def _set(node: Node, mechanisms, model, configs: dict):
    """A clone of `model` with the node's mechanisms set to `configs` (None = off)."""
    m.get_scm_net(model, node.title)  # a clear error for a MODEL without SCM attention
    out = model.clone()
    specs = without(m.accelerator_specs(out), [x.name for x in mechanisms])
    for name, cfg in configs.items():
        if cfg is not None:
            specs = merge_spec(specs, name, cfg)
    m.set_accelerator_specs(out, specs)
    return out


def _calibrated(node: Node, mechanisms, calibration_file: str) -> dict:
    """The configs of a calibration file for this node's mechanisms."""
    title = node.title
    name = calibration_file.strip()
    path = calibration_path(title, name)
    try:
        cal = load_calibration(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{title}: calibration_file={name!r}: {e}") from e
    names = [x.name for x in mechanisms]
    if cal.mechanism not in names:
        raise ValueError(f"{title}: calibration_file {path} calibrates '{cal.mechanism}', not {title} "
                         f"({' or '.join(names)}). Use it on the matching node, or calibrate with --mechanism "
                         f"{' or --mechanism '.join(names)}.")
    return cal.configs()


def accelerator_node(node: Node, mechanisms) -> type:
    """The ComfyUI node class of one accelerator node of the mechanism table."""

    def define_schema(cls):
        return io.Schema(node_id=node.node_id, display_name=node.title, category="Turbo4D/accelerate",
                         description=node.description, inputs=_inputs(node, mechanisms),
                         outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="settings")])

    def execute(cls, model, preset, storage, calibration_file: str = "", method: str = "", **values) -> io.NodeOutput:
        if calibration_file and calibration_file.strip():
            configs = _calibrated(node, mechanisms, calibration_file)
            return io.NodeOutput(_set(node, mechanisms, model, configs), settings_line(node.title, CUSTOM, configs))
        family = model_family(m.get_scm_net(model, node.title))
        try:
            configs = node_configs(node.node_id, preset, {**values, "storage": storage}, storage, method or None,
                                   family)
        except ValueError as e:  # config checks name the field; say which node it came from
            raise ValueError(f"{node.title}: {e}") from e
        variant = preset_variant(node.node_id, preset, family, method or None)
        out = _set(node, mechanisms, model, configs)
        if variant is not None:  # the run's statistics say which variant ran
            m.add_run_note(out, variant_note(node.title, preset, variant))
        return io.NodeOutput(out, settings_line(node.title, preset, configs, variant))

    def body(ns):
        ns.update(define_schema=classmethod(define_schema), execute=classmethod(execute))

    return types.new_class(node.node_id, (io.ComfyNode,), exec_body=body)


NODES = [accelerator_node(node, mechanisms) for node, mechanisms in nodes()]
BY_ID = {cls.__name__: cls for cls in NODES}
# The classes under the names they had when each node was written by hand (scripts call them).
Turbo4DCache, SemanticPrune = BY_ID["Turbo4DCache"], BY_ID["Turbo4DSemanticPrune"]
ChainBypass = BY_ID["Turbo4DChainBypass"]
