"""The mechanisms, one row each: the one table that the registry (which builds a run), the presets,
calibration, the accelerator nodes and the report's signal plots read.

A row names the mechanism (its spec name), the level it acts at (which orders the composition:
outermost first, whatever order the nodes were wired in), its config class and factory, its
presets, the node that sets it (a node of its own, or another mechanism's node it joins) with the
settings that node shows under "custom", the setting calibration fits by default, and how the
report plots its change signals (family = its name). Adding a mechanism is a module (a
MechanismConfig subclass, an Accelerator or StepAccelerator subclass, its PRESETS) and a row here;
everything else derives from the table when it is asked (nothing copies it at import).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from . import block_reuse, bypass, cache, prune, step_skip, token_reuse

# Where a mechanism acts, outermost first: the order in which a run composes them.
LEVELS = ("step", "chain", "block", "token")


@dataclass(frozen=True)
class Setting:
    """One setting a node shows among its advanced inputs: a Float input when `step` is given,
    else an Int; the default is the config's."""

    name: str
    min: float
    max: float
    tooltip: str
    step: Optional[float] = None


@dataclass(frozen=True)
class Node:
    """An accelerator node (MODEL -> MODEL) of the mechanism that defines it."""

    node_id: str
    title: str
    description: str
    calibration_file: bool = False  # the node takes a calibration file of its mechanisms
    # (label, mechanism) of mechanisms the node offers as alternatives, the default first: the node
    # shows a "method" choice and sets only the chosen one (its other mechanisms are complements,
    # always set together, like Chain Bypass's block bypass and step skip).
    methods: tuple = ()

    def method(self, label: Optional[str]) -> Optional[str]:
        """The mechanism of a method label (None or "": the default); None for a node without methods."""
        if not self.methods:
            return None
        for lab, name in self.methods:
            if label in (None, "", lab):
                return name
        raise ValueError(f"{self.title}: unknown method {label!r}; pick one of {[lab for lab, _ in self.methods]}")


@dataclass(frozen=True)
class SignalPlot:
    """How the report plots a mechanism's change signals (those named "<mechanism>.<...>")."""

    label: str
    colour: tuple


@dataclass(frozen=True)
class Mechanism:
    name: str
    level: str
    config: type
    factory: Callable
    presets: dict
    node: Union[Node, str]  # its own node, or the node_id of the node it joins
    settings: Sequence[Setting] = ()
    calibrate: Optional[str] = None
    plot: Optional[SignalPlot] = None
    # {model family: {preset: config}}: a preset's variant for one family of models
    # (presets.model_family), where it was measured to differ; the others take `presets`.
    family_presets: dict = dataclasses.field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.node if isinstance(self.node, str) else self.node.node_id

    def preset(self, name: str, family: Optional[str] = None):
        """The config of preset `name` for a model of `family` (its variant where it has one)."""
        return self.family_presets.get(family, {}).get(name, self.presets[name])


MECHANISMS = (
    Mechanism(
        "cache", "block", cache.RollingCacheConfig, cache.RollingCache, cache.PRESETS,
        Node("Turbo4DCache", "Turbo4D Cache",
             "Reuses work across denoising steps. method 'block reuse' (default; what pays on a GPU): reuses the "
             "residual of whole spans of blocks while it drifts slowly, a rotating share recomputed every call, the "
             "cache held within a tenth of a call's working memory (or the Turbo4D Memory node's bound), no host "
             "sync inside a call. method 'sub-attention cache': keeps each SCM sub-attention's output per block "
             "and reuses it while its input barely changes, refreshing a rotating share of views/frames every "
             "step (pays for large attention on a CPU). Both stand aside after steps Chain Bypass skipped whole, "
             "where nothing cached is still valid.",
             methods=(("block reuse", "block_reuse"), ("sub-attention cache", "cache"))),
        settings=(
            Setting("threshold", 0.0, 2.0, "custom only: block reuse: estimated relative error of a reused span "
                                           "under which it is reused; sub-attention cache: relative change of an "
                                           "attention's input at which its cached output is recomputed. Higher = "
                                           "faster, less exact; 0 = never reuse.", 0.005),
            Setting("max_age", 1, 50, "custom only: nothing cached (a span's residual, a view/frame) is reused more "
                                      "than this many steps after it was computed (the rolling refresh)."),
        ),
        calibrate="threshold",
        plot=SignalPlot("cache: change of the attention input vs its cached one", (60, 150, 70))),
    Mechanism(
        "bypass", "chain", bypass.ChainBypassConfig, bypass.ChainBypass, bypass.PRESETS,
        Node("Turbo4DChainBypass", "Chain Bypass",
             "Adaptive SCM chain bypass: per step and block, reuses the block's cached residual instead of running "
             "spatial, camera and motion attention and the MLP, when an online estimate of the output change stays "
             "under the threshold; and per step, skips the whole model call with a forecast denoised image when the "
             "measured forecast error stays under step_threshold.", calibration_file=True),
        settings=(
            Setting("threshold", 0.0, 2.0, "custom only: estimated relative output error under which a block is "
                                           "bypassed. Higher = faster, less exact; 0 = never bypass.", 0.005),
            Setting("max_consecutive", 0, 50, "custom only: a block runs again after this many bypasses in a row."),
        ),
        calibrate="threshold",
        plot=SignalPlot("bypass: estimated change of a block's output", (120, 120, 120))),
    # Its signal is "bypass.step": plotted with the bypass's, as users find it in the same node.
    Mechanism(
        "step", "step", step_skip.StepSkipConfig, step_skip.StepSkip, step_skip.PRESETS, "Turbo4DChainBypass",
        settings=(
            Setting("step_threshold", 0.0, 2.0,
                    "custom only: whole steps. Estimated relative error of holding the last denoised image (the "
                    "error rate is measured at every step that runs) under which the whole model call is skipped. "
                    "The number of model calls follows this budget, not the step count (presets: 0.03 / 0.1 / 0.2). "
                    "0 = never skip a whole step.", 0.005),
            Setting("step_max_skips", 0, 10_000, "custom only: the model runs again after this many whole steps "
                                                 "skipped in a row (the presets leave the error estimate alone in "
                                                 "charge: 10000)."),
            Setting("kappa_prior", 0.0, 100.0,
                    "custom only: the forecast-error rate to assume before the second model call has run (the "
                    "run's log reports the measured one as kappa_measured; the presets use 0.4). 0 = always run the "
                    "second call to measure it.", 0.01),
        ),
        calibrate="step_threshold"),
    Mechanism(
        "prune", "token", prune.TokenPrunerConfig, prune.TokenPruner, prune.PRESETS,
        Node("Turbo4DSemanticPrune", "Semantic Prune",
             "Computes only the tokens that changed. method 'token reuse' (default): spans of blocks run on the "
             "top-k changed token positions (their projections, attention and MLP), the rest from the span's "
             "cached residual, the share set by the measured drift, the cache within a tenth of a call's working "
             "memory (or the Turbo4D Memory node's bound). method 'sequence prune': each step scores the camera and "
             "motion attention sequences (change since last computed + saliency) and computes only the top share, "
             "reusing the rest. Both stand aside after steps Chain Bypass skipped whole.",
             methods=(("token reuse", "token_reuse"), ("sequence prune", "prune"))),
        settings=(
            Setting("keep_start", 0.01, 1.0, "custom only: share of camera/motion sequences computed when pruning "
                                             "starts.", 0.01),
            Setting("keep_end", 0.01, 1.0, "custom only: share computed at the end (linear in between, then adapted "
                                           "by how fast the scene still changes).", 0.01),
            Setting("saliency", 0.0, 4.0, "custom only: weight of content saliency (detail within a sequence) "
                                          "against change since the last compute when ranking what to compute.", 0.05),
            Setting("max_age", 1, 50, "custom only: a skipped sequence is recomputed at the latest after this many "
                                      "steps."),
        ),
        calibrate="keep_end",
        plot=SignalPlot("prune: token change (no threshold; sets the keep ratio)", (210, 150, 20))),
    # The per-call levels, as the default methods of the Cache and Semantic Prune nodes.
    Mechanism(
        "block_reuse", "block", block_reuse.BlockReuseConfig, block_reuse.BlockReuse, block_reuse.PRESETS,
        "Turbo4DCache",  # its threshold and max_age are the node's own inputs
        calibrate="threshold", family_presets=block_reuse.FAMILY_PRESETS,
        plot=SignalPlot("block reuse: measured drift of a span's residual", (40, 110, 200))),
    Mechanism(
        "token_reuse", "token", token_reuse.TokenReuseConfig, token_reuse.TokenReuse, token_reuse.PRESETS,
        "Turbo4DSemanticPrune",
        settings=(
            Setting("threshold", 0.0, 2.0, "custom only, token reuse: estimated relative error at which a span "
                                           "computes every token position. Higher = faster, less exact; 0 = never "
                                           "reuse.", 0.005),
            Setting("keep_min", 0.01, 1.0, "custom only, token reuse: share of the token positions a span computes "
                                           "at least.", 0.01),
        ),
        calibrate="threshold",
        plot=SignalPlot("token reuse: measured drift of a span's residual", (150, 60, 190))),
)

PRESET_NAMES = ("off", "quality", "balanced", "fast")


def names() -> list[str]:
    return [m.name for m in MECHANISMS]


def mechanism(name: str) -> Mechanism:
    for m in MECHANISMS:
        if m.name == name:
            return m
    raise ValueError(f"unknown Turbo4D accelerator {name!r}; known: {sorted(names())}")


def nodes() -> list[tuple[Node, list[Mechanism]]]:
    """The accelerator nodes in table order, each with its mechanisms (the defining one first)."""
    out = []
    for m in MECHANISMS:
        if isinstance(m.node, Node):
            out.append((m.node, [m] + [j for j in MECHANISMS if j.node == m.node.node_id]))
    return out


def split_settings(mechanisms: Sequence[Mechanism], values: dict) -> dict:
    """{name: config} of `mechanisms` from one dict of settings (a node's inputs, a calibration of a
    node written before its mechanisms were split): each takes the settings its config has, the
    rest at their defaults; a setting none of them has is an error."""
    known = set()
    out = {}
    for m in mechanisms:
        own = {f.name for f in dataclasses.fields(m.config)}
        known |= own
        out[m.name] = m.config(**{k: v for k, v in values.items() if k in own})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
    return out


def node_configs(node_id: str, preset: str, values: Optional[dict] = None,
                 storage: Optional[str] = None, method: Optional[str] = None,
                 family: Optional[str] = None) -> dict:
    """{name: config or None (off)} that the node `node_id` sets for each of its mechanisms: the
    preset's, or with "custom" the node's `values`. `storage` (where cached activations live is a
    memory choice, not a speed/quality one) applies to presets too, for the mechanisms that have
    it. `method`: the label of the chosen alternative on a node with methods (None: the default);
    the other alternatives are off. `family`: the model's family (presets.model_family), whose
    variant of a preset a mechanism takes where it has one (preset_variant says which did)."""
    node, members = next((n, ms) for n, ms in nodes() if n.node_id == node_id)
    chosen = node.method(method)
    alternatives = {name for _, name in node.methods}
    active = [m for m in members if m.name not in alternatives or m.name == chosen]
    if preset == "custom":
        values = dict(values or {})
        if node.methods:  # the node shows every alternative's settings; each takes its own
            shown = set().union(*({f.name for f in dataclasses.fields(m.config)} for m in members))
            unknown = sorted(set(values) - shown)
            if unknown:
                raise ValueError(f"unknown settings {unknown}; known: {sorted(shown)}")
            own = set().union(*({f.name for f in dataclasses.fields(m.config)} for m in active))
            # A setting only an alternative shows (token reuse's keep_min on Semantic Prune) is that
            # alternative's, even where another method's config has a field of the same name.
            first = {x.name for x in members[0].settings}
            for m in members[1:]:
                if m.name in alternatives and m.name != chosen:
                    own -= {x.name for x in m.settings} - first
            values = {k: v for k, v in values.items() if k in own}
        configs = split_settings(active, values)
    else:
        if preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {preset!r}; pick one of {PRESET_NAMES}")
        configs = {m.name: m.preset(preset, family) for m in active}
    configs.update({m.name: None for m in members if m not in active})
    if storage is not None:
        configs = {n: c if c is None or not hasattr(c, "storage") else dataclasses.replace(c, storage=storage)
                   for n, c in configs.items()}
    return configs


def preset_variant(node_id: str, preset: str, family: Optional[str], method: Optional[str] = None) -> Optional[str]:
    """The family whose variant of `preset` the node's active mechanisms take (None: the presets
    every model gets)."""
    if family is None or preset not in PRESET_NAMES:
        return None
    node, members = next((n, ms) for n, ms in nodes() if n.node_id == node_id)
    chosen = node.method(method)
    alternatives = {name for _, name in node.methods}
    active = [m for m in members if m.name not in alternatives or m.name == chosen]
    return family if any(preset in m.family_presets.get(family, {}) for m in active) else None


def settings_line(title: str, preset: str, configs: dict, variant: Optional[str] = None) -> str:
    """What a node reports it set: its configs' settings together, or off; `variant`: the model
    family whose variant of the preset was taken."""
    merged = {}
    for c in configs.values():
        if c is not None:
            merged.update(c.to_dict())
    if not merged:
        return f"{title}: off"
    label = preset if variant is None else f"{preset} ({variant} variant)"
    return f"{title}: {label} {json.dumps(merged, sort_keys=True)}"
