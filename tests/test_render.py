"""turbo_core.render, the point-cloud render TrajectoryCrafter conditions on, against a direct
transcription of the reference's models/utils.py (Warper.forward_warp with bilinear splatting and
clean_points; sphere2pose and generate_traj_specified; get_poses and infer.py's depth
conversion): equal within fp32 round-off on random frames and depths, for each kind of camera
move. Plus the render's own properties: the source camera reproduces the frame, the near surface
wins where two land on one pixel, a move uncovers holes."""
import copy

import cv2
import numpy as np
import pytest
import torch

from turbo_core.render import (CAMERA_PRESETS, camera_path, clean_holes, disparity_to_depth, forward_warp,
                               intrinsics, orbit_radius, render_video)


# --- the transcription (TrajectoryCrafter models/utils.py, demo.py, models/infer.py) ------------------
def ref_sphere2pose(c2ws_input, theta, phi, r, x=None, y=None):
    c2ws = copy.deepcopy(c2ws_input)
    c2ws[:, 2, 3] -= r
    if x is not None:
        c2ws[:, 1, 3] += y
    if y is not None:
        c2ws[:, 0, 3] -= x
    theta = torch.deg2rad(torch.tensor(theta))
    sx, cx = torch.sin(theta), torch.cos(theta)
    rot_x = torch.tensor([[1, 0, 0, 0], [0, cx, -sx, 0], [0, sx, cx, 0], [0, 0, 0, 1]]).unsqueeze(0).repeat(c2ws.shape[0], 1, 1)
    phi = torch.deg2rad(torch.tensor(phi))
    sy, cy = torch.sin(phi), torch.cos(phi)
    rot_y = torch.tensor([[cy, 0, sy, 0], [0, 1, 0, 0], [-sy, 0, cy, 0], [0, 0, 0, 1]]).unsqueeze(0).repeat(c2ws.shape[0], 1, 1)
    c2ws = torch.matmul(rot_x, c2ws)
    return torch.matmul(rot_y, c2ws)


def ref_poses(depths, target_pose, frames, radius_scale=1.0):
    radius = min(depths[0, 0, depths.shape[-2] // 2, depths.shape[-1] // 2].cpu() * radius_scale, 5)
    c2w_init = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]]).unsqueeze(0)
    dtheta, dphi, dr, dx, dy = target_pose
    lists = [np.linspace(0, v, frames) for v in (dtheta, dphi, dr * radius, dx, dy)]
    poses = torch.cat([ref_sphere2pose(c2w_init, np.float32(th), np.float32(ph), np.float32(r), np.float32(x),
                                       np.float32(y)) for th, ph, r, x, y in zip(*lists)])
    poses[:, 2, 3] = poses[:, 2, 3] + radius
    return poses[0:1].repeat(frames, 1, 1), poses


def create_grid(b, h, w):
    x2d = torch.arange(0, w)[None].repeat([h, 1])
    y2d = torch.arange(0, h)[:, None].repeat([1, w])
    return torch.stack([x2d, y2d], dim=0)[None].repeat([b, 1, 1, 1])


def ref_transformed_points(depth1, t1, t2, k1, k2):
    b, _, h, w = depth1.shape
    transformation = torch.bmm(t2, torch.linalg.inv(t1))
    x2d = torch.arange(0, w)[None].repeat([h, 1]).to(depth1)
    y2d = torch.arange(0, h)[:, None].repeat([1, w]).to(depth1)
    ones_2d = torch.ones(size=(h, w)).to(depth1)
    ones_4d = ones_2d[None, :, :, None, None].repeat([b, 1, 1, 1, 1])
    pos = torch.stack([x2d, y2d, ones_2d], dim=2)[None, :, :, :, None]
    unnormalized = torch.matmul(torch.linalg.inv(k1)[:, None, None], pos)
    world = depth1[:, 0][:, :, :, None, None] * unnormalized
    world_homo = torch.cat([world, ones_4d], dim=3)
    trans_world = torch.matmul(transformation[:, None, None], world_homo)[:, :, :, :3]
    return torch.matmul(k2[:, None, None], trans_world)


def ref_splat(frame1, mask1, depth1, flow12):
    b, c, h, w = frame1.shape
    flow12_mask = torch.ones(size=(b, 1, h, w)).to(flow12)
    trans_pos = flow12 + create_grid(b, h, w).to(frame1)
    off = trans_pos + 1
    floor, ceil = torch.floor(off).long(), torch.ceil(off).long()
    off = torch.stack([torch.clamp(off[:, 0], min=0, max=w + 1), torch.clamp(off[:, 1], min=0, max=h + 1)], dim=1)
    floor = torch.stack([torch.clamp(floor[:, 0], min=0, max=w + 1), torch.clamp(floor[:, 1], min=0, max=h + 1)], dim=1)
    ceil = torch.stack([torch.clamp(ceil[:, 0], min=0, max=w + 1), torch.clamp(ceil[:, 1], min=0, max=h + 1)], dim=1)
    nw = (1 - (off[:, 1:2] - floor[:, 1:2])) * (1 - (off[:, 0:1] - floor[:, 0:1]))
    sw = (1 - (ceil[:, 1:2] - off[:, 1:2])) * (1 - (off[:, 0:1] - floor[:, 0:1]))
    ne = (1 - (off[:, 1:2] - floor[:, 1:2])) * (1 - (ceil[:, 0:1] - off[:, 0:1]))
    se = (1 - (ceil[:, 1:2] - off[:, 1:2])) * (1 - (ceil[:, 0:1] - off[:, 0:1]))
    sat = torch.clamp(depth1, min=0, max=1000)
    log_d = torch.log(1 + sat)
    depth_weights = torch.exp(log_d / log_d.max() * 50)

    def weight(p):
        return torch.moveaxis(p * mask1 * flow12_mask / depth_weights.unsqueeze(1), [0, 1, 2, 3], [0, 3, 1, 2])

    warped = torch.zeros(size=(b, h + 2, w + 2, c), dtype=torch.float32)
    weights = torch.zeros(size=(b, h + 2, w + 2, 1), dtype=torch.float32)
    f_cl = torch.moveaxis(frame1, [0, 1, 2, 3], [0, 3, 1, 2])
    bi = torch.arange(b)[:, None, None]
    for p, ys, xs in ((nw, floor[:, 1], floor[:, 0]), (sw, ceil[:, 1], floor[:, 0]), (ne, floor[:, 1], ceil[:, 0]),
                      (se, ceil[:, 1], ceil[:, 0])):
        warped.index_put_((bi, ys, xs), f_cl * weight(p), accumulate=True)
        weights.index_put_((bi, ys, xs), weight(p), accumulate=True)
    warped_cf = torch.moveaxis(warped, [0, 1, 2, 3], [0, 2, 3, 1])[:, :, 1:-1, 1:-1]
    weights_cf = torch.moveaxis(weights, [0, 1, 2, 3], [0, 2, 3, 1])[:, :, 1:-1, 1:-1]
    mask = weights_cf > 0
    out = torch.where(mask, warped_cf / weights_cf, torch.tensor(-1.0))
    return torch.clamp(out, min=-1, max=1), mask.to(frame1)


def ref_clean_points(warped_frame2, mask2):
    warped_frame2 = (warped_frame2 + 1.0) / 2.0
    mask = 1 - mask2
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    mask = mask.squeeze(0).repeat(3, 1, 1).permute(1, 2, 0) * 255.0
    mask_erosion = cv2.dilate(np.array(mask.numpy()), np.ones((5, 5), np.uint8), iterations=1)
    m = np.array(np.uint8(mask_erosion)) / 255.0
    m[m < 0.5] = 0
    m[m >= 0.5] = 1
    mask_new = torch.from_numpy(m).permute(2, 0, 1).unsqueeze(0).float()
    warped_frame2 = warped_frame2 * (1 - mask_new)
    return warped_frame2 * 2.0 - 1.0, 1 - mask_new[:, 0:1]


def ref_forward_warp(frame1, depth1, t1, t2, k1, clean):
    pts = ref_transformed_points(depth1, t1, t2, k1, k1.clone())
    coords = pts[:, :, :, :2, 0] / pts[:, :, :, 2:3, 0]
    trans_depth = pts[:, :, :, 2, 0]
    flow12 = coords.permute(0, 3, 1, 2) - create_grid(*frame1.shape[:1], *frame1.shape[2:]).to(coords)
    warped, mask = ref_splat(frame1, torch.ones_like(depth1), trans_depth, flow12)
    if clean:
        warped, mask = ref_clean_points(warped, mask)
    return warped, mask


def ref_depth(disparity, near=0.0001, far=10000.0):
    depths = (disparity - disparity.min()) / (disparity.max() - disparity.min())
    depths = depths * 3900
    depths[depths < 1e-5] = 1e-5
    return (10000.0 / depths).clip(near, far)


# --- the scene --------------------------------------------------------------------------------
def scene(frames=3, h=36, w=64, seed=0):
    """Random frames and a smooth disparity: a near blob in front of a far slope."""
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(frames, 3, h, w, generator=g) * 2 - 1
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    disp = []
    for f in range(frames):
        blob = torch.exp(-((xs - 0.1 * f) ** 2 + ys ** 2) / 0.15)
        disp.append(0.25 + 0.2 * (ys + 1) + 0.5 * blob + 0.01 * torch.rand(h, w, generator=g))
    return video, torch.stack(disp)


@pytest.mark.parametrize("camera", ["orbit_left", "orbit_up", "orbit_left_dolly_in", "dolly_out", "pan_right"])
@pytest.mark.parametrize("clean", [True, False])
def test_render_is_the_reference_warper(camera, clean):
    video, disp = scene()
    n, _, h, w = video.shape
    depth = disparity_to_depth(disp)
    torch.testing.assert_close(depth, ref_depth(disp), rtol=1e-6, atol=0)
    pose = CAMERA_PRESETS[camera]
    ours = render_video(video, depth, *pose, clean=clean)
    pose_s, pose_t = ref_poses(depth[:, None], pose, n)
    torch.testing.assert_close(ours["poses"], pose_t, rtol=1e-6, atol=1e-6)
    K = intrinsics(w, h)[None]
    for f in range(n):
        want, want_mask = ref_forward_warp(video[f:f + 1], depth[f:f + 1, None], pose_s[f:f + 1], pose_t[f:f + 1],
                                           K, clean)
        got, got_mask = ours["render"][f:f + 1], ours["valid"][f:f + 1]
        assert torch.equal(got_mask, want_mask), (camera, f, (got_mask != want_mask).sum())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if pose != (0.0,) * 5:
        assert float((1 - ours["valid"][-1]).mean()) > 0.005  # the move uncovers something


def test_reference_intrinsics_at_its_resolution():
    torch.testing.assert_close(intrinsics(1024, 576), torch.tensor([[500.0, 0, 512], [0, 500.0, 288], [0, 0, 1]]))


def test_source_camera_reproduces_the_frame():
    """On a smooth surface (at depth edges the soft z-buffer lets a near point's sub-pixel spill
    outweigh a far point, in the reference too)."""
    video, _ = scene(frames=1)
    ys = torch.linspace(0, 1, video.shape[-2])[:, None].expand(video.shape[-2], video.shape[-1])
    depth = disparity_to_depth(torch.stack([0.5 + 0.5 * ys, 0.5 + 0.5 * ys]))[:1]
    poses = camera_path(1, orbit_radius(depth))
    K = intrinsics(video.shape[-1], video.shape[-2])[None]
    warped, valid = forward_warp(video, depth[:, None], poses, poses, K)
    assert bool(valid.all())
    torch.testing.assert_close(warped, video, rtol=0, atol=1e-3)


def test_near_surface_wins_and_points_behind_are_dropped():
    """Two columns of pixels moved onto one target pixel: the near one's colour stays (weights
    e^-50 apart); a point behind the camera lands nowhere."""
    frame = torch.zeros(1, 3, 1, 4)
    frame[0, :, 0, 1], frame[0, :, 0, 2] = 0.8, -0.8
    z = torch.tensor([[[2.0, 2.0, 50.0, 2.0]]])
    pos = torch.tensor([[[[0.0, 0.0], [2.0, 0.0], [2.0, 0.0], [3.0, 0.0]]]])
    from turbo_core.render import _splat

    out, valid = _splat(frame, z, pos, torch.ones_like(z, dtype=torch.bool))
    assert abs(float(out[0, 0, 0, 2]) - 0.8) < 1e-6 and float(valid[0, 0, 0, 2]) == 1.0
    front = torch.tensor([[[True, True, True, False]]])
    out, valid = _splat(frame, z, pos, front)
    assert valid[0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_constant_depth_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="constant over the whole video"):
        disparity_to_depth(torch.ones(2, 4, 4))


def test_clean_holes_grows_holes_by_two_pixels():
    valid = torch.ones(1, 1, 9, 9)
    valid[0, 0, 4, 4] = 0
    warped, keep = clean_holes(torch.zeros(1, 3, 9, 9), valid)
    assert int((keep == 0).sum()) == 25 and float(warped[0, 0, 4, 4]) == -1.0
