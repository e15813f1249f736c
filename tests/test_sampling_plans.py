"""SV4D / SV4D 2.0 pass plans, cameras, guidance scales and sigmas against the reference scripts'
rules (simple_video_sample_4d.py, simple_video_sample_4d2.py, sgm guiders and discretizer),
restated here in the scripts' own terms."""
import math

import numpy as np
import pytest
import torch

from turbo_core import sampling_plans as sp


# --- the scripts' index rules, restated ---------------------------------------------------------
def script_sv4d(n_frames=21, T=5):
    """simple_video_sample_4d.py: anchors arange(T-1, n, T-1) with cond_view at frame 0; dense
    t0 in arange(0, n-1, T-1), forward cond_view frame t0, backward frame t0+T-1."""
    out = [("anchor", list(np.arange(T - 1, n_frames, T - 1)), 0, None)]
    for t0 in np.arange(0, n_frames - 1, T - 1):
        idx = list(t0 + np.arange(T))
        out.append(("dense", idx, idx[0], idx[::-1][0]))
    return out


def script_sv4d2(n_frames, T, eight_views):
    """simple_video_sample_4d2.py: t0 in range(0, n, T) (12x4) or range(0, n-T+1, T-1) (5x8),
    clipped to n-T; cond_view at frame t0, zeroed on the first chunk."""
    starts = range(0, n_frames - T + 1, T - 1) if eight_views else range(0, n_frames, T)
    out = []
    for t0 in starts:
        if t0 + T > n_frames:
            t0 = n_frames - T
        out.append((list(t0 + np.arange(T)), None if t0 == 0 else t0))
    return out


def test_sv4d_plan_is_the_scripts_anchor_then_dense_windows():
    plan = sp.sv4d_plan(21, 5)
    ref = script_sv4d(21, 5)
    assert len(plan) == len(ref) == 6
    for p, (kind, frames, fwd, bwd) in zip(plan, ref):
        assert p.kind == kind and list(p.frames) == [int(f) for f in frames]
        assert p.reference == fwd and p.reverse_reference == (None if bwd is None else int(bwd))
    assert plan[0].frames == (4, 8, 12, 16, 20) and not plan[0].alternate
    sp.check_plan(plan, 21, first_frame_known=True)
    with pytest.raises(ValueError):
        sp.check_plan(plan, 21, first_frame_known=False)  # SV4D needs SV3D's frame 0


def test_dense_pass_alternates_starting_reversed():
    """The script takes backward inputs at even steps (step % 2 == 0) and forward at odd ones."""
    dense = sp.sv4d_plan(21)[2]  # window 4..8
    assert dense.order_at(0) == (8, 7, 6, 5, 4) and dense.reference_at(0) == 8
    assert dense.order_at(1) == (4, 5, 6, 7, 8) and dense.reference_at(1) == 4
    assert [dense.reversed_at(s) for s in range(4)] == [True, False, True, False]
    chunk = sp.chunk_plan(21, 12)[1]
    assert all(chunk.order_at(s) == chunk.frames and chunk.reference_at(s) == 9 for s in range(3))


@pytest.mark.parametrize("frames", [5, 9, 13, 17])
def test_sv4d_shorter_videos_follow_the_same_rule(frames):
    plan = sp.sv4d_plan(frames)
    ref = script_sv4d(frames)
    assert [list(p.frames) for p in plan] == [[int(f) for f in r[1]] for r in ref]
    sp.check_plan(plan, frames, first_frame_known=True)


@pytest.mark.parametrize("frames", [0, 4, 6, 20, 22, 25])
def test_sv4d_frame_counts_it_cannot_cover_are_named(frames):
    with pytest.raises(ValueError, match="frames"):
        sp.sv4d_plan(frames)


@pytest.mark.parametrize("T,eight", [(12, False), (5, True)])
def test_sv4d2_chunks_equal_the_script_for_21_frames(T, eight):
    plan = sp.chunk_plan(21, T)
    ref = script_sv4d2(21, T, eight)
    assert [(list(p.frames), p.reference) for p in plan] == [([int(f) for f in fr], r) for fr, r in ref]
    assert all(p.kind == "chunk" and not p.alternate for p in plan)
    sp.check_plan(plan, 21, first_frame_known=False)
    assert [p.frames[0] for p in plan] == ([0, 9] if T == 12 else [0, 4, 8, 12, 16])


@pytest.mark.parametrize("frames", list(range(1, 40)))
@pytest.mark.parametrize("T", [5, 12])
def test_chunks_cover_every_frame_and_reference_only_generated_ones(frames, T):
    plan = sp.chunk_plan(frames, T)
    sp.check_plan(plan, frames, first_frame_known=False)
    assert all(len(p.frames) == min(T, frames) for p in plan)
    # where the 12 x 4 script's rule works (every chunk start already generated), it is ours
    ref = script_sv4d2(frames, T, eight_views=False) if frames >= T else None
    if ref is not None:
        done, ok = set(), True
        for fr, r in ref:
            ok &= r is None or r in done
            done |= set(int(f) for f in fr)
        if ok and done == set(range(frames)):
            assert [(list(p.frames), p.reference) for p in plan] == [([int(f) for f in fr], r) for fr, r in ref]


def test_variant_of_a_network():
    assert sp.variant_for("sv4d", False).name == "sv4d"
    assert sp.variant_for("sv4d2", True).name == "sv4d2"
    v8 = sp.variant_for("sv4d2", False)
    assert (v8.name, v8.frames_per_pass, v8.views, v8.cfg, v8.min_cfg) == ("sv4d2_8views", 5, 8, 2.5, 1.5)
    with pytest.raises(ValueError):
        sp.variant_for("svd", False)


# --- cameras ------------------------------------------------------------------------------------
def test_sv4d_cameras_are_the_subsampled_sv3d_orbit():
    """Script: azimuths_deg = linspace(0, 360, 22)[1:] % 360, azimuths_rad = (a - a[-1]) % 360,
    novel views azimuths_rad[subsampled[1:]] - azimuths_rad[0]; polars deg2rad(90 - 10)."""
    a = np.linspace(0, 360, 22)[1:] % 360
    a_rad = np.array([np.deg2rad((x - a[-1]) % 360) for x in a])
    sub = np.array([0, 2, 5, 7, 9, 12, 14, 16, 19])
    want_az = (a_rad[sub[1:]] - a_rad[0]) % (2 * np.pi)
    polar, az = sp.camera_radians(sp.VARIANTS["sv4d"], 10.0)
    assert np.allclose(az.numpy(), want_az, atol=1e-6)
    assert np.allclose(polar.numpy(), np.deg2rad(80.0), atol=1e-6)


@pytest.mark.parametrize("name,elev", [("sv4d2", 0.0), ("sv4d2_8views", 0.0), ("sv4d2", 15.0)])
def test_sv4d2_cameras_follow_the_script(name, elev):
    """Script: azimuths [0,60,...] or [0,30,75,...], azimuths_rad = (a - a[-1]) % 360, novel views
    minus view 0; polars = (polar - polar_v0 + pi/2) % 2pi with the input view at elevation 0."""
    a = np.array([0, 60, 120, 180, 240]) if name == "sv4d2" else np.array([0, 30, 75, 120, 165, 210, 255, 300, 330])
    a_rad = np.array([np.deg2rad((x - a[-1]) % 360) for x in a])
    want_az = (a_rad[1:] - a_rad[0]) % (2 * np.pi)
    polars = np.array([np.deg2rad(90 - e) for e in [0.0] + [elev] * (len(a) - 1)])
    want_polar = (polars[1:] - polars[0] + np.pi / 2) % (2 * np.pi)
    polar, az = sp.camera_radians(sp.VARIANTS[name], elev)
    assert np.allclose(az.numpy(), want_az, atol=1e-6) and np.allclose(polar.numpy(), want_polar, atol=1e-6)


def test_sv3d_views_roll_and_subsample():
    """Script: images_t0 = roll(sv3d, 1); views = images_t0[[0, 2, 5, ...]]."""
    sv3d = torch.arange(21)
    rolled = torch.roll(sv3d, 1, 0)
    want = rolled[list(sp.SV3D_SUBSAMPLE)].tolist()
    assert [int(sv3d[i]) for i in sp.sv3d_reference_views(21)] == want == [20, 1, 4, 6, 8, 11, 13, 15, 18]
    assert sp.sv3d_reference_views(9) == list(range(9))
    assert sp.sv3d_reference_views(8)[1:] == list(range(8))
    with pytest.raises(ValueError, match="21"):
        sp.sv3d_reference_views(12)


# --- guidance and sigmas ------------------------------------------------------------------------
def test_linear_guider_scales():
    s = sp.guidance_scales("linear", 12, 4, 2.0, 1.0)
    assert s.shape == (48,) and torch.allclose(s, torch.linspace(1.0, 2.0, 48))


def test_spatiotemporal_guider_scales_equal_the_formula():
    """sgm SpatiotemporalPredictionGuider: zeros(T, V) + linspace(0,1,T)[:,None]*0.5 +
    tri(linspace(0,1,V))[None]*0.5, tri(u) = 2|u/1 - floor(u/1 + 0.5)|, scaled to [min, max]."""
    T, V, mx, mn = 5, 8, 2.5, 1.5
    s = sp.guidance_scales("spatiotemporal", T, V, mx, mn).view(T, V)
    for t in range(T):
        for v in range(V):
            u = v / (V - 1)
            tri = 2 * abs(u - math.floor(u + 0.5))
            want = (0.5 * t / (T - 1) + 0.5 * tri) * (mx - mn) + mn
            assert s[t, v].item() == pytest.approx(want, abs=1e-6)
    assert s.min() >= mn - 1e-6 and s.max() <= mx + 1e-6
    with pytest.raises(ValueError):
        sp.guidance_scales("vanilla", T, V, mx, mn)


def test_frame_permutation_reverses_frames_keeps_views():
    p = sp.frame_permutation(3, 2, True)
    assert p.tolist() == [4, 5, 2, 3, 0, 1]
    assert sp.frame_permutation(3, 2, False).tolist() == list(range(6))


def test_edm_sigmas_and_step_index():
    s = sp.edm_sigmas(20)
    assert s.shape == (21,) and s[-1] == 0
    assert s[0].item() == pytest.approx(700.0, rel=1e-5) and s[-2].item() == pytest.approx(0.002, rel=1e-5)
    assert torch.all(s[:-1] > s[1:])
    assert [sp.step_index(float(x), s) for x in s[:-1]] == list(range(20))
    assert sp.step_index(float(s[3] * 0.9), s) == 3  # between entries: the earlier step
    assert sp.step_index(1.0, None) == 0
