"""ComfyUI nodes of the pack: each module of this package is one node family and exports `NODES`.

Modules are discovered rather than listed, so a new node family (the accelerator nodes, say) plugs
in by existing. A module that fails to import is logged with its traceback and skipped, so one
broken family does not take the whole pack down.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

log = logging.getLogger("turbo4d")

# Not node families: the model glue, the socket types, the file-name resolver and the grid
# layout helpers.
_SUPPORT = {"model", "types", "files", "layout"}


def node_list() -> list:
    out, seen = [], set()
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _SUPPORT or info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except Exception:
            log.exception("Turbo4D: could not import nodes/%s.py; its nodes are not available", info.name)
            continue
        for cls in getattr(mod, "NODES", []):
            if cls not in seen:
                seen.add(cls)
                out.append(cls)
    return out
