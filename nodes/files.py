"""The one place where a file name from a prompt becomes a path.

Anyone who can POST a prompt to the server chooses these names (Load 4D Input's video, the model
loader's model_name, Chain Bypass's calibration_file, Save MultiView's filename_prefix), so a name
is only ever looked up inside its ComfyUI folder, through ComfyUI's folder API, and a name that
could lead out of it is refused before anything is opened: an absolute path, a '..' part (even
one that would come back inside: the name should say where the file is), a backslash (a separator
on Windows), a percent-encoded separator or dot (a client or a later step may decode it), a NUL
byte, and any path whose real location (symbolic links resolved, on the folder too) is not inside
the folder. Refusals raise FileRefused, a ValueError naming the node, the input, the folder and
the fix.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Optional

import folder_paths

# %2F '/', %5C '\', %2E '.', %00 NUL, in either case, also double-encoded (%252F).
_ENCODED = re.compile(r"%(25)*(2f|5c|2e|00)", re.IGNORECASE)
_DRIVE = re.compile(r"^[A-Za-z]:")

# What to do instead, per kind of file.
FIX_INPUT = ("Upload the file with the node's upload button (or copy it into the folder) and give its name "
             "relative to the folder, e.g. my_clip.mp4 or clips/my_clip.mp4.")
FIX_MODEL = ("Put the .safetensors file into the folder and pick it by its name; to use a file kept elsewhere, "
             "add its folder to ComfyUI's extra_model_paths.yaml.")
FIX_CALIBRATION = ("Copy the JSON into ComfyUI's models/turbo4d_calibration/ folder and give its name, e.g. "
                   "my_model.json.")
FIX_OUTPUT = "Give a prefix relative to the output folder, e.g. turbo4d/multiview."


class FileRefused(ValueError):
    """A prompt's file name that leads out of its folder; the message names the input and the fix."""


def _why_unsafe(name: str) -> Optional[str]:
    """Why a name given for a file inside a folder could lead out of it, or None."""
    if "\x00" in name:
        return "it contains a NUL byte"
    if _ENCODED.search(name):
        return "it contains a percent-encoded separator or dot (%2F, %5C, %2E)"
    if "\\" in name:
        return "it contains a backslash (a path separator on Windows); use '/' between subfolders"
    if os.path.isabs(name) or name.startswith("/") or _DRIVE.match(name):
        return "it is an absolute path"
    if ".." in name.split("/"):
        return "it contains '..'"
    return None


def _inside(path: str, roots: Iterable[str]) -> bool:
    """Whether the real location of `path` is inside the real location of one of `roots`."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        try:
            if os.path.commonpath([real, r]) == r:
                return True
        except ValueError:  # different drives
            continue
    return False


def _refuse(node: str, input_name: str, name: str, why: str, folder: str, fix: str) -> FileRefused:
    return FileRefused(f"{node}: {input_name}={name!r} is refused: {why}. {node} opens files only inside "
                       f"ComfyUI's {folder} folder. {fix}")


def check_name(node: str, input_name: str, name: str, folder: str, fix: str) -> str:
    """The name, when nothing in its spelling leads out of a folder; FileRefused otherwise."""
    why = _why_unsafe(name)
    if why:
        raise _refuse(node, input_name, name, why, folder, fix)
    return name


def check_inside(node: str, input_name: str, name: str, path: str, roots: Iterable[str], folder: str,
                 fix: str) -> str:
    """`path` when its real location is inside one of `roots`; FileRefused (a symbolic link, on
    the file or a subfolder, pointing out) otherwise."""
    if not _inside(path, list(roots)):
        raise _refuse(node, input_name, name, "it resolves (through a symbolic link) to a place outside that folder",
                      folder, fix)
    return path


def input_file(node: str, input_name: str, name: str, fix: str = FIX_INPUT) -> str:
    """Path of a file named like ComfyUI's LoadImage names them: relative to the input folder, or
    to the output / temp folder with a trailing ' [output]' / ' [temp]'. It need not exist."""
    rel, base = folder_paths.annotated_filepath(name)
    folder = "output" if name.endswith("[output]") else "temp" if name.endswith("[temp]") else "input"
    base = base or folder_paths.get_input_directory()
    check_name(node, input_name, rel, folder, fix)
    return check_inside(node, input_name, name, folder_paths.get_annotated_filepath(name), [base], folder, fix)


def model_file(node: str, input_name: str, folder_name: str, name: str, fix: str = FIX_MODEL) -> Optional[str]:
    """Path of `name` in one of ComfyUI's model folders (folder_paths.get_full_path, so every
    folder extra_model_paths.yaml adds counts), or None when it is in none of them."""
    folder = f"models/{folder_name}"
    check_name(node, input_name, name, folder, fix)
    try:
        path = folder_paths.get_full_path(folder_name, name)
        roots = folder_paths.get_folder_paths(folder_name)
    except KeyError:  # a folder name this ComfyUI does not know
        return None
    if path is None:
        return None
    return check_inside(node, input_name, name, path, roots, folder, fix)


def output_prefix(node: str, input_name: str, prefix: str, fix: str = FIX_OUTPUT) -> str:
    """A filename prefix for folder_paths.get_save_image_path, when its folder stays inside the
    output folder (ComfyUI checks the spelling; this also refuses links out)."""
    check_name(node, input_name, prefix, "output", fix)
    out = folder_paths.get_output_directory()
    return check_inside(node, input_name, prefix, os.path.join(out, os.path.dirname(os.path.normpath(prefix))),
                        [out], "output", fix)
