"""The three accelerators (block, token and chain level) and what they report.

Each mechanism is one module: a config dataclass, a state object with `reset()`, the behaviour
(an `Accelerator` the SCM dispatch consults), and one `apply_*` function.
"""
from .base import Accelerator, Turbo4DRun
from .stats import RunStats

__all__ = ["Accelerator", "Turbo4DRun", "RunStats"]
