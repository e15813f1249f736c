"""The procedural 4D scenes: deterministic, really 4D, and geometrically consistent with their cameras."""

import math
from pathlib import Path

import pytest
import torch

from turbo_core.data import synth4d
from turbo_core.data.synth4d import SceneConfig, camera_angles, make_scene, render_batch

CFG = SceneConfig()
SMALL = SceneConfig(size=16, views=3, frames=5, max_primitives=2, elevation_deg=10.0, azimuth_start_deg=30.0)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def batch():
    return render_batch(range(16), CFG)


def test_same_seed_same_tensors():
    a, b = render_batch([7, 123456789], CFG), render_batch([7, 123456789], CFG)
    for key in ("images", "cameras", "masks"):
        assert torch.equal(a[key], b[key])


def test_different_seeds_differ(batch):
    images = batch["images"].flatten(1)
    for i in range(len(images)):
        for j in range(i):
            assert (images[i] - images[j]).abs().mean() > 0.02, (i, j)


@pytest.mark.parametrize("cfg", [CFG, SMALL])
def test_shapes_ranges_dtypes(cfg):
    out = render_batch([0, 1, 2], cfg)
    s, f, v, h = 3, cfg.frames, cfg.views, cfg.size
    assert out["images"].shape == (s, f, v, 3, h, h)
    assert out["masks"].shape == (s, f, v, 1, h, h)
    assert out["cameras"].shape == (v, 2)
    for x in out.values():
        assert x.dtype == torch.float32 and x.device.type == "cpu" and torch.isfinite(x).all()
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    assert out["images"].std() > 0.1  # not a blank canvas
    assert set(out["masks"].unique().tolist()) <= {0.0, 1.0}


def test_make_scene_matches_batch_and_reference_view():
    scene = make_scene(5, SMALL)
    f, v, h = SMALL.frames, SMALL.views, SMALL.size
    assert scene["video"].shape == (f, 3, h, h)
    assert scene["ground_truth"].shape == (f, v, 3, h, h)
    assert scene["masks"].shape == (f, v, 1, h, h)
    assert torch.equal(scene["ground_truth"][:, 0], scene["video"])
    assert torch.equal(scene["cameras"], camera_angles(SMALL))


def test_batch_equals_stacked_scenes():
    seeds = [3, 11]
    out = render_batch(seeds, CFG)
    scenes = [make_scene(s, CFG) for s in seeds]
    assert torch.equal(out["images"], torch.stack([s["ground_truth"] for s in scenes]))
    assert torch.equal(out["masks"], torch.stack([s["masks"] for s in scenes]))
    # seeds given as a tensor name the same scenes
    assert torch.equal(render_batch(torch.tensor(seeds), CFG)["images"], out["images"])


def test_chunking_does_not_change_result(monkeypatch):
    whole = render_batch(range(3), SMALL)
    monkeypatch.setattr(synth4d, "_CHUNK_RAYS_CPU", 1)  # one (scene, frame) per chunk
    assert torch.equal(render_batch(range(3), SMALL)["images"], whole["images"])


def test_objects_move_over_time(batch):
    masks = batch["masks"]
    changed = (masks[:, 0] != masks[:, -1]).float().mean((1, 2, 3, 4))
    assert (changed > 0.005).all(), changed
    # and every frame, not just the last, differs from its predecessor
    step = (batch["images"][:, 1:] - batch["images"][:, :-1]).abs().mean((2, 3, 4, 5))
    assert (step > 1e-3).all()


def test_views_differ(batch):
    images = batch["images"]
    diff = (images[:, :, 1:] - images[:, :, :1]).abs().mean((3, 4, 5))  # (S, F, V-1)
    assert (diff > 0.02).all(), diff.min()
    # the floor colour depends on where a camera looks from: bottom rows of opposite views differ
    bottom = (images[:, 0, 0, :, -2:] - images[:, 0, 2, :, -2:]).abs().mean((1, 2, 3))
    assert (bottom > 0.02).all(), bottom


def test_objects_stay_in_view(batch):
    fg = batch["masks"].sum((-1, -2, -3))  # (S, F, V)
    assert (fg >= 4).all(), fg.min()


def test_camera_angles_match_config():
    cfg = SceneConfig(views=3, azimuth_start_deg=30.0, azimuth_span_deg=90.0, elevation_deg=15.0)
    cams = camera_angles(cfg)
    assert cams.shape == (3, 2) and cams.dtype == torch.float32
    expected = torch.tensor([[30.0, 15.0], [60.0, 15.0], [90.0, 15.0]]).deg2rad()
    torch.testing.assert_close(cams, expected)
    assert camera_angles(CFG)[0, 0] == 0.0
    torch.testing.assert_close(camera_angles(CFG)[:, 0], torch.arange(4) * (math.pi / 2))
    torch.testing.assert_close(render_batch([0], cfg)["cameras"], cams)


def test_cameras_are_where_the_pixels_say():
    """Project each primitive's centre with an independent pinhole model: the pixel there is foreground."""
    cfg = SceneConfig(size=48)
    seeds = list(range(6))
    masks = render_batch(seeds, cfg)["masks"][:, :, :, 0]
    p = synth4d._scene_params(seeds, cfg, "cpu")
    centers = p["center"].unflatten(0, (len(seeds), cfg.frames))  # (S, F, K, 3)
    active = p["active"].unflatten(0, (len(seeds), cfg.frames))
    checked = 0
    for v, (az, el) in enumerate(camera_angles(cfg).double().tolist()):
        eye = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]).double()
        eye = eye * cfg.radius
        fwd = -eye / eye.norm()
        right = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        right = right / right.norm()
        up = torch.linalg.cross(right, fwd)
        rel = centers - eye
        depth = rel @ fwd
        half = math.tan(math.radians(cfg.fov_deg) / 2)
        x, y = (rel @ right) / depth / half, (rel @ up) / depth / half
        col = ((x + 1) / 2 * cfg.size).floor().long()
        row = ((1 - y) / 2 * cfg.size).floor().long()
        inside = active & (col >= 0) & (col < cfg.size) & (row >= 0) & (row < cfg.size)
        for s, f, k in inside.nonzero().tolist():
            assert masks[s, f, v, row[s, f, k], col[s, f, k]] == 1, (s, f, v, k)
            checked += 1
    assert checked > 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    seeds = list(range(8))
    cpu = render_batch(seeds, CFG)
    gpu = render_batch(seeds, CFG, device="cuda")
    assert gpu["images"].device.type == "cuda"
    torch.testing.assert_close(gpu["cameras"].cpu(), cpu["cameras"])
    # silhouettes and texture edges may flip on a few pixels from float rounding; nothing more
    assert (gpu["masks"].cpu() != cpu["masks"]).float().mean() < 1e-3
    diff = (gpu["images"].cpu() - cpu["images"]).abs()
    assert (diff > 1e-3).float().mean() < 2e-3
    assert diff.mean() < 1e-3


def test_save_grid_for_humans(batch):
    """test-artifacts/synth4d_grid.png: per scene, one row per view, one column per frame."""
    cv2 = pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    images = ((batch["images"][:4] + 1) * 127.5).round().to(torch.uint8)  # (S, F, V, 3, H, W)
    s, f, v, _, h, w = images.shape
    tiles = torch.full((s, f, v, 3, h + 2, w + 2), 255, dtype=torch.uint8)
    tiles[..., 1:-1, 1:-1] = images
    grid = tiles.permute(0, 2, 4, 1, 5, 3).reshape(s * v * (h + 2), f * (w + 2), 3).numpy()
    grid = cv2.resize(grid, None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "synth4d_grid.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(grid[..., ::-1]))
    assert cv2.imread(str(path)).shape == grid.shape
