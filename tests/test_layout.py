"""SCMLayout reshapes: exact round trips, and each axis groups exactly the tokens it should."""
import pytest
import torch

from turbo_core.layout import AXES, SCMLayout


@pytest.mark.parametrize("b,v,f,h,w", [(1, 4, 8, 4, 4), (2, 3, 5, 2, 3), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("axis", AXES)
def test_round_trip_is_exact(b, v, f, h, w, axis):
    lay = SCMLayout(b, v, f, h, w)
    x = torch.randn(lay.images, lay.tokens, 7)
    s = lay.to_axis(x, axis)
    assert s.shape[:2] == lay.axis_shape(axis)
    assert torch.equal(lay.from_axis(s, axis), x)


def test_axes_group_the_right_tokens():
    b, v, f, h, w = 2, 3, 4, 2, 2
    lay = SCMLayout(b, v, f, h, w)
    # Encode each token's (batch, frame, view, token) in its channels.
    grid = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(f), torch.arange(v), torch.arange(h * w),
                                      indexing="ij"), -1).float()
    x = grid.reshape(lay.images, lay.tokens, 4)
    cam = lay.to_axis(x, "camera")
    # every camera sequence: same batch, frame and token, views 0..V-1 in order
    assert (cam[:, :, [0, 1, 3]] == cam[:, :1, [0, 1, 3]]).all()
    assert torch.equal(cam[:, :, 2], torch.arange(v).float().expand(cam.shape[0], v))
    mot = lay.to_axis(x, "motion")
    assert (mot[:, :, [0, 2, 3]] == mot[:, :1, [0, 2, 3]]).all()
    assert torch.equal(mot[:, :, 1], torch.arange(f).float().expand(mot.shape[0], f))
    # groups used for rolling refresh: frame for camera, view for motion, image for spatial
    assert torch.equal(lay.sequence_groups("camera").float(), cam[:, 0, 1] + 0)
    assert torch.equal(lay.sequence_groups("motion").float(), mot[:, 0, 2] + 0)
    sp = lay.to_axis(x, "spatial")
    assert torch.equal(lay.sequence_groups("spatial").float(), sp[:, 0, 1] * v + sp[:, 0, 2])
    assert torch.equal(lay.sequence_token_index("camera").float(), cam[:, 0, 3])
    assert torch.equal(lay.frame_index().float(), x[:, 0, 1])
    assert torch.equal(lay.view_index().float(), x[:, 0, 2])


def test_bad_grids_are_named():
    with pytest.raises(ValueError, match="multiple of views\\*frames"):
        SCMLayout.from_images(10, views=4, frames=2, height=2, width=2)
    with pytest.raises(ValueError, match="views"):
        SCMLayout(1, 0, 2, 2, 2)
    lay = SCMLayout(1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="does not match"):
        lay.to_axis(torch.zeros(3, 4, 1), "camera")
