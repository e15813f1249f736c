"""The shipped workflows, described once in Python and written in both of ComfyUI's formats:

    workflows/<name>.json      UI format (what a user drags onto the canvas; version 0.4)
    workflows/api/<name>.json  API format (what POST /prompt runs headless)

    .host/venv/bin/python scripts/sync_workflows.py          # rewrite both
    .host/venv/bin/python scripts/sync_workflows.py --check  # exit 1 if a committed file differs

`NODE_DEFS` mirrors the socket and widget order of each node type used here; the host tests check it
against the running server's /object_info, so a schema change that the workflows miss fails a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(ROOT, "workflows")
API_DIR = os.path.join(ROOT, "workflows", "api")

# type -> (display title, socket inputs [(name, type)], widget names in order, outputs [(name, type)])
# A widget name ending in "+control" is followed in the UI format by its control_after_generate
# value; one ending in "+upload" by the upload button's value.
NODE_DEFS = {
    "Turbo4DModelLoader": ("Turbo4D Model Loader", [], ["model_name", "weight_dtype", "variant"], [("model", "MODEL")]),
    "Turbo4DLoadInput": ("Load 4D Input", [("images", "IMAGE")],
                         ["video+upload", "size", "frame_count", "frame_stride", "start_frame"],
                         [("input", "TURBO4D_INPUT"), ("frames", "IMAGE")]),
    "Turbo4DSyntheticScene": ("Synthetic 4D Scene", [],
                              ["seed", "views", "frames", "size", "elevation", "azimuth_start", "azimuth_span"],
                              [("input", "TURBO4D_INPUT"), ("ground_truth", "IMAGE"), ("scene", "TURBO4D_SCENE"),
                               ("layout", "TURBO4D_LAYOUT")]),
    "Turbo4DMultiViewSampler": ("MultiView Sampler", [("model", "MODEL"), ("input", "TURBO4D_INPUT")],
                                ["views", "frames", "elevation", "azimuth_span", "seed+control",
                                 "steps", "cfg", "sampler_name", "scheduler"],
                                [("images", "IMAGE"), ("latent", "LATENT"), ("stats", "STRING"),
                                 ("run_stats", "TURBO4D_STATS"), ("layout", "TURBO4D_LAYOUT")]),
    "Turbo4DMultiViewConditioning": ("MultiView Conditioning", [("model", "MODEL"), ("input", "TURBO4D_INPUT")],
                                     ["views", "frames", "elevation", "azimuth_span"],
                                     [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                      ("latent", "LATENT")]),
    "Turbo4DLatentToImage": ("MultiView Latent to Image", [("latent", "LATENT")], [],
                             [("images", "IMAGE"), ("layout", "TURBO4D_LAYOUT")]),
    "Turbo4DSaveMultiView": ("Save MultiView", [("images", "IMAGE"), ("layout", "TURBO4D_LAYOUT")],
                             ["views", "fps", "filename_prefix", "scale"], []),
    "Turbo4DCache": ("Turbo4D Cache", [("model", "MODEL")],
                     ["preset", "threshold", "max_age", "start_percent", "end_percent", "storage", "method"],
                     [("MODEL", "MODEL"), ("settings", "STRING")]),
    "Turbo4DSemanticPrune": ("Semantic Prune", [("model", "MODEL")],
                             ["preset", "keep_start", "keep_end", "saliency", "max_age", "start_percent",
                              "end_percent", "storage", "method", "threshold", "keep_min"],
                             [("MODEL", "MODEL"), ("settings", "STRING")]),
    "Turbo4DChainBypass": ("Chain Bypass", [("model", "MODEL")],
                           ["preset", "threshold", "max_consecutive", "step_threshold", "step_max_skips", "kappa_prior",
                            "start_percent", "end_percent", "storage", "calibration_file"],
                           [("MODEL", "MODEL"), ("settings", "STRING")]),
    "Turbo4DReport": ("Turbo4D Report", [("run_stats", "TURBO4D_STATS"), ("images", "IMAGE"),
                                         ("reference", "IMAGE"), ("reference_stats", "TURBO4D_STATS")],
                      [], [("report", "IMAGE"), ("summary", "STRING")]),
    "Turbo4DMultiViewPreview": ("MultiView Preview", [("images", "IMAGE"), ("layout", "TURBO4D_LAYOUT")],
                                ["views", "fps"], []),
    "PreviewImage": ("Preview Image", [("images", "IMAGE")], [], []),
    "KSampler": ("KSampler", [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                              ("latent_image", "LATENT")],
                 ["seed+control", "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
}

# SV4D / SV4D 2.0 (the sampler node, and ComfyUI's stock loaders and SV3D nodes the workflows use)
NODE_DEFS.update({
    "Turbo4DSV4DSampler": ("MultiView Sampler (SV4D)",
                           [("model", "MODEL"), ("clip_vision", "CLIP_VISION"), ("vae", "VAE"), ("video", "IMAGE"),
                            ("first_frame_views", "IMAGE")],
                           ["frames", "size", "elevation", "seed+control", "steps", "cfg", "min_cfg", "sampler_name",
                            "scheduler", "elevation_cfg", "input_prep"],
                           [("images", "IMAGE"), ("latent", "LATENT"), ("stats", "STRING"),
                            ("run_stats", "TURBO4D_STATS"), ("layout", "TURBO4D_LAYOUT")]),
    "CLIPVisionLoader": ("Load CLIP Vision", [], ["clip_name"], [("CLIP_VISION", "CLIP_VISION")]),
    "VAELoader": ("Load VAE", [], ["vae_name"], [("VAE", "VAE")]),
    "ImageOnlyCheckpointLoader": ("Image Only Checkpoint Loader (img2vid model)", [], ["ckpt_name"],
                                  [("MODEL", "MODEL"), ("CLIP_VISION", "CLIP_VISION"), ("VAE", "VAE")]),
    "ImageFromBatch": ("ImageFromBatch", [("image", "IMAGE")], ["batch_index", "length"], [("IMAGE", "IMAGE")]),
    "VideoTriangleCFGGuidance": ("VideoTriangleCFGGuidance", [("model", "MODEL")], ["min_cfg"], [("MODEL", "MODEL")]),
    "SVD_img2vid_Conditioning": ("SVD_img2vid_Conditioning",
                                 [("clip_vision", "CLIP_VISION"), ("init_image", "IMAGE"), ("vae", "VAE")],
                                 ["width", "height", "video_frames", "motion_bucket_id", "fps", "augmentation_level"],
                                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]),
    "VAEDecode": ("VAE Decode", [("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
})


# Widgets a workflow may leave out (optional inputs), with the value it then gets: the node's default.
WIDGET_DEFAULTS = {
    ("Turbo4DModelLoader", "variant"): "auto",
    ("Turbo4DSV4DSampler", "elevation_cfg"): "auto",
    ("Turbo4DSV4DSampler", "input_prep"): "reference",
    ("Turbo4DCache", "method"): "block reuse",
    ("Turbo4DSemanticPrune", "method"): "token reuse",
    ("Turbo4DSemanticPrune", "threshold"): 0.25,
    ("Turbo4DSemanticPrune", "keep_min"): 0.25,
}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    widgets: dict
    links: dict = field(default_factory=dict)  # input name -> (node, output slot)
    size: tuple = (320, 200)

    def out(self, slot: int):
        return (self, slot)


class Graph:
    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, type_: str, pos, box=(320, 200), **kw) -> Node:
        title, sockets, widgets, _ = NODE_DEFS[type_]
        names = [w.split("+")[0] for w in widgets]
        links = {k: v for k, v in kw.items() if k in dict(sockets)}
        values = {k: v for k, v in kw.items() if k not in links}
        values.update({n: WIDGET_DEFAULTS[(type_, n)] for n in names if n not in values and (type_, n) in WIDGET_DEFAULTS})
        unknown = set(values) - set(names)
        missing = set(names) - set(values)
        if unknown or missing:
            raise ValueError(f"{type_}: unknown widgets {sorted(unknown)}, missing {sorted(missing)}")
        n = Node(len(self.nodes) + 1, type_, tuple(pos), values, links, tuple(box))
        self.nodes.append(n)
        return n

    # --- API format ---------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            title, sockets, widgets, _ = NODE_DEFS[n.type]
            inputs = {}
            for w in widgets:
                name = w.split("+")[0]
                inputs[name] = n.widgets[name]
            for name, _t in sockets:
                if name in n.links:
                    src, slot = n.links[name]
                    inputs[name] = [str(src.id), slot]
            out[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": title}}
        return out

    # --- UI format ----------------------------------------------------------------------------
    def ui(self) -> dict:
        links, link_id = [], 0
        out_links: dict = {}
        in_links: dict = {}
        for n in self.nodes:  # inputs in socket order so link ids are stable
            for slot, (name, typ) in enumerate(NODE_DEFS[n.type][1]):
                if name in n.links:
                    src, src_slot = n.links[name]
                    link_id += 1
                    links.append([link_id, src.id, src_slot, n.id, slot, typ])
                    out_links.setdefault((src.id, src_slot), []).append(link_id)
                    in_links[(n.id, name)] = link_id
        order = {n.id: i for i, n in enumerate(self._topological())}
        nodes = []
        for n in self.nodes:
            title, sockets, widgets, outputs = NODE_DEFS[n.type]
            values, tail = [], []
            for w in widgets:
                name, _, extra = w.partition("+")
                values.append(n.widgets[name])
                if extra == "control":
                    values.append("fixed")
                elif extra == "upload":
                    tail.append("image")  # the frontend adds the upload button after all the widgets
            values += tail
            nodes.append({
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                "order": order[n.id], "mode": 0,
                "inputs": [{"name": name, "type": typ, "link": in_links.get((n.id, name))} for name, typ in sockets],
                "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, i), []) or None,
                             **({"slot_index": i} if (n.id, i) in out_links else {})}
                            for i, (name, typ) in enumerate(outputs)],
                "title": title,
                "properties": {"Node name for S&R": n.type},
                "widgets_values": values,
            })
        return {"last_node_id": len(self.nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}

    def _topological(self) -> list[Node]:
        done, out = set(), []

        def visit(n):
            if n.id in done:
                return
            for src, _ in n.links.values():
                visit(src)
            done.add(n.id)
            out.append(n)

        for n in self.nodes:
            visit(n)
        return out


# --- layout ---------------------------------------------------------------------------------
# Each node's box (width, height) as the frontend draws it once loaded and after a run: it grows a
# node to fit its widgets and never shrinks one, so a box in the file smaller than that grows over
# its neighbour. Load 4D Input's video preview takes it to about 510 px; a sampler's figures and
# map (web/turbo4d_ui.js) to about 630, and the live preview of a run (ComfyUI's image preview
# widget, at least 220 px) another 240 on it and on KSampler; a Report's figures about 410.
BOXES = {
    "Turbo4DModelLoader": (320, 110), "Turbo4DLoadInput": (320, 530), "Turbo4DSyntheticScene": (320, 270),
    "Turbo4DMultiViewSampler": (340, 880), "Turbo4DMultiViewConditioning": (320, 260),
    "Turbo4DLatentToImage": (280, 80), "Turbo4DSaveMultiView": (420, 480), "Turbo4DMultiViewPreview": (420, 420),
    "Turbo4DChainBypass": (320, 300), "Turbo4DCache": (320, 256), "Turbo4DSemanticPrune": (320, 344),
    "Turbo4DReport": (360, 440), "PreviewImage": (520, 520), "KSampler": (320, 520),
    "Turbo4DSV4DSampler": (360, 880), "CLIPVisionLoader": (320, 90), "VAELoader": (320, 90),
    "ImageOnlyCheckpointLoader": (360, 120), "ImageFromBatch": (300, 100), "VideoTriangleCFGGuidance": (300, 80),
    "SVD_img2vid_Conditioning": (300, 260), "VAEDecode": (300, 60),
}
TITLE = 30  # LiteGraph's title bar, drawn above a node's pos
GAP = 40    # free space between two boxes, title bars included


class Column:
    """Nodes stacked top to bottom at one x, each box below the last one with GAP between."""

    def __init__(self, g: Graph, x: int, y: int = 60, width: int = 0):
        self.g, self.x, self.y, self.width = g, x, y, width

    def add(self, type_: str, **kw) -> Node:
        box = BOXES[type_]
        n = self.g.add(type_, (self.x, self.y), box, **kw)
        self.y += box[1] + TITLE + GAP
        self.width = max(self.width, box[0])
        return n

    def right(self, width: int = 0) -> "Column":
        """The next column, GAP to the right of this one's widest box so far; `width`: the least
        width it will take (where its nodes are added after the column to its right is made)."""
        return Column(self.g, self.x + self.width + GAP, width=width)


def overlaps(g: Graph) -> list[tuple[int, int]]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    box = {n.id: (n.pos[0], n.pos[1] - TITLE, n.pos[0] + n.size[0], n.pos[1] + n.size[1]) for n in g.nodes}
    ids = sorted(box)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if box[a][0] < box[b][2] and box[b][0] < box[a][2] and box[a][1] < box[b][3] and box[b][1] < box[a][3]]


# --- the workflows ----------------------------------------------------------------------------
# Sized for a 2-core CPU: a 4 x 8 grid at 32 px, 12 steps, no CFG (cfg 1 halves the work). The
# stock-KSampler example uses cfg 2 so that the guided path is exercised as well.
# Scenes the embedded model never saw in training (training draws seeds 0..999,999).
HELD_OUT_SEED = 1_000_003
SAMPLING = dict(views=4, frames=8, elevation=20.0, azimuth_span=360.0, seed=0, steps=12, cfg=1.0,
                sampler_name="euler", scheduler="karras")
# Save MultiView / MultiView Preview take the grid from the layout socket; views is only their
# fallback for images without one.
SAVE = dict(views=SAMPLING["views"], fps=8.0)


def _loader(col: Column, name: str = "embedded default") -> Node:
    return col.add("Turbo4DModelLoader", model_name=name, weight_dtype="auto")


def _scene(col: Column) -> Node:
    return col.add("Turbo4DSyntheticScene", seed=HELD_OUT_SEED, views=SAMPLING["views"], frames=SAMPLING["frames"],
                   size=32, elevation=SAMPLING["elevation"], azimuth_start=0.0, azimuth_span=SAMPLING["azimuth_span"])


def turbo4d_from_video() -> Graph:
    g = Graph()
    left = Column(g, 40)
    model = _loader(left)
    inp = left.add("Turbo4DLoadInput", video="turbo4d_example.mp4", size=32, frame_count=8, frame_stride=1,
                   start_frame=0)
    mid = left.right()
    smp = mid.add("Turbo4DMultiViewSampler", model=model.out(0), input=inp.out(0), **SAMPLING)
    mid.right().add("Turbo4DSaveMultiView", images=smp.out(0), layout=smp.out(4), **SAVE,
                    filename_prefix="turbo4d/from_video", scale=4)
    return g


def turbo4d_synthetic_compare() -> Graph:
    g = Graph()
    left = Column(g, 40)
    model = _loader(left)
    scene = _scene(left)
    mid = left.right()
    smp = mid.add("Turbo4DMultiViewSampler", model=model.out(0), input=scene.out(0), **SAMPLING)
    right = mid.right()
    right.add("Turbo4DSaveMultiView", images=smp.out(0), layout=smp.out(4), **SAVE,
              filename_prefix="turbo4d/compare_result", scale=4)
    right.add("Turbo4DSaveMultiView", images=scene.out(1), layout=scene.out(3), **SAVE,
              filename_prefix="turbo4d/compare_ground_truth", scale=4)
    return g


def turbo4d_stock_ksampler() -> Graph:
    """The same model driven by ComfyUI's own KSampler through MultiView Conditioning."""
    g = Graph()
    left = Column(g, 40)
    model = _loader(left)
    scene = left.add("Turbo4DSyntheticScene", seed=HELD_OUT_SEED, views=4, frames=8, size=32, elevation=20.0,
                     azimuth_start=0.0, azimuth_span=360.0)
    col2 = left.right()
    cond = col2.add("Turbo4DMultiViewConditioning", model=model.out(0), input=scene.out(0), views=4, frames=8,
                    elevation=20.0, azimuth_span=360.0)
    col3 = col2.right()
    ks = col3.add("KSampler", model=model.out(0), positive=cond.out(0), negative=cond.out(1), latent_image=cond.out(2),
                  seed=0, steps=8, cfg=2.0, sampler_name="euler", scheduler="karras", denoise=1.0)
    col4 = col3.right()
    dec = col4.add("Turbo4DLatentToImage", latent=ks.out(0))
    col4.add("Turbo4DSaveMultiView", images=dec.out(0), layout=dec.out(1), views=4, fps=8.0,
             filename_prefix="turbo4d/stock_ksampler", scale=4)
    return g


def _accelerators(col: Column, model, preset: str):
    """Chain Bypass -> Turbo4D Cache -> Semantic Prune between the loader and the sampler, at the
    nodes' default methods (block reuse and token reuse), which act on the embedded model's blocks
    and on the SV4D UNets' declared spans alike."""
    byp = col.add("Turbo4DChainBypass", model=model.out(0), preset=preset, threshold=0.08, max_consecutive=2,
                  step_threshold=0.0, step_max_skips=3, kappa_prior=0.0, start_percent=0.2, end_percent=0.95,
                  storage="native", calibration_file="")
    cache = col.add("Turbo4DCache", model=byp.out(0), preset=preset, threshold=0.15, max_age=3, start_percent=0.15,
                    end_percent=0.95, storage="native")
    return col.add("Turbo4DSemanticPrune", model=cache.out(0), preset=preset, keep_start=0.5, keep_end=0.3,
                   saliency=0.5, max_age=6, start_percent=0.1, end_percent=0.95, storage="native")


def turbo4d_accelerated() -> Graph:
    """The main workflow: the example video through all three accelerators."""
    g = Graph()
    left = Column(g, 40)
    model = _loader(left)
    inp = left.add("Turbo4DLoadInput", video="turbo4d_example.mp4", size=32, frame_count=8, frame_stride=1,
                   start_frame=0)
    accs = left.right()
    fast = _accelerators(accs, model, "balanced")
    mid = accs.right()
    smp = mid.add("Turbo4DMultiViewSampler", model=fast.out(0), input=inp.out(0), **SAMPLING)
    right = mid.right()
    right.add("Turbo4DSaveMultiView", images=smp.out(0), layout=smp.out(4), **SAVE,
              filename_prefix="turbo4d/accelerated", scale=4)
    right.add("Turbo4DMultiViewPreview", images=smp.out(0), layout=smp.out(4), **SAVE)
    return g


def turbo4d_accel_compare() -> Graph:
    """Accelerated against full compute, same seed, on a synthetic scene with ground truth."""
    g = Graph()
    left = Column(g, 40)
    model = _loader(left)
    scene = _scene(left)
    accs = left.right()
    fast = _accelerators(accs, model, "fast")
    samplers = accs.right()
    full = samplers.add("Turbo4DMultiViewSampler", model=model.out(0), input=scene.out(0), **SAMPLING)
    acc = samplers.add("Turbo4DMultiViewSampler", model=fast.out(0), input=scene.out(0), **SAMPLING)
    col4 = samplers.right(width=BOXES["Turbo4DSaveMultiView"][0])
    rep = col4.add("Turbo4DReport", run_stats=acc.out(3), images=acc.out(0), reference=full.out(0),
                   reference_stats=full.out(3))
    col5 = col4.right()
    col5.add("PreviewImage", images=rep.out(0))
    col4.add("Turbo4DSaveMultiView", images=acc.out(0), layout=acc.out(4), **SAVE,
             filename_prefix="turbo4d/accel_result", scale=4)
    col4.add("Turbo4DSaveMultiView", images=full.out(0), layout=full.out(4), **SAVE,
             filename_prefix="turbo4d/full_result", scale=4)
    col5.add("Turbo4DSaveMultiView", images=scene.out(1), layout=scene.out(3), **SAVE,
             filename_prefix="turbo4d/accel_ground_truth", scale=4)
    return g


WORKFLOWS = {f.__name__: f for f in (turbo4d_from_video, turbo4d_synthetic_compare, turbo4d_stock_ksampler,
                                     turbo4d_accelerated, turbo4d_accel_compare)}


# --- SV4D / SV4D 2.0 (docs/sv4d.md: where the weights go) ---------------------------------------
# The reference scripts' settings at full size (576 px, 21 frames); they need the official weights.
SV4D_SIZE, SV4D_FRAMES = 576, 21


def _sv4d_input(col: Column) -> Node:
    return col.add("Turbo4DLoadInput", video="turbo4d_example.mp4", size=SV4D_SIZE, frame_count=SV4D_FRAMES,
                   frame_stride=1, start_frame=0)


def sv4d2_video_to_4d() -> Graph:
    """SV4D 2.0: 4 novel views x 21 frames in 12-frame chunks, through all three accelerators."""
    g = Graph()
    left = Column(g, 40)
    model = _loader(left, "sv4d2.safetensors")
    clip = left.add("CLIPVisionLoader", clip_name="clip_vision_h.safetensors")
    vae = left.add("VAELoader", vae_name="vae-ft-mse-840000-ema-pruned.safetensors")
    inp = _sv4d_input(left)
    accs = left.right()
    fast = _accelerators(accs, model, "balanced")
    mid = accs.right()
    smp = mid.add("Turbo4DSV4DSampler", model=fast.out(0), clip_vision=clip.out(0), vae=vae.out(0), video=inp.out(1),
                  frames=SV4D_FRAMES, size=SV4D_SIZE, elevation=0.0, seed=23, steps=50, cfg=2.0, min_cfg=1.0,
                  sampler_name="euler", scheduler="karras")
    mid.right().add("Turbo4DSaveMultiView", images=smp.out(0), layout=smp.out(4), views=5, fps=10.0,
                    filename_prefix="turbo4d/sv4d2", scale=1)
    return g


def sv4d_video_to_4d() -> Graph:
    """SV4D: SV3D_u makes the first frame's 21 views (ComfyUI's stock nodes, the reference's settings:
    20 steps, triangle CFG 1..2.5), then anchor frames and dense windows give 8 novel views x 21
    frames, through all three accelerators. SV3D_u ignores cameras, so SVD_img2vid_Conditioning
    conditions it exactly as SV3D_Conditioning does."""
    g = Graph()
    left = Column(g, 40)
    model = _loader(left, "sv4d.safetensors")
    sv3d = left.add("ImageOnlyCheckpointLoader", ckpt_name="sv3d_u.safetensors")
    inp = _sv4d_input(left)
    col2 = left.right()
    first = col2.add("ImageFromBatch", image=inp.out(1), batch_index=0, length=1)
    guid = col2.add("VideoTriangleCFGGuidance", model=sv3d.out(0), min_cfg=1.0)
    cond = col2.add("SVD_img2vid_Conditioning", clip_vision=sv3d.out(1), init_image=first.out(0), vae=sv3d.out(2),
                    width=SV4D_SIZE, height=SV4D_SIZE, video_frames=21, motion_bucket_id=127, fps=6,
                    augmentation_level=0.0)
    ks = col2.add("KSampler", model=guid.out(0), positive=cond.out(0), negative=cond.out(1), latent_image=cond.out(2),
                  seed=23, steps=20, cfg=2.5, sampler_name="euler", scheduler="karras", denoise=1.0)
    views = col2.add("VAEDecode", samples=ks.out(0), vae=sv3d.out(2))
    accs = col2.right()
    fast = _accelerators(accs, model, "balanced")
    mid = accs.right()
    smp = mid.add("Turbo4DSV4DSampler", model=fast.out(0), clip_vision=sv3d.out(1), vae=sv3d.out(2), video=inp.out(1),
                  first_frame_views=views.out(0), frames=SV4D_FRAMES, size=SV4D_SIZE, elevation=10.0, seed=23,
                  steps=20, cfg=2.0, min_cfg=1.0, sampler_name="euler", scheduler="karras")
    mid.right().add("Turbo4DSaveMultiView", images=smp.out(0), layout=smp.out(4), views=9, fps=10.0,
                    filename_prefix="turbo4d/sv4d", scale=1)
    return g


WORKFLOWS.update({f.__name__: f for f in (sv4d2_video_to_4d, sv4d_video_to_4d)})


# --- TrajectoryCrafter (README, "TrajectoryCrafter": where the weights go) ------------------------
NODE_DEFS.update({
    "Turbo4DTrajectoryCrafterLoader": ("TrajectoryCrafter Loader", [], ["model_name", "weight_dtype"],
                                       [("model", "MODEL")]),
    "Turbo4DTrajectoryCrafterVAELoader": ("TrajectoryCrafter VAE Loader", [], ["vae_name", "dtype"],
                                          [("vae", "COGVIDEOX_VAE")]),
    "Turbo4DTrajectoryCrafterTextEncode": ("TrajectoryCrafter Text Encode", [("clip", "CLIP")], ["text"],
                                           [("conditioning", "CONDITIONING")]),
    "Turbo4DTrajectoryCrafterRender": ("TrajectoryCrafter Render", [("video", "IMAGE"), ("depth", "IMAGE")],
                                       ["frames", "camera", "theta", "phi", "r", "x", "y", "radius_scale", "focal",
                                        "depth_is_disparity", "clean_holes"],
                                       [("render", "IMAGE"), ("mask", "MASK"), ("stats", "STRING")]),
    "Turbo4DTrajectoryCrafterConditioning": ("TrajectoryCrafter Conditioning",
                                             [("model", "MODEL"), ("vae", "COGVIDEOX_VAE"),
                                              ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                              ("video", "IMAGE"), ("render", "IMAGE"), ("mask", "MASK")],
                                             ["frames", "width", "height", "reference", "seed+control", "noise_aug_strength"],
                                             [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                              ("latent", "LATENT"), ("stats", "STRING")]),
    "Turbo4DTrajectoryCrafterSampler": ("TrajectoryCrafter Sampler",
                                        [("model", "MODEL"), ("positive", "CONDITIONING"),
                                         ("negative", "CONDITIONING"), ("latent", "LATENT")],
                                        ["seed+control", "steps", "cfg", "sampler_name", "scheduler"],
                                        [("latent", "LATENT"), ("stats", "STRING"), ("run_stats", "TURBO4D_STATS")]),
    "Turbo4DTrajectoryCrafterDecode": ("TrajectoryCrafter Decode", [("vae", "COGVIDEOX_VAE"), ("latent", "LATENT")],
                                       [], [("images", "IMAGE")]),
    "CLIPLoader": ("Load CLIP", [], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "LoadVideo": ("Load Video", [], ["file+upload"], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ("Get Video Components", [("video", "VIDEO")], [],
                           [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": ("Create Video", [("images", "IMAGE"), ("audio", "AUDIO")], ["fps"], [("VIDEO", "VIDEO")]),
    "SaveVideo": ("Save Video", [("video", "VIDEO")], ["filename_prefix", "format", "codec"], []),
})

# inference.py's prompts: BLIP-2's caption of the middle frame + this, and the fixed negative.
TC_REFINE = (". The video is of high quality, and the view is very clear. High quality, masterpiece, best quality, "
             "highres, ultra-detailed, fantastic.")
TC_NEGATIVE = ("The video is not of a high quality, it has a low resolution. Watermark present in each frame. The "
               "background is solid. Strange body and strange trajectory. Distortion.")


def trajectorycrafter_redirect() -> Graph:
    """TrajectoryCrafter at the reference's settings (49 frames at 672 x 384, 50 DDIM steps, cfg 6):
    a source video and its depth video (any depth estimator's; or swap that Load Video for a depth
    node) -> the point-cloud render of a camera path -> conditioning -> Chain Bypass -> sampler ->
    decode -> an mp4. Needs the TrajectoryCrafter, CogVideoX VAE and T5 XXL weights."""
    g = Graph()
    model = g.add("Turbo4DTrajectoryCrafterLoader", (40, 60), (340, 110),
                  model_name="TrajectoryCrafter/diffusion_pytorch_model.safetensors", weight_dtype="auto")
    vae = g.add("Turbo4DTrajectoryCrafterVAELoader", (40, 210), (340, 110),
                vae_name="cogvideox_fun_vae/diffusion_pytorch_model.safetensors", dtype="auto")
    clip = g.add("CLIPLoader", (40, 360), (340, 110), clip_name="t5xxl_fp16.safetensors", type="sd3",
                 device="default")
    src = g.add("LoadVideo", (40, 510), (340, 300), file="trajectorycrafter_source.mp4")
    src_frames = g.add("GetVideoComponents", (40, 850), (340, 90), video=src.out(0))
    dep = g.add("LoadVideo", (40, 980), (340, 300), file="trajectorycrafter_depth.mp4")
    dep_frames = g.add("GetVideoComponents", (40, 1320), (340, 90), video=dep.out(0))
    render = g.add("Turbo4DTrajectoryCrafterRender", (420, 510), (340, 420), video=src_frames.out(0),
                   depth=dep_frames.out(0), frames=49, camera="orbit_left", theta=0.0, phi=-30.0, r=0.0, x=0.0,
                   y=0.0, radius_scale=1.0, focal=500.0 / 1024.0, depth_is_disparity=True, clean_holes=True)
    g.add("PreviewImage", (420, 970), (340, 300), images=render.out(0))
    pos = g.add("Turbo4DTrajectoryCrafterTextEncode", (420, 60), (340, 200), clip=clip.out(0),
                text="A video of the scene" + TC_REFINE)
    neg = g.add("Turbo4DTrajectoryCrafterTextEncode", (420, 290), (340, 180), clip=clip.out(0), text=TC_NEGATIVE)
    fast = g.add("Turbo4DChainBypass", (800, 60), (340, 300), model=model.out(0), preset="quality", threshold=0.08,
                 max_consecutive=2, step_threshold=0.0, step_max_skips=3, kappa_prior=0.0, start_percent=0.2,
                 end_percent=0.95, storage="native", calibration_file="")
    cond = g.add("Turbo4DTrajectoryCrafterConditioning", (800, 400), (340, 380), model=fast.out(0), vae=vae.out(0),
                 positive=pos.out(0), negative=neg.out(0), video=src_frames.out(0), render=render.out(0),
                 mask=render.out(1), frames=49, width=672, height=384, reference="first", seed=43,
                 noise_aug_strength=0.0563)
    smp = g.add("Turbo4DTrajectoryCrafterSampler", (1180, 60), (340, 420), model=fast.out(0), positive=cond.out(0),
                negative=cond.out(1), latent=cond.out(2), seed=43, steps=50, cfg=6.0,
                sampler_name="trajectorycrafter_ddim", scheduler="trailing")
    dec = g.add("Turbo4DTrajectoryCrafterDecode", (1180, 520), (340, 80), vae=vae.out(0), latent=smp.out(0))
    video = g.add("CreateVideo", (1560, 60), (300, 100), images=dec.out(0), fps=10.0)
    g.add("SaveVideo", (1560, 200), (420, 420), video=video.out(0), filename_prefix="turbo4d/trajectorycrafter",
          format="auto", codec="auto")
    return g


WORKFLOWS.update({f.__name__: f for f in (trajectorycrafter_redirect,)})

def render(name: str) -> dict[str, str]:
    """{path: text} of both files of one workflow."""
    g = WORKFLOWS[name]()
    if overlaps(g):
        raise ValueError(f"{name}: nodes {overlaps(g)} overlap on the canvas; lay them out apart")
    dump = lambda d: json.dumps(d, indent=2) + "\n"  # noqa: E731
    return {os.path.join(UI_DIR, f"{name}.json"): dump(g.ui()), os.path.join(API_DIR, f"{name}.json"): dump(g.api())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is out of date")
    a = ap.parse_args(argv)
    stale = []
    for name in WORKFLOWS:
        for path, text in render(name).items():
            old = open(path).read() if os.path.exists(path) else None
            if old != text:
                stale.append(os.path.relpath(path, ROOT))
                if not a.check:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write(text)
    if a.check and stale:
        print("out of date (run scripts/sync_workflows.py):\n  " + "\n  ".join(stale))
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "workflows up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
