"""The SV4D reference scripts' input preparation (turbo_core/sv4d_input.py): one square box around
the frame centre holding every frame's non-white (or non-transparent) object, padded so the box
is the variant's frame ratio of the frame, alpha over white, Lanczos resize; and the variants'
reference settings (elevation, guidance, frame ratio) as the scripts set them."""
import numpy as np
import pytest
import torch
from PIL import Image

from turbo_core import sampling_plans as sp
from turbo_core.sv4d_input import lanczos_resize, object_box, prepare_sv4d_input


def white(n, h, w, c=3):
    return torch.ones(n, h, w, c)


def dark_box(out: torch.Tensor, level: float = 0.5):
    """(y0, x0, y1, x1) of the pixels darker than `level` in an (H, W, 3) image."""
    m = out.mean(-1) < level
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def test_object_box_is_the_union_of_every_frames_non_white_pixels():
    v = white(3, 50, 60)
    v[0, 10:20, 5:9] = 0.2
    v[2, 30:41, 40:50] = 0.0
    v[1, 0:50, 0:60] = 250 / 255  # the scripts' "white" is a channel mean above 250 of 255: this is dark
    assert object_box(v[[0, 2]]) == (10, 5, 41, 50)
    assert object_box(v) == (0, 0, 50, 60)
    v[1] = 251 / 255
    assert object_box(v) == (10, 5, 41, 50)
    assert object_box(white(2, 8, 8)) == (0, 0, 0, 0)


@pytest.mark.parametrize("ratio", [0.917, 0.9])
def test_object_fills_the_frame_ratio_of_the_prepared_frame(ratio):
    """A 200 x 200 white frame with a black rectangle rows 70..130, columns 60..140: the box around
    the centre (100, 100) has half side 40 (rows 60..140, columns 60..140); padded to
    int(80 / ratio) and resized to 176, the rectangle spans 80 / side of the frame's width."""
    v = white(2, 200, 200)
    v[:, 70:130, 60:140] = 0.0
    out = prepare_sv4d_input(v, 176, ratio)
    assert out.shape == (2, 176, 176, 3)
    side = int(80 / ratio)
    scale, off = 176 / side, side // 2 - 40  # the box's corner in the padded square (whole pixels)
    expect = ((off + 10) * scale, off * scale, (off + 70) * scale, (off + 80) * scale)
    got = dark_box(out[0])
    assert all(abs(g - e) <= 1 for g, e in zip(got, expect)), (got, expect)
    assert out[0, :18].min() > 0.99 and out[0, -18:].min() > 0.99  # the padding is white
    torch.testing.assert_close(out[0], out[1])


def test_box_is_centred_on_the_frame_not_the_object():
    """An object in the right half of a frame: the box is symmetric about the frame's centre, so
    the object stays right of the prepared frame's centre (the scripts assume a centred object)."""
    v = white(1, 100, 100)
    v[:, 45:55, 70:90] = 0.0
    out = prepare_sv4d_input(v, 100, 1.0)[0]  # half side 40 around (50, 50): an 80 px box to 100 px
    y0, x0, y1, x1 = dark_box(out)
    assert abs(x0 - (70 - 10) * 100 / 80) <= 1 and abs(x1 - (90 - 10) * 100 / 80) <= 1
    assert abs(y0 - (45 - 10) * 100 / 80) <= 1 and abs(y1 - (55 - 10) * 100 / 80) <= 1


def test_box_past_a_wide_frames_edges_is_white():
    """A 100 x 300 frame with an object across columns 20..280: the box (half side 130) is taller
    than the frame; the rows beyond it are white, the frame sits in the middle."""
    v = torch.full((1, 100, 300, 3), 0.3)  # grey everywhere: the object is the whole frame
    out = prepare_sv4d_input(v, 260, 1.0)[0]  # box 300 x 300 -> 260: scale 260/300
    band = 100 * 260 / 300
    top = (260 - band) / 2
    assert out[: int(top) - 2].min() > 0.99 and out[int(top + band) + 3:].min() > 0.99
    mid = out[int(top) + 3: int(top + band) - 3]
    torch.testing.assert_close(mid, torch.full_like(mid, 0.3), atol=2e-3, rtol=0)


def test_rgba_alpha_is_composited_over_white_and_sets_the_box():
    """RGBA: black colour everywhere, opaque in a square, half transparent in a strip, transparent
    elsewhere: transparent -> white, half -> grey 0.5, and the box is the non-transparent pixels."""
    v = torch.zeros(1, 64, 64, 4)
    v[0, 24:40, 24:40, 3] = 1.0
    v[0, 26:38, 16:24, 3] = 0.5
    assert object_box(v) == (24, 16, 40, 40)
    out = prepare_sv4d_input(v, 64, 1.0)[0]  # half side 16 around (32, 32): 32 px box -> 64 px
    assert out[0:4].min() > 0.99 and out[-4:].min() > 0.99
    assert out[20:44, 20:44].max() < 0.05                       # the opaque square, doubled
    assert abs(float(out[28:36, 2:8].mean()) - 0.5) < 0.02      # the half-transparent strip


def test_lanczos_resize_equals_pil_lanczos():
    """The scripts resize with PIL's Image.LANCZOS: ours agrees to PIL's 8-bit rounding, down and
    up, on a smooth image, and keeps a constant image constant."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 90), torch.linspace(0, 1, 70), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(9 * x), 0.5 + 0.4 * torch.cos(7 * y), x * y], -1)
    u8 = (img.numpy() * 255).round().astype(np.uint8)
    src = torch.from_numpy(u8.astype(np.float32) / 255)[None]
    for h, w in ((32, 24), (150, 121), (90, 40)):
        pil = np.asarray(Image.fromarray(u8).resize((w, h), Image.LANCZOS)).astype(np.float32) / 255
        ours = lanczos_resize(src, h, w)[0].clamp(0, 1).numpy()
        assert np.abs(pil - ours).max() <= 2.5 / 255, (h, w, np.abs(pil - ours).max())
    const = torch.full((1, 37, 53, 3), 0.25)
    torch.testing.assert_close(lanczos_resize(const, 20, 29), torch.full((1, 20, 29, 3), 0.25))


def test_bad_video_and_ratio_are_refused_with_the_input_named():
    with pytest.raises(ValueError, match="IMAGE batch"):
        prepare_sv4d_input(torch.ones(8, 8, 3), 64, 0.9)
    with pytest.raises(ValueError, match="frame_ratio"):
        prepare_sv4d_input(white(1, 8, 8), 64, 1.5)


def test_variants_carry_the_scripts_reference_settings():
    """simple_video_sample_4d.py: elevation 10, cfg 2.0 (spatiotemporal, min 1.0), frame ratio
    0.917; simple_video_sample_4d2.py: elevation 0, frame ratio 0.9, sv4d2 linear max 2.0 (its
    min_cfg option is never passed to the linear guider, which starts at 1.0), sv4d2_8views
    spatiotemporal 2.5 / 1.5."""
    v = sp.VARIANTS
    assert (v["sv4d"].elevation, v["sv4d"].cfg, v["sv4d"].min_cfg, v["sv4d"].frame_ratio) == (10.0, 2.0, 1.0, 0.917)
    assert (v["sv4d2"].elevation, v["sv4d2"].cfg, v["sv4d2"].min_cfg, v["sv4d2"].frame_ratio) == (0.0, 2.0, 1.0, 0.9)
    e = v["sv4d2_8views"]
    assert (e.elevation, e.cfg, e.min_cfg, e.frame_ratio) == (0.0, 2.5, 1.5, 0.9)
