"""Renders the pack's example reference video (workflows/assets/turbo4d_example.mp4) from the
procedural scene generator: the reference view (azimuth 0, elevation 20) of one scene, 64x64, 16 frames.

    .host/venv/bin/python scripts/make_example_video.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from turbo_core.data.synth4d import SceneConfig, make_scene  # noqa: E402
from turbo_core.multiview import to_unit  # noqa: E402
from turbo_core.video_io import to_uint8, write_mp4  # noqa: E402

SEED, SIZE, FRAMES, FPS = 7, 64, 16, 8.0


def main(out=os.path.join(ROOT, "workflows", "assets", "turbo4d_example.mp4")):
    scene = make_scene(SEED, SceneConfig(size=SIZE, views=1, frames=FRAMES))
    write_mp4(out, to_uint8(to_unit(scene["video"])), FPS, crf=14)
    print(f"{out}: {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
