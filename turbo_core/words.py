"""Counts in messages: '1 frame', '2 frames'."""
from __future__ import annotations

from typing import Optional


def count(n: int, noun: str, plural: Optional[str] = None) -> str:
    """The number with its noun in the right number (plural: when adding an 's' is wrong)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
