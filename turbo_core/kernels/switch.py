"""What the kernel modules share: Triton where it is installed, and the env switch each kernel
reads (auto / triton / torch) under its own variable name."""
from __future__ import annotations

import os

try:  # Triton is optional: CPU installs and CI have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

MODES = ("auto", "triton", "torch")


def env_mode(env: str) -> str:
    """The mode the variable `env` asks for ("auto" when unset or empty); a clear error otherwise."""
    m = os.environ.get(env, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{env}={m!r} is not one of {MODES}; unset it or pick one")
    return m


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1): kernels then run on any device."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
