"""A prompt names files, and anyone who can POST a prompt chooses those names: every node that
opens (or writes) a named file keeps to its ComfyUI folder. Load 4D Input's video, Turbo4D Model
Loader's model_name (Turbo4D and SV4D files), Chain Bypass's calibration_file and Save
MultiView's filename_prefix refuse an absolute path, '..', a symbolic link out of the folder and
percent-encoded or backslash separators, with a message naming the node, the input, the folder
and the fix -- over HTTP on a real ComfyUI server, and in direct calls for the resolver's finer
cases. Files inside the folders (subfolders and symlinks within included) still load.

Every secret file below is real and valid (a video, a Turbo4D network, a bypass calibration), so
before the fix the prompts that reach it succeed, and the tests fail."""
import json
import os
import shutil

import pytest

from comfy_host import PromptFailed
from conftest import HOST_DIR, ROOT, import_pack_nodes

EXAMPLE = os.path.join(ROOT, "workflows", "assets", "turbo4d_example.mp4")


@pytest.fixture(scope="module")
def secret(comfy):
    """A folder beside ComfyUI's input/, output/ and models/ with a real file of each kind, and
    symbolic links into it from inside the folders."""
    import torch
    from turbo_core.accel.bypass import ChainBypassConfig
    from turbo_core.accel.calibrate import Calibration, save_calibration
    from turbo_core.models.io import save_model
    from turbo_core.models.scm_net import CONFIGS, SCMNet

    d = os.path.join(comfy.base_dir, "secret")
    os.makedirs(d, exist_ok=True)
    shutil.copyfile(EXAMPLE, os.path.join(d, "clip.mp4"))
    torch.manual_seed(0)
    save_model(SCMNet(CONFIGS["tiny"]), os.path.join(d, "net.safetensors"))
    from turbo_core.models.sv4d import SV4DConfig, SV4DUNet, save_sv4d
    save_sv4d(SV4DUNet(SV4DConfig.reduced("sv4d2")), os.path.join(d, "sv4d2.safetensors"))
    cfg = ChainBypassConfig(threshold=0.05)
    save_calibration(Calibration("bypass", "threshold", 0.05, 30.0, cfg.to_dict()), os.path.join(d, "cal.json"))

    models = comfy.models_directory
    cal_dir = os.path.join(models, "turbo4d_calibration")
    os.makedirs(cal_dir, exist_ok=True)
    links = {os.path.join(comfy.input_directory, "link_clip.mp4"): os.path.join(d, "clip.mp4"),
             os.path.join(models, "turbo4d", "link_net.safetensors"): os.path.join(d, "net.safetensors"),
             os.path.join(cal_dir, "link_cal.json"): os.path.join(d, "cal.json"),
             os.path.join(comfy.output_directory, "link_out"): d}
    for link, target in links.items():
        if not os.path.lexists(link):
            os.symlink(target, link)
    # the same kinds of file inside the folders, in subfolders and through links that stay inside
    os.makedirs(os.path.join(comfy.input_directory, "clips"), exist_ok=True)
    shutil.copyfile(EXAMPLE, os.path.join(comfy.input_directory, "clips", "inside.mp4"))
    shutil.copyfile(os.path.join(d, "cal.json"), os.path.join(cal_dir, "inside_cal.json"))
    inside_link = os.path.join(comfy.input_directory, "link_inside.mp4")
    if not os.path.lexists(inside_link):
        os.symlink(os.path.join(comfy.input_directory, "clips", "inside.mp4"), inside_link)
    return d


def escapes(secret_dir: str, folder: str, file: str) -> dict:
    """The ways out of `folder` to `secret_dir/file`: label -> name."""
    rel = os.path.relpath(os.path.join(secret_dir, file), folder)
    return {
        "absolute": os.path.join(secret_dir, file),
        "dotdot": rel,
        "encoded": rel.replace("/", "%2F"),
        "encoded_dots": rel.replace("..", "%2e%2e"),
        "backslash": rel.replace("/", "\\"),
    }


def load_input_prompt(video: str) -> dict:
    return {"1": {"class_type": "Turbo4DLoadInput", "inputs": {"video": video, "size": 32, "frame_count": 2,
                                                               "frame_stride": 1, "start_frame": 0}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


def grid_prompt(model_name: str = "embedded default", calibration_file: str = None) -> dict:
    """Loader (-> Chain Bypass) -> MultiView Sampler (1 step, 1 x 1) -> PreviewImage."""
    p = {"1": {"class_type": "Turbo4DModelLoader", "inputs": {"model_name": model_name, "weight_dtype": "auto"}},
         "2": {"class_type": "Turbo4DSyntheticScene",
               "inputs": {"seed": 0, "views": 1, "frames": 1, "size": 32, "elevation": 20.0,
                          "azimuth_start": 0.0, "azimuth_span": 360.0}},
         "3": {"class_type": "Turbo4DMultiViewSampler",
               "inputs": {"model": ["1", 0], "input": ["2", 0], "views": 1, "frames": 1, "elevation": 20.0,
                          "azimuth_span": 360.0, "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                          "scheduler": "karras"}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    if calibration_file is not None:
        p["5"] = {"class_type": "Turbo4DChainBypass",
                  "inputs": {"model": ["1", 0], "preset": "balanced", "threshold": 0.1, "max_consecutive": 2,
                             "step_threshold": 0.0, "step_max_skips": 3, "kappa_prior": 0.0, "start_percent": 0.2,
                             "end_percent": 0.95, "storage": "native", "calibration_file": calibration_file}}
        p["3"]["inputs"]["model"] = ["5", 0]
    return p


def refused(comfy, prompt, node_type: str) -> str:
    """The message of the prompt's failure, which must come from `node_type` (the node that was
    given the name: a failure further on means the file was read)."""
    try:
        entry = comfy.run(prompt, timeout=120)
    except PromptFailed as e:
        assert e.node_type == node_type, (e.node_type, e.message)
        return e.message
    pytest.fail(f"the prompt ran and read the file: {json.dumps(entry.get('outputs'))[:300]}")


def assert_clear(msg: str, node: str, inp: str, folder: str, fix: str) -> None:
    assert node in msg and f"{inp}=" in msg, msg
    assert "refused" in msg and folder in msg and fix in msg, msg


# --- over HTTP -------------------------------------------------------------------------------------
def test_load_4d_input_reads_videos_only_from_the_input_folder(comfy, secret):
    names = escapes(secret, comfy.input_directory, "clip.mp4")
    names["symlink"] = "link_clip.mp4"
    names["annotated_dotdot"] = os.path.relpath(os.path.join(secret, "clip.mp4"), comfy.output_directory) + " [output]"
    for label, name in names.items():
        msg = refused(comfy, load_input_prompt(name), "Turbo4DLoadInput")
        assert_clear(msg, "Load 4D Input", "video", "input folder" if "annotated" not in label else "output folder",
                     "upload button")
    # inside the folder: a subfolder and a link that stays inside still load
    for name in ("clips/inside.mp4", "link_inside.mp4"):
        entry = comfy.run(load_input_prompt(name), timeout=60)
        assert len(entry["outputs"]["2"]["images"]) == 2, name


def test_model_loader_reads_weights_only_from_its_model_folders(comfy, secret):
    folder = os.path.join(comfy.models_directory, "turbo4d")
    names = escapes(secret, folder, "net.safetensors")
    names["symlink"] = "link_net.safetensors"
    for label, name in names.items():
        msg = refused(comfy, grid_prompt(model_name=name), "Turbo4DModelLoader")
        assert_clear(msg, "Turbo4D Model Loader", "model_name", "models/turbo4d", "extra_model_paths.yaml")


def test_sv4d_folders_of_the_model_loader_refuse_links_out(comfy, secret):
    """The loader's other folders (diffusion_models, checkpoints, where SV4D files lie): a link
    out of them to a real SV4D 2.0 file is refused before the file is opened."""
    for sub in ("diffusion_models", "checkpoints"):
        os.makedirs(os.path.join(comfy.models_directory, sub), exist_ok=True)
        link = os.path.join(comfy.models_directory, sub, f"link_{sub}.safetensors")
        if not os.path.lexists(link):
            os.symlink(os.path.join(secret, "sv4d2.safetensors"), link)
        msg = refused(comfy, grid_prompt(model_name=f"link_{sub}.safetensors"), "Turbo4DModelLoader")
        assert_clear(msg, "Turbo4D Model Loader", "model_name", f"models/{sub}", "extra_model_paths.yaml")


def test_chain_bypass_reads_calibrations_only_from_its_folder(comfy, secret):
    folder = os.path.join(comfy.models_directory, "turbo4d_calibration")
    names = escapes(secret, folder, "cal.json")
    names["symlink"] = "link_cal.json"
    names["etc_passwd"] = "/etc/passwd"
    for label, name in names.items():
        msg = refused(comfy, grid_prompt(calibration_file=name), "Turbo4DChainBypass")
        assert_clear(msg, "Chain Bypass", "calibration_file", "models/turbo4d_calibration", "Copy the JSON")
    # the same calibration inside the folder is used
    entry = comfy.run(grid_prompt(calibration_file="inside_cal.json"), timeout=120)
    assert entry["outputs"]["4"]["images"]


def test_save_multiview_writes_only_into_the_output_folder(comfy, secret):
    before = set(os.listdir(secret))
    rel = os.path.relpath(os.path.join(secret, "saved"), comfy.output_directory)
    for prefix in (os.path.join(secret, "saved"), rel, rel.replace("/", "%2F"), rel.replace("/", "\\"),
                   "link_out/saved"):
        p = grid_prompt()
        p["4"] = {"class_type": "Turbo4DSaveMultiView",
                  "inputs": {"images": ["3", 0], "views": 1, "fps": 8.0, "filename_prefix": prefix, "scale": 1}}
        msg = refused(comfy, p, "Turbo4DSaveMultiView")
        assert_clear(msg, "Save MultiView", "filename_prefix", "output folder", "relative to the output folder")
    assert set(os.listdir(secret)) == before


# --- direct calls: the resolver's finer cases --------------------------------------------------------
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack's node modules in this process, with ComfyUI's input folder in a throwaway place
    (importing Load 4D Input copies the example video there)."""
    get = import_pack_nodes()
    import folder_paths

    base = tmp_path_factory.mktemp("folders")
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(base / "input"))
    os.makedirs(base / "input" / "sub", exist_ok=True)
    os.makedirs(base / "outside", exist_ok=True)
    shutil.copyfile(EXAMPLE, base / "outside" / "clip.mp4")
    shutil.copyfile(EXAMPLE, base / "input" / "sub" / "clip.mp4")
    os.symlink(base / "outside", base / "input" / "linked_dir")
    yield get, base
    folder_paths.set_input_directory(old)


@pytest.mark.parametrize("name, why", [
    ("/etc/passwd", "absolute"),
    ("../outside/clip.mp4", "'..'"),
    ("sub/../../outside/clip.mp4", "'..'"),
    ("sub/../sub/clip.mp4", "'..'"),  # '..' is refused even where it would stay inside
    ("..%2Foutside%2Fclip.mp4", "percent-encoded"),
    ("%2E%2E/outside/clip.mp4", "percent-encoded"),
    ("..%5Coutside%5Cclip.mp4", "percent-encoded"),
    ("..\\outside\\clip.mp4", "backslash"),
    ("C:\\Windows\\win.ini", "backslash"),
    ("C:/Windows/win.ini", "absolute"),
    ("linked_dir/clip.mp4", "outside"),
    ("clip.mp4\x00.png", "NUL"),
])
def test_resolver_refuses_every_way_out(pack, name, why):
    get, base = pack
    inputs = get("inputs")
    with pytest.raises(ValueError) as e:
        inputs.Load4DInput.execute(video=name, size=32, frame_count=2, frame_stride=1, start_frame=0)
    msg = str(e.value)
    assert "Load 4D Input" in msg and "video=" in msg and why in msg and "input folder" in msg, msg
    files = get("files")
    with pytest.raises(files.FileRefused):
        files.input_file("Load 4D Input", "video", name)


def test_resolver_keeps_names_inside_the_folder(pack):
    get, base = pack
    files = get("files")
    path = files.input_file("Load 4D Input", "video", "sub/clip.mp4")
    assert os.path.realpath(path) == os.path.realpath(base / "input" / "sub" / "clip.mp4")
    out = get("inputs").Load4DInput.execute(video="sub/clip.mp4", size=32, frame_count=2, frame_stride=1,
                                            start_frame=0)
    assert tuple(out.result[1].shape) == (2, 32, 32, 3)


def test_load_4d_input_fingerprint_does_not_stat_files_outside(pack):
    """ComfyUI asks for the fingerprint before running the node: it must not touch a path out of
    the folder either (its mtime would tell a prompter whether the file exists)."""
    get, base = pack
    node = get("inputs").Load4DInput
    inside = node.fingerprint_inputs("sub/clip.mp4", 32, 2, 1, 0)
    assert inside != "sub/clip.mp4:None"
    outside = str(base / "outside" / "clip.mp4")
    assert node.fingerprint_inputs(outside, 32, 2, 1, 0) == f"{outside}:refused"


# --- files in the right folder that are the wrong kind ----------------------------------------------
def test_binary_calibration_file_names_the_file_and_the_fix(comfy, secret):
    folder = os.path.join(comfy.models_directory, "turbo4d_calibration")
    with open(os.path.join(folder, "binary.json"), "wb") as f:
        f.write(bytes(range(256)) * 8)
    msg = refused(comfy, grid_prompt(calibration_file="binary.json"), "Turbo4DChainBypass")
    assert "calibration_file='binary.json'" in msg and "binary, not JSON text" in msg, msg
    assert "calibrate again" in msg and "codec can't decode" not in msg, msg


def test_other_files_in_the_sv4d_folders_are_named_for_what_they_are(comfy):
    """A file the loader finds in diffusion_models/ or checkpoints/ that is not an SV4D UNet: the
    message says where it is and what it is, not that it is missing."""
    from safetensors.torch import save_file
    import torch
    from turbo_core.models.io import save_model
    from turbo_core.models.scm_net import CONFIGS, SCMNet

    ck = os.path.join(comfy.models_directory, "checkpoints")
    os.makedirs(ck, exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              os.path.join(ck, "sd_like_test.safetensors"))
    save_model(SCMNet(CONFIGS["tiny"]), os.path.join(ck, "turbo4d_in_checkpoints_test.safetensors"))
    with open(os.path.join(ck, "pickled_test.ckpt"), "wb") as f:
        f.write(b"\x80\x04not to be unpickled")
    with open(os.path.join(ck, "broken_test.safetensors"), "wb") as f:
        f.write(b"garbage" * 20)
    cases = {"sd_like_test.safetensors": "a UNet without SV4D's motion blocks",
             "turbo4d_in_checkpoints_test.safetensors": "a Turbo4D network, which loads from models/turbo4d/",
             "pickled_test.ckpt": "a pickled checkpoint, which Turbo4D never opens",
             "broken_test.safetensors": "not a readable .safetensors file"}
    for name, what in cases.items():
        msg = refused(comfy, grid_prompt(model_name=name), "Turbo4DModelLoader")
        assert f"model_name={name!r}" in msg and "is in models/checkpoints/ but is not an SV4D" in msg, msg
        assert what in msg and "is not in models/" not in msg, msg
