// MultiView Preview: a viewer of the V x F result inside the node (nodes/preview.py writes one PNG
// per view and frame to ComfyUI's temp folder and lists them in its ui output "turbo4d_preview").
// Slider = frame, buttons = views, Play = the frames of this view, Orbit = the camera goes around
// while time runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TYPE = "Turbo4DMultiViewPreview";
const WIDGET = "turbo4d_viewer";

function injectStyle() {
  if (document.getElementById("turbo4d-preview-style")) return;
  const st = document.createElement("style");
  st.id = "turbo4d-preview-style";
  st.textContent = `
  .turbo4d-viewer { display: flex; flex-direction: column; gap: 4px; font: 11px sans-serif; color: #ddd;
    box-sizing: border-box; height: 100%; }
  .turbo4d-viewer .stage { flex: 1 1 auto; min-height: 80px; display: flex; align-items: center;
    justify-content: center; background: #111; border-radius: 4px; overflow: hidden; }
  .turbo4d-viewer img { max-width: 100%; max-height: 100%; width: 100%; height: 100%; object-fit: contain;
    image-rendering: pixelated; }
  .turbo4d-viewer .row { display: flex; gap: 4px; align-items: center; flex-wrap: wrap; }
  .turbo4d-viewer button { font: 11px sans-serif; padding: 2px 6px; background: #2b2f38; color: #ddd;
    border: 1px solid #444; border-radius: 4px; cursor: pointer; }
  .turbo4d-viewer button.on { background: #3d6bd6; border-color: #5d8bf6; color: #fff; }
  .turbo4d-viewer input[type=range] { flex: 1 1 auto; min-width: 60px; }
  .turbo4d-viewer .label { min-width: 92px; text-align: right; font-variant-numeric: tabular-nums; }
  .turbo4d-viewer .empty { color: #777; font-style: italic; }`;
  document.head.appendChild(st);
}

function viewUrl(it) {
  const q = new URLSearchParams({ filename: it.filename, subfolder: it.subfolder || "", type: it.type || "temp" });
  return api.apiURL(`/view?${q.toString()}`);
}

function buildViewer(node) {
  injectStyle();
  const el = document.createElement("div");
  el.className = "turbo4d-viewer";
  const stage = document.createElement("div");
  stage.className = "stage";
  const img = document.createElement("img");
  img.alt = "MultiView Preview";
  const empty = document.createElement("div");
  empty.className = "empty";
  empty.textContent = "run the graph to preview the views";
  stage.append(empty);
  const controls = document.createElement("div");
  controls.className = "row";
  const play = document.createElement("button");
  play.textContent = "\u25B6 Play";
  play.title = "Play the frames of this view";
  const orbit = document.createElement("button");
  orbit.textContent = "\u27F3 Orbit";
  orbit.title = "Move the camera around the views while the frames run";
  const slider = document.createElement("input");
  slider.type = "range";
  slider.min = "0";
  slider.max = "0";
  slider.value = "0";
  slider.title = "Frame";
  const label = document.createElement("span");
  label.className = "label";
  controls.append(play, orbit, slider, label);
  const views = document.createElement("div");
  views.className = "row";
  el.append(stage, controls, views);

  const state = { data: null, view: 0, frame: 0, timer: null, mode: null, images: [] };
  const viewer = {
    el, img, slider, play, orbit, views, label, state,
    get view() { return state.view; },
    get frame() { return state.frame; },
    show(view, frame) {
      const d = state.data;
      if (!d) return;
      state.view = ((view % d.views) + d.views) % d.views;
      state.frame = ((frame % d.frames) + d.frames) % d.frames;
      img.src = viewUrl(d.cells[state.view][state.frame]);
      img.dataset.view = String(state.view);
      img.dataset.frame = String(state.frame);
      slider.value = String(state.frame);
      label.textContent = `view ${state.view + 1}/${d.views} \u00B7 frame ${state.frame + 1}/${d.frames}`;
      for (const b of views.children) b.classList.toggle("on", Number(b.dataset.view) === state.view);
    },
    stop() {
      if (state.timer) clearInterval(state.timer);
      state.timer = null;
      state.mode = null;
      play.classList.remove("on");
      orbit.classList.remove("on");
    },
    start(mode) {
      const was = state.mode;
      viewer.stop();
      if (was === mode || !state.data) return;
      state.mode = mode;
      (mode === "orbit" ? orbit : play).classList.add("on");
      const ms = 1000 / Math.max(0.5, state.data.fps || 8);
      state.timer = setInterval(() => {
        if (!el.isConnected) return viewer.stop();
        viewer.show(mode === "orbit" ? state.view + 1 : state.view, state.frame + 1);
      }, ms);
    },
    load(data) {
      viewer.stop();
      state.data = data;
      slider.max = String(Math.max(0, data.frames - 1));
      views.replaceChildren();
      for (let v = 0; v < data.views; v++) {
        const b = document.createElement("button");
        b.textContent = v === 0 ? "V1 (ref)" : `V${v + 1}`;
        b.dataset.view = String(v);
        b.title = v === 0 ? "View 1: the reference camera" : `View ${v + 1}`;
        b.addEventListener("click", () => { viewer.stop(); viewer.show(v, state.frame); });
        views.append(b);
      }
      // Warm the browser cache so scrubbing and playing do not flicker.
      state.images = data.cells.flat().map((it) => { const im = new Image(); im.src = viewUrl(it); return im; });
      stage.replaceChildren(img);
      viewer.show(Math.min(state.view, data.views - 1), Math.min(state.frame, data.frames - 1));
    },
  };
  slider.addEventListener("input", () => { viewer.stop(); viewer.show(state.view, Number(slider.value)); });
  play.addEventListener("click", () => viewer.start("play"));
  orbit.addEventListener("click", () => viewer.start("orbit"));
  // Keep canvas gestures (zoom, drag) from starting inside the controls.
  for (const ev of ["pointerdown", "wheel"]) controls.addEventListener(ev, (e) => e.stopPropagation());

  const widget = node.addDOMWidget(WIDGET, "turbo4d_viewer", el, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 260,
  });
  widget.serialize = false;
  node.turbo4dViewer = viewer;
  return viewer;
}

app.registerExtension({
  name: "turbo4d.preview",
  nodeCreated(node) {
    if ((node.comfyClass || node.type) !== TYPE) return;
    const viewer = buildViewer(node);
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const data = output?.turbo4d_preview?.[0];
      if (data) viewer.load(data);
    };
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      viewer.stop();
      return onRemoved?.apply(this, arguments);
    };
  },
});
