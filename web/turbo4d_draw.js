// Shared by the Turbo4D frontend extensions: cell colours, figures text, map drawing.
// Letters and colours match turbo_core/run_report.py (STATE_CODES, STATE_COLOURS); the server sends
// its legend with every run and that one wins.

export const DEFAULT_LEGEND = [
  { state: "ran", code: "r", colour: "#2e5496" },
  { state: "cached", code: "c", colour: "#50b45a" },
  { state: "pruned", code: "p", colour: "#f0be32" },
  { state: "cached+pruned", code: "x", colour: "#50b45a", split: ["c", "p"] },
  { state: "bypassed", code: "b", colour: "#c8c8c8" },
];
export const PENDING_COLOUR = "#2a2a2a";

export function legendOf(payload) {
  return (payload && Array.isArray(payload.legend) && payload.legend.length) ? payload.legend : DEFAULT_LEGEND;
}

export function colourOf(code, legend = DEFAULT_LEGEND) {
  const e = legend.find((l) => l.code === code);
  return e ? e.colour : PENDING_COLOUR;
}

// [top, bottom] colours of a cell: a block both cached and pruned is drawn half and half.
export function halvesOf(code, legend = DEFAULT_LEGEND) {
  const e = legend.find((l) => l.code === code);
  if (e && Array.isArray(e.split)) return [colourOf(e.split[0], legend), colourOf(e.split[1], legend)];
  const c = colourOf(code, legend);
  return [c, c];
}

export function countStates(rows, legend = DEFAULT_LEGEND) {
  const counts = {};
  for (const l of legend) counts[l.state] = 0;
  for (const r of rows || []) {
    for (const ch of r) {
      const e = legend.find((l) => l.code === ch);
      if (e) counts[e.state] += 1;
    }
  }
  return counts;
}

const pct = (a, b) => (b ? ` (${Math.round((100 * a) / b)}%)` : "");

// Label -> text of every figure, from a RunStats summary (turbo_core/accel/stats.py summary()).
// Two speedups, never mixed up: "compute speedup" is counted (the model work the run skipped, not
// timed); "wall-clock speedup" is measured, and only known against a full-compute run of the same
// settings (a Turbo4D Report with reference_stats wired: `wall` = {speedup, reference_seconds,
// seconds}, or {reference: true} on that full-compute run itself).
export const WALL_UNKNOWN = "not measured: no full run wired";
export const WALL_REFERENCE = "1.00x: this is the full-compute run";

export function wallFigure(wall) {
  if (wall?.reference) return WALL_REFERENCE;
  if (wall?.speedup == null) return WALL_UNKNOWN;
  const ref = wall.reference_seconds, here = wall.seconds;
  return `${wall.speedup.toFixed(2)}x` + (ref != null && here != null
    ? ` (${ref.toFixed(2)} s full, ${here.toFixed(2)} s here)` : "");
}

export function figuresOf(summary, quality, wall) {
  const s = summary || {};
  const f = {};
  const sp = s.compute_speedup;
  f["compute speedup"] = sp == null ? "-" : `${sp.toFixed(2)}x` +
    (s.compute_fraction != null ? ` (model work ${(s.compute_fraction * 100).toFixed(1)}% of full)` : "");
  if (quality?.wall_speedup != null) {
    wall = { speedup: quality.wall_speedup, reference_seconds: quality.reference_seconds, seconds: s.seconds };
  }
  f["wall-clock speedup"] = wallFigure(wall);
  f["time"] = s.seconds != null
    ? `${s.seconds.toFixed(2)} s, ${s.model_calls_run ?? s.model_calls ?? 0} of ${s.model_calls ?? 0} model calls run` : "-";
  f["peak memory"] = s.peak_memory_mb == null ? "n/a (not a CUDA run)" : `${s.peak_memory_mb.toFixed(0)} MB`;
  f["chains bypassed"] = `${s.chains_bypassed ?? 0}/${s.chains_total ?? 0}` + pct(s.chains_bypassed, s.chains_total) +
    `, ${s.steps_fully_bypassed ?? 0} whole step${s.steps_fully_bypassed === 1 ? "" : "s"}`;
  f["tokens pruned"] = `${s.tokens_pruned_camera_motion ?? 0}/${s.tokens_total_camera_motion ?? 0}` +
    pct(s.tokens_pruned_camera_motion, s.tokens_total_camera_motion) + " cam+motion seqs";
  f["cache hits"] = `${s.cache_hits ?? 0} (${s.cache_misses ?? 0} misses)`;
  // The per-call levels (block reuse, token reuse): shown when they ran.
  if (s.blocks_reused) {
    f["blocks reused"] = `${s.blocks_reused}/${s.chains_total ?? 0}` + pct(s.blocks_reused, s.chains_total) +
      `, ${s.spans_reused ?? 0} span${s.spans_reused === 1 ? "" : "s"} reused, ${s.spans_run ?? 0} run`;
  }
  if (s.tokens_offered) {
    f["tokens computed"] = `${s.tokens_computed ?? 0}/${s.tokens_offered}` + pct(s.tokens_computed, s.tokens_offered);
  }
  f["cache memory"] = `${(s.cache_memory_peak_mb ?? 0).toFixed(2)} MB` +
    (s.cache_bound_mb != null ? ` of ${s.cache_bound_mb.toFixed(2)} MB bound` : "");
  if (s.notes?.length) f["note"] = s.notes.join("; ");  // e.g. the input resized to the model's size
  if (quality) {
    if (quality.psnr !== undefined) f["PSNR vs full"] = quality.psnr == null ? "exact" : `${quality.psnr.toFixed(2)} dB`;
    if (quality.ssim != null) f["SSIM vs full"] = quality.ssim.toFixed(4);
    if (quality.wall_speedup != null) {
      const saved = quality.reference_seconds - (s.seconds ?? 0);
      f["time saved"] = `${saved.toFixed(2)} s of ${quality.reference_seconds.toFixed(2)} s`;
    }
  }
  return f;
}

// Draws model calls (x) x blocks (y, block 0 on top). `columns` >= rows.length leaves room for the
// calls still to come (drawn as pending). Returns the cell geometry, for hit tests and tests.
export function drawMap(canvas, rows, blocks, columns, legend = DEFAULT_LEGEND) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = Math.max(40, canvas.clientWidth || 300);
  const cssH = Math.max(30, canvas.clientHeight || 120);
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const L = 22, T = 2, B = 12;
  const n = Math.max(columns || 0, (rows || []).length, 1);
  const nb = Math.max(blocks || 0, 1);
  const pw = cssW - L - 2, ph = cssH - T - B;
  ctx.fillStyle = PENDING_COLOUR;
  ctx.fillRect(L, T, pw, ph);
  const cell = (i, b) => ({
    x0: L + Math.round((i * pw) / n), x1: L + Math.round(((i + 1) * pw) / n),
    y0: T + Math.round((b * ph) / nb), y1: T + Math.round(((b + 1) * ph) / nb),
  });
  (rows || []).forEach((r, i) => {
    for (let b = 0; b < nb; b++) {
      const c = cell(i, b);
      const [top, bottom] = halvesOf(r[b], legend);
      const w = Math.max(1, c.x1 - c.x0 - (n < 60 ? 1 : 0));
      const h = Math.max(1, c.y1 - c.y0 - 1);
      const hTop = Math.max(1, Math.floor(h / 2));
      ctx.fillStyle = top;
      ctx.fillRect(c.x0, c.y0, w, hTop);
      ctx.fillStyle = bottom;
      ctx.fillRect(c.x0, c.y0 + hTop, w, h - hTop);
    }
  });
  ctx.fillStyle = "#aaa";
  ctx.font = "9px sans-serif";
  ctx.textBaseline = "middle";
  const every = Math.max(1, Math.ceil(nb / 8));
  for (let b = 0; b < nb; b += every) {
    const c = cell(0, b);
    ctx.fillText(`b${b}`, 2, (c.y0 + c.y1) / 2);
  }
  ctx.textBaseline = "alphabetic";
  ctx.fillText("model call \u2192", L, cssH - 2);
  const k = (rows || []).length;
  const right = `${k}/${n}`;
  ctx.fillText(right, cssW - 4 - ctx.measureText(right).width, cssH - 2);
  return { L, T, pw, ph, columns: n, blocks: nb, cssW, cssH, dpr, cell };
}
