"""From accelerator specs (plain, copyable data a ComfyUI node stores in the model's options) to a
fresh `Turbo4DRun` for one sampling run.

Specs are `(name, config)` pairs. Building a new run from them at every sampling run is what makes
two accelerated models in one graph share nothing and every run start clean. The accelerators are
composed in a fixed order by level (chain bypass outermost, then the block cache, then token
pruning), so the result does not depend on the order in which the nodes were wired.
"""
from __future__ import annotations

from typing import Callable, Iterable

from .base import Accelerator, Turbo4DRun

# name -> (level, factory(config) -> Accelerator); modules register themselves on import.
_REGISTRY: dict[str, tuple[int, Callable[[object], Accelerator]]] = {}


def register(name: str, level: int, factory: Callable[[object], Accelerator]) -> None:
    _REGISTRY[name] = (level, factory)


def merge_spec(specs: Iterable[tuple[str, object]], name: str, config) -> list:
    """The spec list with `name` set to `config` (a second node of the same kind replaces the first)."""
    out = [(n, c) for n, c in (specs or []) if n != name]
    out.append((name, config))
    return out


def build_run(specs: Iterable[tuple[str, object]] = (), backend: str = "short-axis") -> Turbo4DRun:
    _load_builtin()
    accs = []
    for name, config in specs or []:
        if name not in _REGISTRY:
            raise ValueError(f"unknown Turbo4D accelerator {name!r}; known: {sorted(_REGISTRY)}")
        level, factory = _REGISTRY[name]
        accs.append((level, factory(config)))
    accs.sort(key=lambda t: t[0])
    return Turbo4DRun([a for _, a in accs], backend=backend)


def _load_builtin() -> None:
    # Importing the mechanism modules registers them.
    import importlib

    for mod in ("bypass", "cache", "prune"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise
