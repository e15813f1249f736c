"""What every mechanism's settings share: frozen, checked, plain data that a ComfyUI node stores in
the model's options and a calibration writes to JSON.

A mechanism's config is a frozen dataclass deriving from `MechanismConfig`. Construction checks the
fields most mechanisms have (the percent window of the schedule, where cached activations are
stored, subsampling strides) and then the config's own `validate()`; lists given for tuple fields
(from JSON) become tuples. `to_dict` / `from_dict` (plain.PlainData) round-trip through plain data,
and unknown settings are an error that names the known ones.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..plain import PlainData
from .storage import check_storage

STRIDES = ("signal_stride", "channel_stride")


@dataclass(frozen=True)
class MechanismConfig(PlainData):
    def __post_init__(self):
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self._check_common()
        self.validate()

    def validate(self) -> None:
        """The config's own checks; raise ValueError naming the field and the fix."""

    def _check_common(self) -> None:
        owner = type(self).__name__
        names = {f.name for f in fields(self)}
        if {"start_percent", "end_percent"} <= names:
            for name in ("start_percent", "end_percent"):
                v = getattr(self, name)
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"{owner}.{name} must be within [0, 1], got {v}")
            if self.start_percent > self.end_percent:
                raise ValueError(f"{owner}.start_percent ({self.start_percent}) is after end_percent "
                                 f"({self.end_percent})")
        if "storage" in names:
            check_storage(self.storage, owner)
        for name in STRIDES:
            if name in names and int(getattr(self, name)) < 1:
                raise ValueError(f"{owner}.{name} must be >= 1, got {getattr(self, name)}")
