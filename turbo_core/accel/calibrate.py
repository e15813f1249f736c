"""Calibration: the fastest setting of one accelerator that stays within a quality budget.

Thresholds of change signals are model-specific (the users of every step-cache pack ask for this).
Given a full-compute reference run per sample and candidate values ordered from safest to fastest,
each candidate is sampled with the same noise; the PSNR of its result against the reference is
taken per image, and its minimum over the samples decides. The chosen value is the last candidate
in that order for which it and every safer candidate stay at or above `target_psnr`: stopping at
the first failure makes the choice robust to a candidate that passes by luck after one failed.
The result is saved as JSON and loaded back into a config / spec list.

    python -m turbo_core.accel.calibrate --model models/turbo4d_default.safetensors \
        --mechanism bypass --candidates 0.02,0.04,0.08,0.12,0.2 --target-psnr 35 --out calibrated.json

Which mechanisms can be calibrated, and the setting each fits by default, is in the mechanism table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from ..data.scenes import scene_samples
from ..diffusion import EDM, karras_sigmas
from ..metrics import psnr
from . import mechanisms
from .mechanisms import Mechanism, nodes, split_settings
from .registry import merge_spec, without
from .script import sample_accelerated

FORMAT = "turbo4d-calibration"


def calibrated() -> list[str]:
    """The mechanisms with a setting to calibrate (the table's `calibrate`)."""
    return sorted(m.name for m in mechanisms.MECHANISMS if m.calibrate)


@dataclass
class Calibration:
    mechanism: str
    field: str
    value: Optional[float]          # None: no candidate met the target; the mechanism stays off
    target_psnr: float
    config: Optional[dict]          # the calibrated config as plain data (None = off)
    points: list = field(default_factory=list)  # per candidate: value, psnr_min, psnr_mean, compute_fraction, seconds
    meta: dict = field(default_factory=dict)

    def configs(self) -> dict:
        """{mechanism: config or None (off)} that this calibration sets. A Chain Bypass calibration
        written before the step skip became a mechanism of its own holds the settings of both in
        one config: they are split between the two, as the node splits its inputs."""
        m = mechanisms.mechanism(self.mechanism)
        if self.config is None:
            return {m.name: None}
        node = next(ms for _, ms in nodes() if m in ms)
        if len(node) > 1 and set(self.config) - {f.name for f in dataclasses.fields(m.config)}:
            return split_settings(node, self.config)
        return {m.name: m.config.from_dict(self.config)}

    def specs(self, specs: Sequence = ()) -> list:
        """`specs` with the calibrated mechanisms set to their configs (removed if off)."""
        out = list(specs)
        for name, cfg in self.configs().items():
            out = without(out, [name]) if cfg is None else merge_spec(out, name, cfg)
        return out


def _finite_min(t: torch.Tensor) -> float:
    v = float(t.min())
    return v if not math.isnan(v) else float("-inf")


@torch.no_grad()
def calibrate(net, edm: EDM, samples: Sequence[dict], sigmas: torch.Tensor, views: int, frames: int, *,
              mechanism: str = "bypass", candidates: Sequence[float], target_psnr: float = 35.0,
              field_name: Optional[str] = None, base_config=None, other_specs: Sequence = (),
              backend="sdpa", log=None) -> Calibration:
    """samples: dicts with noise, cond, camera (see data.scenes.scene_samples). `candidates` are values
    of `field_name` (default: the mechanism's main knob) ordered from safest to fastest.
    `other_specs` stay on in every run, reference included (calibrate one mechanism on top of
    others)."""
    if mechanism not in calibrated():
        raise ValueError(f"unknown accelerator {mechanism!r}; pick one of {calibrated()}")
    if not candidates:
        raise ValueError("calibrate: give at least one candidate value")
    if not samples:
        raise ValueError("calibrate: give at least one sample")
    m: Mechanism = mechanisms.mechanism(mechanism)
    cls = m.config
    fname = field_name or m.calibrate
    base = cls.from_dict(base_config)
    base_dict = base.to_dict()
    if fname not in base_dict:
        raise ValueError(f"{cls.__name__} has no setting {fname!r}; it has {sorted(base_dict)}")
    log = log or (lambda *_: None)

    def run(specs):
        outs, fractions, t0 = [], [], time.perf_counter()
        for s in samples:
            x, st = sample_accelerated(net, edm, specs, s["noise"], sigmas, s["cond"], s["camera"], views, frames,
                                       backend=backend)
            outs.append(x.float().clamp(-1, 1))
            fractions.append(st.compute_fraction)
        if outs[0].is_cuda:
            torch.cuda.synchronize(outs[0].device)
        return outs, sum(fractions) / len(fractions), time.perf_counter() - t0

    others = without(other_specs, [mechanism])
    if mechanism == "step" and fname == "step_threshold" and not base_dict.get("kappa_prior"):
        # Whole steps: the model's own forecast-error rate is the prior the candidates run with.
        probe = cls.from_dict({**base_dict, "step_threshold": 1e-12})
        kappas = []
        for s in samples:
            _, st = sample_accelerated(net, edm, merge_spec(others, mechanism, probe), s["noise"], sigmas, s["cond"],
                                       s["camera"], views, frames, backend=backend)
            k = st.kappa_measured
            if k is not None:
                kappas.append(k)
        if kappas:
            base_dict["kappa_prior"] = statistics.median_high(kappas)
            log(f"kappa_prior = {base_dict['kappa_prior']:.4g} (measured on the reference samples)")
    refs, ref_fraction, ref_seconds = run(others)
    log(f"reference: compute {ref_fraction:.3f}, {ref_seconds:.2f}s")
    points, chosen = [], None
    failed = False
    for v in candidates:
        cfg = cls.from_dict({**base_dict, fname: v})
        outs, fraction, seconds = run(merge_spec(others, mechanism, cfg))
        ps = torch.cat([psnr(o, r).flatten() for o, r in zip(outs, refs)])
        p_min = _finite_min(ps)
        finite = ps[torch.isfinite(ps)]
        p_mean = float(finite.mean()) if finite.numel() else float("inf")
        ok = p_min >= target_psnr
        points.append({"value": v, "psnr_min": p_min, "psnr_mean": p_mean, "compute_fraction": fraction,
                       "seconds": seconds, "passes": ok})
        log(f"{fname}={v}: PSNR min {p_min:.2f} mean {p_mean:.2f} dB, compute {fraction:.3f}, {seconds:.2f}s"
            f"{'' if ok else '  (below target)'}")
        if not ok:
            failed = True
        if ok and not failed:
            chosen = cfg
    return Calibration(mechanism=mechanism, field=fname, value=None if chosen is None else getattr(chosen, fname),
                       target_psnr=float(target_psnr), config=None if chosen is None else chosen.to_dict(),
                       points=points,
                       meta={"reference_compute_fraction": ref_fraction, "reference_seconds": ref_seconds,
                             "samples": len(samples), "steps": len(sigmas) - 1, "views": views, "frames": frames,
                             "other_specs": [[n, c.to_dict() if hasattr(c, "to_dict") else c] for n, c in others]})


def save_calibration(cal: Calibration, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"format": FORMAT, **asdict(cal)}, f, indent=2, allow_nan=True)


def load_calibration(path: str) -> Calibration:
    """Reads a calibration file; bad files get an error naming the file and the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file not found: {path}. Run `python -m turbo_core.accel.calibrate "
                                f"--out {path}` first.")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); calibrate again to rewrite it.") from e
    except UnicodeDecodeError as e:  # a binary file: the codec's message alone names no file
        raise ValueError(f"{path} is not a calibration file: it is binary, not JSON text (byte {e.start} is not "
                         f"UTF-8). Give the .json that `python -m turbo_core.accel.calibrate --out` wrote, or "
                         f"calibrate again.") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path} is not a Turbo4D calibration file (no format={FORMAT!r}); calibrate again.")
    d.pop("format")
    try:
        cal = Calibration(**d)
    except TypeError as e:
        raise ValueError(f"{path}: unexpected content ({e}); calibrate again.") from e
    if cal.mechanism not in calibrated():
        raise ValueError(f"{path}: unknown accelerator {cal.mechanism!r}")
    try:
        cal.configs()  # validates the stored settings
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}; calibrate again.") from e
    return cal


def _mechanism_of(field_name: Optional[str]) -> str:
    """bypass, unless only another calibrated mechanism has the setting `field_name`."""
    having = [n for n in calibrated()
              if field_name in {f.name for f in dataclasses.fields(mechanisms.mechanism(n).config)}]
    return having[0] if field_name and "bypass" not in having and len(having) == 1 else "bypass"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/turbo4d_default.safetensors")
    ap.add_argument("--mechanism", default=None, choices=calibrated(),
                    help="default: bypass, or the mechanism that has --field")
    ap.add_argument("--field", default=None,
                    help="setting to calibrate (default: the mechanism's, e.g. threshold, keep_end for prune)")
    ap.add_argument("--candidates", default="0.02,0.04,0.06,0.08,0.12,0.16,0.24",
                    help="comma-separated values, safest first")
    ap.add_argument("--target-psnr", type=float, default=35.0)
    ap.add_argument("--seeds", default="1000000,1000001", help="held-out scene seeds (>= 1_000_000)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--base", default=None,
                    help="JSON of the other settings; default: the config's defaults, or for the step skip the "
                         "presets' whole-step settings (kappa_prior measured)")
    ap.add_argument("--out", default="calibrated.json")
    args = ap.parse_args(argv)
    args.mechanism = args.mechanism or _mechanism_of(args.field)

    from ..models.io import load_model

    net = load_model(args.model, device=args.device).eval()
    edm = EDM(sigma_data=net.cfg.sigma_data)
    seeds = [int(s) for s in args.seeds.split(",")]
    samples = scene_samples(seeds, args.views, args.frames, net.cfg.image_size, args.device)
    sigmas = karras_sigmas(args.steps, edm.sigma_min, edm.sigma_max, device=args.device)
    cands = [float(c) for c in args.candidates.split(",")]
    base = json.loads(args.base) if args.base else None
    if base is None and args.mechanism == "step":
        # Calibrate in the regime the presets use (no count limit, tail skippable), with this
        # model's own forecast-error rate measured first instead of the embedded model's.
        base = {**mechanisms.mechanism("step").presets["balanced"].to_dict(), "kappa_prior": 0.0}
    cal = calibrate(net, edm, samples, sigmas, args.views, args.frames, mechanism=args.mechanism,
                    candidates=cands, target_psnr=args.target_psnr, field_name=args.field,
                    base_config=base, log=print)
    cal.meta.update({"model": os.path.basename(args.model), "seeds": seeds})
    save_calibration(cal, args.out)
    print(f"{args.mechanism}.{cal.field} = {cal.value} (target PSNR {args.target_psnr} dB) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
