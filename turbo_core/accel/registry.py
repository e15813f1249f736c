"""From accelerator specs (plain, copyable data a ComfyUI node stores in the model's options) to a
fresh `Turbo4DRun` for one sampling run.

Specs are `(name, config)` pairs, names from the mechanism table (mechanisms.py). Building a new run
from them at every sampling run is what makes two accelerated models in one graph share nothing and
every run start clean. The mechanisms compose in the order of their levels in the table (the step
skip outermost, then the chain bypass, the block cache, token pruning), so the result does not
depend on the order in which the nodes were wired.
"""
from __future__ import annotations

from typing import Iterable

from .mechanisms import LEVELS, mechanism
from .run import Turbo4DRun


def merge_spec(specs: Iterable[tuple[str, object]], name: str, config) -> list:
    """The spec list with `name` set to `config` (a second node of the same kind replaces the first)."""
    out = [(n, c) for n, c in (specs or []) if n != name]
    out.append((name, config))
    return out


def without(specs: Iterable[tuple[str, object]], names: Iterable[str]) -> list:
    """The spec list without the mechanisms `names`."""
    names = set(names)
    return [(n, c) for n, c in (specs or []) if n not in names]


def build_run(specs: Iterable[tuple[str, object]] = (), backend: str = "short-axis") -> Turbo4DRun:
    plugins = []
    for name, config in specs or []:
        m = mechanism(name)
        plugins.append((LEVELS.index(m.level), m.factory(m.config.from_dict(config))))
    plugins.sort(key=lambda t: t[0])
    return Turbo4DRun([p for _, p in plugins], backend=backend)
