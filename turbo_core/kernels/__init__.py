"""Attention kernels for the SCM axes (plain PyTorch fallbacks; Triton where it is installed)."""
from .short_axis import (available, grid_attention, kernel_applies, short_axis_sdpa,
                         short_axis_attention)

__all__ = ["available", "grid_attention", "kernel_applies", "short_axis_sdpa", "short_axis_attention"]
