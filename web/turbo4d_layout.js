// Save MultiView and MultiView Preview: while their layout input is connected they split the images
// by it (nodes/layout.py) and their own views widget is not used, so it is drawn disabled (greyed,
// no value) instead of showing a number that means nothing.
import { app } from "../../scripts/app.js";

const TYPES = new Set(["Turbo4DSaveMultiView", "Turbo4DMultiViewPreview"]);

function syncViewsWidget(node) {
  const views = node.widgets?.find((w) => w.name === "views");
  const layout = node.inputs?.find((i) => i.name === "layout");
  if (!views || !layout) return;
  const linked = layout.link != null;
  if (!!views.disabled === linked) return;
  views.disabled = linked;
  node.updateComputedDisabled?.();
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "turbo4d.layout",
  nodeCreated(node) {
    if (!TYPES.has(node?.comfyClass || node?.type)) return;
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      syncViewsWidget(this);
      return r;
    };
    const onConfigure = node.onConfigure;
    node.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      syncViewsWidget(this);
      return r;
    };
    syncViewsWidget(node);
  },
});
