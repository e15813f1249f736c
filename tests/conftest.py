"""Shared test setup.

The pack root and scripts/ go on sys.path, so `turbo_core` and `comfy_host` import under plain
`pytest` as well as `python -m pytest`.

`comfy` (session scope) is ONE real ComfyUI server (the unmodified host of scripts/setup_host.sh)
shared by every host test: a throwaway `--base-directory` with this pack linked into its
custom_nodes/, started on a free port with `--cpu`, stopped at the end of the session. Its log is
copied to test-artifacts/comfyui-host.log.
"""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

HOST_DIR = os.environ.get("TURBO4D_HOST", os.path.join(ROOT, ".host"))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")


def import_pack_nodes():
    """The pack's `nodes` package, imported the way ComfyUI imports the pack (a package of its own,
    not ComfyUI's top-level `nodes` module), with the host's ComfyUI tree importable and CPU-only."""
    import importlib
    import importlib.util

    if host_missing():
        pytest.fail(host_missing())
    comfy_dir = os.path.join(HOST_DIR, "ComfyUI")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args
    args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    name = "turbo4d_pack_nodes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "nodes", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(ROOT, "nodes")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
    return lambda sub: importlib.import_module(f"{name}.{sub}")


def host_missing() -> str | None:
    if not os.path.isfile(os.path.join(HOST_DIR, "ComfyUI", "main.py")):
        return f"no ComfyUI host at {HOST_DIR}: run `bash scripts/setup_host.sh --test` first"
    return None


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    from comfy_host import ComfyHost

    missing = host_missing()
    if missing:
        pytest.fail(missing)
    base = tmp_path_factory.mktemp("comfy_base")
    host = ComfyHost(HOST_DIR, base_dir=str(base), log_path=str(base / "comfyui.log"),
                     extra_args=("--preview-method", "auto"))
    host.start()
    try:
        yield host
    finally:
        host.stop()
        os.makedirs(ARTIFACTS, exist_ok=True)
        shutil.copyfile(host.log_path, os.path.join(ARTIFACTS, "comfyui-host.log"))
