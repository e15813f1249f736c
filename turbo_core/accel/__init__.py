"""The mechanisms (step, chain, block and token level), the run that composes them, and what they report.

Each mechanism is one module (a config, its plug-in, its presets) and one row of the table in
mechanisms.py, which everything that lists mechanisms reads: the registry, the presets, calibration,
the accelerator nodes and the report.
"""
from .base import Accelerator, StepAccelerator
from .run import Turbo4DRun
from .stats import RunStats

__all__ = ["Accelerator", "StepAccelerator", "Turbo4DRun", "RunStats"]
