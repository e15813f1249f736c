"""What one accelerated run did, as plain data for the GUI and as a picture for the Report node.

`run_payload(stats)` turns a `RunStats` into JSON-safe data (the figures, the model calls x blocks
map as one letter per cell, the change signals per call); the ComfyUI events and the frontend use
exactly this, so the canvas and the Report image show the same numbers. `report_image(payload)`
draws the plots with OpenCV into an RGB uint8 array (no plotting library needed on the host).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

from .accel import mechanisms
from .accel.stats import BYPASSED, CACHED, CACHED_PRUNED, PRUNED, RAN

# One letter per map cell; the frontend (web/turbo4d_draw.js) uses the same letters and colours.
STATE_CODES = {RAN: "r", PRUNED: "p", CACHED: "c", CACHED_PRUNED: "x", BYPASSED: "b"}
CODE_STATES = {v: k for k, v in STATE_CODES.items()}
STATE_ORDER = (RAN, CACHED, PRUNED, CACHED_PRUNED, BYPASSED)
# RGB. Ran = full work (dark blue); the kinds of skipped work in distinct light colours.
STATE_COLOURS = {RAN: (46, 84, 150), CACHED: (80, 180, 90), PRUNED: (240, 190, 50), BYPASSED: (200, 200, 200)}
# Drawn as two halves: cached on top, pruned below (its colour here is for the legend's text only).
SPLIT = {CACHED_PRUNED: (CACHED, PRUNED)}
STATE_COLOURS[CACHED_PRUNED] = STATE_COLOURS[CACHED]
UNKNOWN_COLOUR = (40, 40, 40)


def signal_plots() -> dict:
    """{family: SignalPlot}: a mechanism's change signals are named "<mechanism>.<...>", and the
    mechanism table says how to plot them."""
    return {m.name: m.plot for m in mechanisms.MECHANISMS if m.plot is not None}


def hex_colour(rgb: Sequence[int]) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in rgb)


def legend() -> list[dict]:
    out = []
    for s in STATE_ORDER:
        e = {"state": s, "code": STATE_CODES[s], "colour": hex_colour(STATE_COLOURS[s])}
        if s in SPLIT:
            e["split"] = [STATE_CODES[p] for p in SPLIT[s]]
        out.append(e)
    return out


def row_code(entry: dict, blocks: int) -> str:
    """One timeline entry as a string of `blocks` letters (a block with no mark ran)."""
    cells = entry.get("cells", {})
    return "".join(STATE_CODES[cells.get(b, RAN)] for b in range(blocks))


def call_signals(entry: dict) -> dict:
    """Per signal family ("cache", "bypass", "prune"): min/mean/max over the blocks of one call and
    the threshold the values were compared with (None where there is none)."""
    out = {}
    for name, values in (entry.get("signal") or {}).items():
        fam = name.split(".", 1)[0]
        d = out.setdefault(fam, {"values": [], "threshold": None})
        for v, th in values:
            if v is not None and math.isfinite(v):
                d["values"].append(float(v))
            if th is not None and d["threshold"] is None:
                d["threshold"] = float(th)
    res = {}
    for fam, d in out.items():
        vals = d["values"]
        if not vals:
            continue
        res[fam] = {"min": min(vals), "mean": sum(vals) / len(vals), "max": max(vals), "n": len(vals),
                    "threshold": d["threshold"]}
    return res


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return _json_safe(x.item())
    return str(x)


def run_payload(stats) -> dict:
    """JSON-safe description of a finished (or running) run, from a RunStats."""
    blocks = int(stats.blocks)
    timeline = list(stats.timeline)
    return _json_safe({
        "summary": stats.summary(),
        "blocks": blocks,
        "rows": [row_code(t, blocks) for t in timeline],
        "steps": [t["step"] for t in timeline],
        "percent": [round(float(t.get("percent", 0.0)), 4) for t in timeline],
        "streams": [t.get("stream") for t in timeline],
        "signals": [call_signals(t) for t in timeline],
        "accelerators": stats.configs,
        "legend": legend(),
    })


def state_counts(rows: Iterable[str]) -> dict:
    counts = {s: 0 for s in STATE_ORDER}
    for r in rows:
        for ch in r:
            s = CODE_STATES.get(ch)
            if s is not None:
                counts[s] += 1
    return counts


# --- drawing ---------------------------------------------------------------------------------
def _cv2():
    try:
        import cv2
    except ImportError as e:  # opencv-python-headless is in requirements.txt
        raise ImportError("Turbo4D report plots need OpenCV: pip install opencv-python-headless") from e
    return cv2


def _text(img, s, xy, scale=0.42, colour=(30, 30, 30), thick=1):
    cv2 = _cv2()
    cv2.putText(img, s, (int(xy[0]), int(xy[1])), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)


def _canvas(h, w):
    return np.full((h, w, 3), 255, np.uint8)


def fmt_speedup(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def headline(summary: dict) -> str:
    s = summary
    frac = s.get("compute_fraction")
    return (f"compute {fmt_speedup(s.get('compute_speedup'))} faster"
            + ("" if frac is None else f" ({frac * 100:.1f}% of full)")
            + f", {s.get('seconds', 0):.2f} s, {s.get('model_calls_run', s.get('model_calls', 0))} of "
            f"{s.get('model_calls', 0)} model calls run")


def draw_map(rows: Sequence[str], blocks: int, width: int = 720, height: int = 230) -> np.ndarray:
    """Model calls (x, in order) x blocks (y, block 0 on top), one colour per cell state, with a legend
    that counts the cells of each state."""
    cv2 = _cv2()
    img = _canvas(height, width)
    L, R, T, B = 60, 12, 28, 48
    _text(img, "what each block did per model call", (L, 18), 0.5)
    n = max(len(rows), 1)
    blocks = max(int(blocks), 1)
    pw, ph = width - L - R, height - T - B
    for i, r in enumerate(rows):
        x0, x1 = L + round(i * pw / n), L + round((i + 1) * pw / n)
        for b in range(blocks):
            y0, y1 = T + round(b * ph / blocks), T + round((b + 1) * ph / blocks)
            state = CODE_STATES.get(r[b] if b < len(r) else "", "")
            halves = SPLIT.get(state, (state, state))
            ym = (y0 + y1) // 2
            for (ya, yb), h in (((y0, ym), halves[0]), ((ym, y1), halves[1])):
                col = STATE_COLOURS.get(h, UNKNOWN_COLOUR)
                cv2.rectangle(img, (x0, ya), (max(x1 - 1, x0), max(yb - 1, ya)), col, -1)
    cv2.rectangle(img, (L - 1, T - 1), (L + pw, T + ph), (0, 0, 0), 1)
    for b in range(blocks):
        if blocks <= 12 or b % max(1, blocks // 8) == 0:
            y = T + round((b + 0.5) * ph / blocks) + 4
            _text(img, f"b{b}", (L - 30, y), 0.38)
    _text(img, "block", (4, T + ph // 2), 0.38)
    for k in sorted({0, n - 1} | set(range(0, n, max(1, n // 8)))):
        if k < len(rows):
            _text(img, str(k), (L + round((k + 0.5) * pw / n) - 4, T + ph + 14), 0.35)
    _text(img, "model call", (L + pw // 2 - 30, T + ph + 28), 0.38)
    counts = state_counts(rows)
    total = max(sum(counts.values()), 1)
    x = L
    for s in STATE_ORDER:
        top, bottom = SPLIT.get(s, (s, s))
        cv2.rectangle(img, (x, height - 14), (x + 12, height - 10), STATE_COLOURS[top], -1)
        cv2.rectangle(img, (x, height - 9), (x + 12, height - 4), STATE_COLOURS[bottom], -1)
        label = f"{s} {counts[s]} ({counts[s] * 100 / total:.0f}%)"
        _text(img, label, (x + 16, height - 4), 0.36)
        x += 24 + int(6.4 * len(label))
    return img


def _dashed_hline(img, x0, x1, y, colour, dash=6):
    cv2 = _cv2()
    for x in range(int(x0), int(x1), dash * 2):
        cv2.line(img, (x, int(y)), (min(x + dash, int(x1)), int(y)), colour, 1, cv2.LINE_AA)


def draw_signals(signals: Sequence[dict], width: int = 720, panel_height: int = 120) -> np.ndarray:
    """Per signal family, per model call: the band min..max over blocks, the mean, and the threshold
    (dashed). Below the threshold the work was reused; above it, recomputed."""
    cv2 = _cv2()
    plots = signal_plots()
    fams = [f for f in plots if any(f in s for s in signals)]
    if not fams:
        img = _canvas(40, width)
        _text(img, "no change signals recorded (no cache or bypass active)", (10, 25), 0.45, (90, 90, 90))
        return img
    n = max(len(signals), 1)
    panels = []
    for fam in fams:
        img = _canvas(panel_height, width)
        L, R, T, B = 60, 12, 22, 22
        pw, ph = width - L - R, panel_height - T - B
        pts = [(i, s[fam]) for i, s in enumerate(signals) if fam in s]
        ths = [d["threshold"] for _, d in pts if d["threshold"] is not None]
        top = max([d["max"] for _, d in pts] + ths + [1e-9]) * 1.1
        X = lambda i: L + (i + 0.5) * pw / n  # noqa: E731
        Y = lambda v: T + ph - v / top * ph  # noqa: E731
        col = plots[fam].colour
        cv2.rectangle(img, (L - 1, T - 1), (L + pw, T + ph), (0, 0, 0), 1)
        half = max(1, int(pw / n * 0.3))
        for i, d in pts:
            cv2.rectangle(img, (int(X(i)) - half, int(Y(d["max"]))), (int(X(i)) + half, int(Y(d["min"]))),
                          tuple(int(c * 0.4 + 150) for c in col), -1)
        for (i0, d0), (i1, d1) in zip(pts, pts[1:]):
            cv2.line(img, (int(X(i0)), int(Y(d0["mean"]))), (int(X(i1)), int(Y(d1["mean"]))), col, 2, cv2.LINE_AA)
        for i, d in pts:
            cv2.circle(img, (int(X(i)), int(Y(d["mean"]))), 2, col, -1, cv2.LINE_AA)
        label = plots[fam].label
        _text(img, label, (L, 15), 0.42)
        _text(img, "bar: min..max over blocks, line: mean", (L + pw - 250, panel_height - 5), 0.34, (120, 120, 120))
        if ths:
            th = ths[-1]
            _dashed_hline(img, L, L + pw, Y(th), (200, 40, 40))
            _text(img, f"threshold {th:g}", (L + pw - 120, int(Y(th)) - 4), 0.36, (200, 40, 40))
        _text(img, f"{top / 1.1:.3g}", (4, T + int(ph * (1 - 1 / 1.1)) + 4), 0.35)
        _text(img, "0", (L - 14, T + ph + 4), 0.35)
        _text(img, "model call", (L + pw // 2 - 30, panel_height - 5), 0.36)
        panels.append(img)
    return np.concatenate(panels, axis=0)


def draw_quality_speed(points: Sequence[dict], width: int = 720, height: int = 260,
                       speedup_kind: str = "compute") -> np.ndarray:
    """PSNR (y) against speedup (x). `points`: dicts with "label", "speedup", "psnr" (None or inf =
    identical to the reference, drawn on the top edge) and optional "ssim"."""
    cv2 = _cv2()
    img = _canvas(height, width)
    L, R, T, B = 60, 260, 30, 40
    pw, ph = width - L - R, height - T - B
    finite = [p["psnr"] for p in points if p.get("psnr") is not None and math.isfinite(p["psnr"])]
    lo = min(finite + [20.0]) - 2
    hi = max(finite + [30.0]) + 4
    xmax = max([p["speedup"] for p in points if p.get("speedup")] + [2.0]) * 1.15
    X = lambda s: L + (s - 0.8) / (xmax - 0.8) * pw  # noqa: E731
    Y = lambda q: T + (hi - q) / (hi - lo) * ph  # noqa: E731
    _text(img, "quality vs speed (PSNR against the full-compute reference, same seed)", (L, 18), 0.45)
    cv2.rectangle(img, (L, T), (L + pw, T + ph), (0, 0, 0), 1)
    for k in range(5):
        q = lo + (hi - lo) * k / 4
        _text(img, f"{q:.0f}", (L - 30, int(Y(q)) + 4), 0.36)
        s = 0.8 + (xmax - 0.8) * k / 4
        _text(img, f"{s:.1f}x", (int(X(s)) - 12, T + ph + 16), 0.36)
    _text(img, f"speedup ({speedup_kind})", (L + pw // 2 - 50, height - 6), 0.4)
    _text(img, "dB", (8, T + 10), 0.4)
    for p in points:
        q = p.get("psnr")
        exact = q is None or not math.isfinite(q)
        y = T + 4 if exact else Y(q)
        x = X(p["speedup"])
        col = (200, 40, 40) if p.get("label", "").startswith("accel") else (46, 84, 150)
        cv2.circle(img, (int(x), int(y)), 6, col, -1, cv2.LINE_AA)
        label = p.get("label", "")
        desc = "exact" if exact else f"{q:.2f} dB" + (f", SSIM {p['ssim']:.3f}" if p.get("ssim") is not None else "")
        _text(img, f"{label}: {fmt_speedup(p['speedup'])}, {desc}", (L + pw + 8, int(y) + 4), 0.36, col)
    return img


def draw_summary(summary: dict, quality: Optional[dict] = None, width: int = 720) -> np.ndarray:
    lines = [headline(summary)]
    s = summary
    lines.append(f"block chains bypassed {s.get('chains_bypassed', 0)}/{s.get('chains_total', 0)}, "
                 f"camera+motion sequences pruned {s.get('tokens_pruned_camera_motion', 0)}/"
                 f"{s.get('tokens_total_camera_motion', 0)}")
    if s.get("blocks_reused") or s.get("tokens_offered"):  # the per-call levels ran
        lines.append(f"blocks reused {s.get('blocks_reused', 0)}/{s.get('chains_total', 0)} "
                     f"({s.get('spans_reused', 0)} spans reused, {s.get('spans_run', 0)} run), tokens computed "
                     f"{s.get('tokens_computed', 0)}/{s.get('tokens_offered', 0)}")
    mem = s.get("peak_memory_mb")
    bound = s.get("cache_bound_mb")
    lines.append(f"cache hits {s.get('cache_hits', 0)} (misses {s.get('cache_misses', 0)}), cache memory "
                 f"{s.get('cache_memory_peak_mb', 0):.2f} MB"
                 + ("" if bound is None else f" of {bound:.2f} MB bound") + ", peak memory "
                 + ("n/a (not a CUDA run)" if mem is None else f"{mem:.0f} MB"))
    if quality:
        q = quality
        parts = []
        if q.get("psnr") is not None:
            parts.append("PSNR vs reference " + ("exact" if not math.isfinite(q["psnr"]) else f"{q['psnr']:.2f} dB"))
        if q.get("ssim") is not None:
            parts.append(f"SSIM {q['ssim']:.4f}")
        if q.get("wall_speedup") is not None:
            parts.append(f"wall-clock {q['wall_speedup']:.2f}x ({q['reference_seconds']:.2f} s -> "
                         f"{s.get('seconds', 0):.2f} s, saved {q['reference_seconds'] - s.get('seconds', 0):.2f} s)")
        if parts:
            lines.append(", ".join(parts))
    img = _canvas(16 + 22 * len(lines), width)
    for i, line in enumerate(lines):
        _text(img, line, (10, 22 + 22 * i), 0.46 if i == 0 else 0.42, (0, 0, 0) if i == 0 else (50, 50, 50),
              2 if i == 0 else 1)
    return img


def report_image(payload: dict, quality: Optional[dict] = None, width: int = 720) -> np.ndarray:
    """The whole report: the figures, the map, the change signals, and quality vs speed when
    `quality` ({"psnr", "ssim", "speedup", optional "wall_speedup", "reference_seconds"}) is given."""
    parts = [draw_summary(payload["summary"], quality, width),
             draw_map(payload["rows"], payload["blocks"], width),
             draw_signals(payload.get("signals", []), width)]
    if quality and quality.get("speedup") is not None:
        parts.append(draw_quality_speed([
            {"label": "full compute", "speedup": 1.0, "psnr": None},
            {"label": "accelerated", "speedup": quality["speedup"], "psnr": quality.get("psnr"),
             "ssim": quality.get("ssim")},
        ], width, speedup_kind=quality.get("speedup_kind", "compute")))
    sep = np.full((2, width, 3), 225, np.uint8)
    out = []
    for p in parts:
        out += [p, sep]
    return np.ascontiguousarray(np.concatenate(out[:-1], axis=0))
