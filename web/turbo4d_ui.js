// Turbo4D in the graph: after (and during) a run, the MultiView Sampler shows the run's figures and
// a model calls x blocks map of what ran, was cached, pruned or bypassed; every Turbo4D accelerator
// node upstream of it shows the figures of its own mechanism; the Report node shows the quality.
//
// Data flow: nodes/events.py sends "turbo4d.step" after every model call and "turbo4d.done" at
// the end of the run (payload = turbo_core/run_report.py run_payload); the sampler's ui output carries
// the same payload ("turbo4d"), which is what /history keeps. The last payload is stored in the
// node's properties, so a saved workflow reopens with its last map.
//
// Speedups: the sampler's own figure is the compute speedup (counted model work). The wall-clock
// speedup needs a full-compute run of the same settings: when a Turbo4D Report measures it
// (reference_stats wired), the report hands it to the sampler whose run it measured (and to that
// sampler's accelerators), and marks the full-compute sampler as the reference.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { countStates, drawMap, figuresOf, halvesOf, legendOf } from "./turbo4d_draw.js";

const SAMPLERS = new Set(["Turbo4DMultiViewSampler", "Turbo4DSV4DSampler"]);
const REPORTS = new Set(["Turbo4DReport"]);
const NOT_ACCELERATORS = new Set(["Turbo4DModelLoader"]);
const PROP = "turbo4d_last_run";
const WIDGET = "turbo4d_figures";

const SAMPLER_FIGURES = ["compute speedup", "wall-clock speedup", "time", "peak memory", "chains bypassed",
  "tokens pruned", "cache hits", "cache memory", "note"];
const REPORT_FIGURES = ["compute speedup", "wall-clock speedup", "time saved", "PSNR vs full", "SSIM vs full"];

function injectStyle() {
  if (document.getElementById("turbo4d-style")) return;
  const st = document.createElement("style");
  st.id = "turbo4d-style";
  st.textContent = `
  .turbo4d-panel { display: flex; flex-direction: column; gap: 3px; font: 11px/1.35 sans-serif;
    color: #ddd; background: #1b1d22; border: 1px solid #3a3f4a; border-radius: 6px; padding: 4px 6px;
    box-sizing: border-box; overflow: hidden; pointer-events: none; }
  .turbo4d-head { color: #9cc3ff; font-weight: 600; }
  .turbo4d-figs { display: grid; grid-template-columns: max-content 1fr; column-gap: 8px; }
  .turbo4d-figs .k { color: #8a93a5; }
  .turbo4d-figs .v { color: #f0f0f0; font-variant-numeric: tabular-nums; white-space: nowrap;
    overflow: hidden; text-overflow: ellipsis; }
  .turbo4d-map { width: 100%; flex: 1 1 auto; min-height: 60px; display: block; }
  .turbo4d-legend { display: flex; flex-wrap: wrap; gap: 2px 8px; color: #bbb; }
  .turbo4d-legend i { display: inline-block; width: 9px; height: 9px; margin-right: 3px; border-radius: 2px; }
  .turbo4d-empty { color: #777; font-style: italic; }`;
  document.head.appendChild(st);
}

// Node of an execution id ("12", or "5:12" inside a subgraph).
function nodeOfExecutionId(id) {
  const parts = String(id).split(":");
  // rootGraph: the frontend deprecates app.graph; older frontends have only app.graph.
  let graph = app.rootGraph ?? app.graph;
  for (let i = 0; i < parts.length - 1; i++) {
    const n = graph?.getNodeById(Number(parts[i])) ?? graph?.getNodeById(parts[i]);
    graph = n?.subgraph;
  }
  const last = parts[parts.length - 1];
  return graph?.getNodeById(Number(last)) ?? graph?.getNodeById(last) ?? null;
}

function typeOf(node) {
  return node?.comfyClass || node?.type || "";
}

// The mechanism figures an accelerator node shows, from its type and title.
function acceleratorFigures(node) {
  const name = `${typeOf(node)} ${node.title || ""}`.toLowerCase();
  const out = [];
  if (name.includes("cache")) out.push("cache hits", "cache memory");
  if (name.includes("prune")) out.push("tokens pruned");
  if (name.includes("bypass")) out.push("chains bypassed");
  if (!out.length) out.push("chains bypassed", "tokens pruned", "cache hits", "cache memory");
  return ["compute speedup", "wall-clock speedup", ...out];
}

// Turbo4D nodes on the MODEL path upstream of a sampler (the accelerator nodes it runs with).
function upstreamAccelerators(sampler) {
  const found = [];
  const seen = new Set();
  let node = sampler;
  for (let hops = 0; node && hops < 32; hops++) {
    const slot = node.inputs?.findIndex((i) => i.type === "MODEL");
    if (slot == null || slot < 0) break;
    const link = node.inputs[slot].link;
    if (link == null) break;
    const info = node.graph?.links?.get ? node.graph.links.get(link) : node.graph?.links?.[link];
    const up = info ? node.graph.getNodeById(info.origin_id) : null;
    if (!up || seen.has(up.id)) break;
    seen.add(up.id);
    if (typeOf(up).startsWith("Turbo4D") && !NOT_ACCELERATORS.has(typeOf(up))) found.push(up);
    node = up;
  }
  return found;
}

function addPanel(node, { map }) {
  injectStyle();
  const el = document.createElement("div");
  el.className = "turbo4d-panel";
  const head = document.createElement("div");
  head.className = "turbo4d-head";
  const figs = document.createElement("div");
  figs.className = "turbo4d-figs";
  el.append(head, figs);
  let canvas = null, legend = null;
  if (map) {
    canvas = document.createElement("canvas");
    canvas.className = "turbo4d-map";
    legend = document.createElement("div");
    legend.className = "turbo4d-legend";
    el.append(canvas, legend);
  }
  const height = map ? 270 : 116;
  const widget = node.addDOMWidget(WIDGET, "turbo4d", el, {
    serialize: false, hideOnZoom: false, getMinHeight: () => height, getMaxHeight: () => (map ? 420 : height),
  });
  widget.serialize = false;
  node.turbo4dPanel = { el, head, figs, canvas, legend, widget };
  head.textContent = "Turbo4D: run the graph to see what was saved";
  head.classList.add("turbo4d-empty");
  if (node.graph) fitNode(node);
  return node.turbo4dPanel;
}

// Grows the node (never shrinks it) so that its widgets, the panel included, fit.
function fitNode(node) {
  const sz = node.computeSize();
  if (sz[0] > node.size[0] || sz[1] > node.size[1]) {
    node.setSize([Math.max(node.size[0], sz[0]), Math.max(node.size[1], sz[1])]);
    node.setDirtyCanvas?.(true, true);
  }
}

function showFigures(node, figures, keys, headText) {
  const p = node.turbo4dPanel;
  if (!p) return;
  p.head.textContent = headText;
  p.head.classList.remove("turbo4d-empty");
  p.figs.replaceChildren();
  const shown = {};
  for (const k of keys) {
    if (!(k in figures)) continue;
    shown[k] = figures[k];
    const a = document.createElement("span");
    a.className = "k";
    a.textContent = k;
    const b = document.createElement("span");
    b.className = "v";
    b.textContent = figures[k];
    b.dataset.figure = k;
    p.figs.append(a, b);
  }
  node.turbo4dFigures = shown;
}

function renderMap(node) {
  const p = node.turbo4dPanel;
  const m = node.turbo4dMap;
  if (!p?.canvas || !m) return;
  const legend = legendOf(m);
  m.geometry = drawMap(p.canvas, m.rows, m.blocks, m.columns, legend);
  const counts = countStates(m.rows, legend);
  m.counts = counts;
  p.legend.replaceChildren();
  for (const l of legend) {
    const s = document.createElement("span");
    const sw = document.createElement("i");
    const [top, bottom] = halvesOf(l.code, legend);
    sw.style.background = `linear-gradient(${top} 50%, ${bottom} 50%)`;
    s.append(sw, `${l.state} ${counts[l.state]}`);
    s.dataset.state = l.state;
    p.legend.append(s);
  }
}

// A finished run's payload (turbo_core/run_report.py run_payload) on a sampler and its accelerators.
// A new run forgets the wall-clock figure of the last one (a Report that measures this run runs
// after it and hands the new one over); a restored workflow keeps the one stored with its run.
function applyPayload(node, payload, { persist = true } = {}) {
  if (!payload?.summary) return;
  node.turbo4dStats = payload;
  node.turbo4dWall = persist ? null : (payload.wall ?? null);
  node.turbo4dMap = {
    rows: [...(payload.rows || [])], blocks: payload.blocks, columns: (payload.rows || []).length,
    legend: payload.legend, done: true,
  };
  renderMap(node);
  showRun(node);
  if (persist) {
    node.properties = node.properties || {};
    node.properties[PROP] = { summary: payload.summary, rows: payload.rows, blocks: payload.blocks,
      legend: payload.legend };
  }
  node.setDirtyCanvas?.(true, true);
}

// The figures of a sampler's last run, on it and on the accelerator nodes upstream of it.
function showRun(node) {
  const payload = node.turbo4dStats;
  if (!payload?.summary) return;
  const figures = figuresOf(payload.summary, null, node.turbo4dWall);
  showFigures(node, figures, SAMPLER_FIGURES, "Turbo4D run");
  for (const acc of upstreamAccelerators(node)) {
    if (!acc.turbo4dPanel) addPanel(acc, { map: false });
    acc.turbo4dStats = payload;
    showFigures(acc, figures, acceleratorFigures(acc), "Turbo4D: this run");
  }
}

function originOf(node, inputName) {
  const inp = node.inputs?.find((i) => i.name === inputName);
  if (inp?.link == null) return null;
  const info = node.graph?.links?.get ? node.graph.links.get(inp.link) : node.graph?.links?.[inp.link];
  return info ? node.graph.getNodeById(info.origin_id) : null;
}

const sameSeconds = (a, b) => a != null && b != null && Math.abs(a - b) < 0.002;

function setWall(node, wall) {
  node.turbo4dWall = wall;
  const stored = node.properties?.[PROP];
  if (stored) stored.wall = wall;
  showRun(node);
  node.setDirtyCanvas?.(true, true);
}

// A Report that measured the wall-clock speedup hands it to the two samplers it compared, if their
// last runs are the ones it measured (same seconds).
function shareWallClock(report, payload) {
  const q = payload?.quality;
  if (q?.wall_speedup == null) return;
  const run = originOf(report, "run_stats");
  if (run?.turbo4dStats && sameSeconds(run.turbo4dStats.summary?.seconds, payload.summary?.seconds)) {
    setWall(run, { speedup: q.wall_speedup, reference_seconds: q.reference_seconds, seconds: payload.summary.seconds });
  }
  const ref = originOf(report, "reference_stats");
  if (ref && ref !== run && ref.turbo4dStats && sameSeconds(ref.turbo4dStats.summary?.seconds, q.reference_seconds)) {
    setWall(ref, { reference: true });
  }
}

function onStep(detail) {
  const node = nodeOfExecutionId(detail.node);
  if (!node || !node.turbo4dPanel?.canvas) return;
  let m = node.turbo4dMap;
  if (!m || m.done || detail.call === 0 || m.prompt !== detail.prompt_id) {
    m = node.turbo4dMap = { rows: [], blocks: detail.blocks, columns: 0, legend: m?.legend,
      done: false, prompt: detail.prompt_id, streams: new Set() };
  }
  m.rows[detail.call] = detail.row;
  for (let i = 0; i < m.rows.length; i++) if (m.rows[i] == null) m.rows[i] = "";
  m.streams.add(detail.stream);
  m.columns = Math.max(m.rows.length, (detail.total_steps || 0) * m.streams.size);
  node.turbo4dLive = detail;
  showFigures(node, figuresOf(detail.summary), SAMPLER_FIGURES,
    `Turbo4D: sampling, model call ${detail.call + 1}` + (m.columns ? `/${m.columns}` : ""));
  renderMap(node);
}

function onDone(detail) {
  const node = nodeOfExecutionId(detail.node);
  if (!node || !node.turbo4dPanel) return;
  applyPayload(node, detail.payload);
}

// Inputs whose tooltip starts with "custom only" (nodes/accelerators.py) are the advanced ones.
const advancedInputs = new Map(); // node type -> [input names]

function collectAdvanced(nodeData) {
  const names = [];
  for (const group of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData?.input?.[group] || {})) {
      const tip = Array.isArray(spec) ? spec[1]?.tooltip : undefined;
      if (typeof tip === "string" && /^custom only\b/i.test(tip.trim())) names.push(name);
    }
  }
  if (names.length) advancedInputs.set(nodeData.name, names);
}

// Presets: when a node has a "preset" combo with a "custom" choice, its advanced widgets only show
// for "custom" (those marked "custom only", else every widget after the preset).
function wirePresetVisibility(node) {
  const preset = node.widgets?.find((w) => w.name === "preset");
  if (!preset || !Array.isArray(preset.options?.values) || !preset.options.values.includes("custom")) return;
  const marked = advancedInputs.get(typeOf(node));
  const advanced = marked
    ? node.widgets.filter((w) => marked.includes(w.name))
    : node.widgets.slice(node.widgets.indexOf(preset) + 1).filter((w) => w.name !== WIDGET);
  if (!advanced.length) return;
  const apply = () => {
    const hide = preset.value !== "custom";
    let changed = false;
    for (const w of advanced) {
      if (!!w.hidden === hide) continue;
      w.hidden = hide;
      // This frontend still lays out hidden widgets; a zero height frees their space.
      if (hide) {
        w.turbo4dComputeSize = Object.prototype.hasOwnProperty.call(w, "computeSize") ? w.computeSize : null;
        w.computeSize = () => [0, -4];
      } else if (w.turbo4dComputeSize) {
        w.computeSize = w.turbo4dComputeSize;
      } else {
        delete w.computeSize;
      }
      changed = true;
    }
    if (changed) {
      const sz = node.computeSize();
      node.setSize([Math.max(node.size[0], sz[0]), sz[1]]);
      node.setDirtyCanvas?.(true, true);
    }
  };
  const cb = preset.callback;
  preset.callback = function () {
    const r = cb?.apply(this, arguments);
    apply();
    return r;
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const r = onConfigure?.apply(this, arguments);
    apply();
    return r;
  };
  node.turbo4dAdvanced = advanced.map((w) => w.name);
  apply();
}

app.registerExtension({
  name: "turbo4d.ui",
  setup() {
    api.addEventListener("turbo4d.step", ({ detail }) => onStep(detail));
    api.addEventListener("turbo4d.done", ({ detail }) => onDone(detail));
    window.turbo4d = Object.assign(window.turbo4d || {}, { nodeOfExecutionId, upstreamAccelerators });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (String(nodeData?.name || "").startsWith("Turbo4D")) collectAdvanced(nodeData);
  },
  nodeCreated(node) {
    const type = typeOf(node);
    if (!type.startsWith("Turbo4D")) return;
    wirePresetVisibility(node);
    if (SAMPLERS.has(type)) {
      addPanel(node, { map: true });
      const onExecuted = node.onExecuted;
      node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const payload = output?.turbo4d?.[0];
        if (payload) applyPayload(this, payload);
      };
      const onConfigure = node.onConfigure;
      node.onConfigure = function () {
        const r = onConfigure?.apply(this, arguments);
        fitNode(this);
        const last = this.properties?.[PROP];
        if (last?.summary) {
          // Draw once the node is on a graph, so the accelerators upstream are linked by then.
          setTimeout(() => applyPayload(this, last, { persist: false }), 0);
        }
        return r;
      };
      // The map is a <canvas>: redraw when the node is resized.
      const onResize = node.onResize;
      node.onResize = function () {
        const r = onResize?.apply(this, arguments);
        requestAnimationFrame(() => renderMap(this));
        return r;
      };
    } else if (REPORTS.has(type)) {
      const onExecuted = node.onExecuted;
      node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const payload = output?.turbo4d?.[0];
        if (!payload) return;
        if (!this.turbo4dPanel) addPanel(this, { map: false });
        this.turbo4dStats = payload;
        showFigures(this, figuresOf(payload.summary, payload.quality), REPORT_FIGURES, "Turbo4D report");
        shareWallClock(this, payload);
      };
    }
  },
});
