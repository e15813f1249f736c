"""The shipped workflows: the committed files are what scripts/sync_workflows.py generates, their
node definitions match the running server's, the UI files are well-formed graphs, and every
API-format workflow runs to success on the real server with the files it promises."""
import glob
import json
import os

import av
import pytest
from PIL import Image

import sync_workflows as sw
from conftest import ROOT

API = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*.json")))
# The SV4D and TrajectoryCrafter workflows need the official weights, which CI cannot have;
# tests/test_host_sv4d.py and tests/test_host_trajectorycrafter.py run them with reduced-width
# checkpoints substituted.
RUNNABLE = [p for p in API if not os.path.basename(p).startswith(("sv4d", "trajectorycrafter"))]


def test_committed_workflows_equal_the_generated_ones():
    assert set(os.path.basename(p)[:-5] for p in API) == set(sw.WORKFLOWS)
    for name in sw.WORKFLOWS:
        for path, text in sw.render(name).items():
            with open(path) as f:
                assert f.read() == text, f"{os.path.relpath(path, ROOT)} is stale: run scripts/sync_workflows.py"


def test_ui_workflows_are_consistent_graphs():
    for name in sw.WORKFLOWS:
        with open(os.path.join(ROOT, "workflows", f"{name}.json")) as f:
            ui = json.load(f)
        assert ui["version"] == 0.4
        nodes = {n["id"]: n for n in ui["nodes"]}
        links = {l[0]: l for l in ui["links"]}
        assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(links)
        for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
            out = nodes[src]["outputs"][src_slot]
            inp = nodes[dst]["inputs"][dst_slot]
            assert lid in out["links"] and inp["link"] == lid
            assert out["type"] == inp["type"] == typ
        for n in ui["nodes"]:
            _, sockets, widgets, outputs = sw.NODE_DEFS[n["type"]]
            extra = sum(1 for w in widgets if "+" in w)
            assert len(n["widgets_values"]) == len(widgets) + extra, n["type"]
            assert [i["name"] for i in n["inputs"]] == [s for s, _ in sockets]
            assert [o["name"] for o in n["outputs"]] == [o for o, _ in outputs]
        # execution order respects every link
        order = {n["id"]: n["order"] for n in ui["nodes"]}
        assert all(order[l[1]] < order[l[3]] for l in ui["links"])


def test_node_defs_match_the_server(comfy):
    info = comfy.object_info()
    for type_, (title, sockets, widgets, outputs) in sw.NODE_DEFS.items():
        node = info[type_]
        # Stock nodes' display names are ComfyUI's and change between releases (0.3.75's
        # ImageFromBatch has none; newer releases name it and rename others); the pack's are fixed.
        if type_.startswith("Turbo4D"):
            assert node["display_name"] == title, (type_, node["display_name"])
        order = node["input_order"].get("required", []) + node["input_order"].get("optional", [])
        spec = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        widget_names = [w.split("+")[0] for w in widgets]
        socket_names = [s for s, _ in sockets]
        assert sorted(order) == sorted(widget_names + socket_names), type_
        assert [n for n in order if n in widget_names] == widget_names, f"{type_}: widget order"
        for name, typ in sockets:
            assert spec[name][0] == typ, (type_, name)
        for w in widgets:
            name, _, extra = w.partition("+")
            opts = spec[name][1] if len(spec[name]) > 1 else {}
            assert bool(opts.get("control_after_generate")) == (extra == "control"), (type_, name)
            assert bool(opts.get("video_upload") or opts.get("image_upload")) == (extra == "upload"), (type_, name)
        served = [(n, t) for n, t in zip(node["output_name"], node["output"])]
        if type_.startswith("Turbo4D"):
            assert served == outputs, type_
        else:  # newer ComfyUI appends outputs to stock nodes (PreviewImage's images); links keep their slots
            assert served[:len(outputs)] == outputs, (type_, served)


def _mp4_frames(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        return sum(1 for _ in c.decode(video=0)), (s.codec_context.width, s.codec_context.height)


@pytest.mark.parametrize("path", RUNNABLE, ids=[os.path.basename(p)[:-5] for p in RUNNABLE])
def test_api_workflow_runs_and_writes_its_files(comfy, path):
    with open(path) as f:
        prompt = json.load(f)
    entry = comfy.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    saves = {k: v for k, v in prompt.items() if v["class_type"] == "Turbo4DSaveMultiView"}
    assert saves
    for node_id, node in saves.items():
        out = entry["outputs"][node_id]
        v, scale = node["inputs"]["views"], node["inputs"]["scale"]
        f = out["grid"][0]["frames"]
        assert out["grid"][0]["views"] == v and len(out["videos"]) == v and len(out["images"]) == 1
        grid = os.path.join(comfy.output_directory, out["images"][0]["subfolder"], out["images"][0]["filename"])
        w, h = Image.open(grid).size
        assert (h % (v * scale), w % (f * scale)) == (0, 0) and h // v == w // f
        side = h // v
        for vid in out["videos"]:
            p = os.path.join(comfy.output_directory, vid["subfolder"], vid["filename"])
            assert os.path.getsize(p) > 500
            assert _mp4_frames(p) == (f, (side, side))
    for node in prompt.values():  # the stats line of every sampler reached the history
        if node["class_type"] == "Turbo4DMultiViewSampler":
            texts = [t for o in entry["outputs"].values() for t in o.get("text", [])]
            assert texts and texts[0].startswith("Turbo4D:")


def test_pyproject_dependencies_equal_requirements():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    assert project["dependencies"] == reqs
    assert project["license"] == "GPL-3.0-or-later"
    from turbo_core import __version__
    assert project["version"] == __version__
