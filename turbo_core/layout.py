"""SCMLayout: where every token of a V-view x F-frame grid lives, and the three attention views of it.

The core keeps one order everywhere: images are stacked (batch, frame, view), frame-major, which is
SV4D's own `(b, t, v)` order, so SV4D checkpoints need no conversion. A token tensor is
`(batch * frames * views, tokens, channels)` ("image-major"). Each attention axis sees it as
`(sequences, length, channels)`:

- spatial: one sequence per image, over its h*w tokens;
- camera:  one sequence per (batch, frame, token), over the V views;
- motion:  one sequence per (batch, view, token), over the F frames.

Every sequence of an axis is independent of the others, which is what lets the accelerators compute
any subset of them (gather, attend, scatter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

AXES = ("spatial", "camera", "motion")
# The sub-attentions of a joint-attention video DiT (TrajectoryCrafter's CogVideoX): see JointLayout.
JOINT_AXES = ("joint", "perceiver")


@dataclass(frozen=True)
class SCMLayout:
    batch: int
    views: int
    frames: int
    height: int  # token grid, not pixels
    width: int

    axes: ClassVar[tuple] = AXES  # the sub-attentions a dispatch over this layout routes

    def __post_init__(self):
        for name in ("batch", "views", "frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SCMLayout.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_images(cls, n_images: int, views: int, frames: int, height: int, width: int) -> "SCMLayout":
        """Infers the batch from a stacked image count (ComfyUI stacks cond and uncond)."""
        if views < 1 or frames < 1:
            raise ValueError(f"views and frames must be >= 1, got views={views}, frames={frames}")
        if n_images % (views * frames) != 0:
            raise ValueError(
                f"{n_images} images cannot be a grid of {views} views x {frames} frames: the image count "
                f"must be a multiple of views*frames={views * frames}. Check the V and F you set."
            )
        return cls(n_images // (views * frames), views, frames, height, width)

    @property
    def images(self) -> int:
        return self.batch * self.frames * self.views

    @property
    def tokens(self) -> int:
        return self.height * self.width

    def axis_shape(self, axis: str) -> tuple[int, int]:
        """(number of sequences, sequence length) of an axis."""
        b, f, v, n = self.batch, self.frames, self.views, self.tokens
        if axis == "spatial":
            return b * f * v, n
        if axis == "camera":
            return b * f * n, v
        if axis == "motion":
            return b * v * n, f
        raise ValueError(f"unknown SCM axis {axis!r}; expected one of {AXES}")

    # --- reshapes -------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != self.images or x.shape[1] != self.tokens:
            raise ValueError(
                f"token tensor of shape {tuple(x.shape)} does not match {self}: expected "
                f"({self.images}, {self.tokens}, channels)"
            )
        return x.view(self.batch, self.frames, self.views, self.tokens, x.shape[-1])

    def to_axis(self, x: torch.Tensor, axis: str) -> torch.Tensor:
        """Image-major tokens -> (sequences, length, channels) for `axis`."""
        if axis == "spatial":
            self._grid(x)
            return x
        g = self._grid(x)
        c = x.shape[-1]
        if axis == "camera":  # (b, f, n, v, c)
            return g.permute(0, 1, 3, 2, 4).reshape(-1, self.views, c)
        if axis == "motion":  # (b, v, n, f, c)
            return g.permute(0, 2, 3, 1, 4).reshape(-1, self.frames, c)
        raise ValueError(f"unknown SCM axis {axis!r}; expected one of {AXES}")

    def from_axis(self, s: torch.Tensor, axis: str) -> torch.Tensor:
        """Inverse of `to_axis`: exact, it only moves elements."""
        b, f, v, n = self.batch, self.frames, self.views, self.tokens
        c = s.shape[-1]
        if axis == "spatial":
            return s
        if axis == "camera":
            return s.view(b, f, n, v, c).permute(0, 1, 3, 2, 4).reshape(b * f * v, n, c)
        if axis == "motion":
            return s.view(b, v, n, f, c).permute(0, 3, 1, 2, 4).reshape(b * f * v, n, c)
        raise ValueError(f"unknown SCM axis {axis!r}; expected one of {AXES}")

    def axis_view(self, x: torch.Tensor, axis: str) -> torch.Tensor:
        """The camera or motion sequences of image-major tokens (N, tokens, c) as a strided view
        (G, L, R, c), no copy: sequence (g, r) holds elements [g, :, r], and the sequences in (g, r)
        order are `to_axis`'s. camera: (b*f, v, tokens); motion: (b, f, v*tokens). The short-axis
        kernel (turbo_core/kernels) reads q, k, v and writes its output through such views."""
        self._grid(x)
        b, f, v, n, c = self.batch, self.frames, self.views, self.tokens, x.shape[-1]
        if axis == "camera":
            return x.view(b * f, v, n, c)
        if axis == "motion":
            return x.view(b, f, v * n, c)
        raise ValueError(f"axis_view is for the camera and motion axes, got {axis!r}")

    # --- which sequences belong to which view / frame -----------------------------------------
    def sequence_groups(self, axis: str, device=None) -> torch.Tensor:
        """For each sequence of `axis`, the index of the slice it belongs to, for rolling refresh:
        spatial -> frame*views + view (its image within a batch item), camera -> frame, motion -> view."""
        b, f, v, n = self.batch, self.frames, self.views, self.tokens
        if axis == "spatial":
            return torch.arange(f * v, device=device).repeat(b)
        if axis == "camera":
            return torch.arange(f, device=device).repeat_interleave(n).repeat(b)
        if axis == "motion":
            return torch.arange(v, device=device).repeat_interleave(n).repeat(b)
        raise ValueError(f"unknown SCM axis {axis!r}; expected one of {AXES}")

    def group_count(self, axis: str) -> int:
        return {"spatial": self.frames * self.views, "camera": self.frames, "motion": self.views}[axis]

    def sequence_token_index(self, axis: str, device=None) -> torch.Tensor:
        """For each sequence of a camera/motion axis, its spatial token position (0..h*w-1)."""
        b, f, v, n = self.batch, self.frames, self.views, self.tokens
        if axis == "camera":
            return torch.arange(n, device=device).repeat(b * f)
        if axis == "motion":
            return torch.arange(n, device=device).repeat(b * v)
        raise ValueError(f"sequence_token_index is for the camera and motion axes, got {axis!r}")

    def token_rows(self, pos: torch.Tensor) -> torch.Tensor:
        """Rows of the flattened image-major tokens (images * tokens, c) that hold token positions
        `pos` ((batch, k), the same positions in every image of a batch item), image by image:
        index_select with them gathers an (images, k, c) tensor, index_copy_ scatters one back."""
        if pos.dim() != 2 or pos.shape[0] != self.batch:
            raise ValueError(f"token positions must be (batch={self.batch}, k), got {tuple(pos.shape)}")
        per_item = self.frames * self.views
        base = torch.arange(self.images, device=pos.device) * self.tokens            # (images,)
        k = pos.shape[1]
        per_image = pos[:, None, :].expand(self.batch, per_item, k).reshape(self.images, k)
        return (base[:, None] + per_image).reshape(-1)

    # --- image order helpers ------------------------------------------------------------------
    def frame_index(self, device=None) -> torch.Tensor:
        """Frame of each stacked image."""
        return torch.arange(self.frames, device=device).repeat_interleave(self.views).repeat(self.batch)

    def view_index(self, device=None) -> torch.Tensor:
        """View of each stacked image."""
        return torch.arange(self.views, device=device).repeat(self.batch * self.frames)


@dataclass(frozen=True)
class JointLayout:
    """The tokens of one call of a joint-attention video DiT (TrajectoryCrafter's CogVideoX): per
    batch item, `text` text tokens followed by the video tokens in (frame, row, column) order, and
    `ref_tokens` reference tokens the perceiver attends to. There is no view axis and no per-image
    attention: spatial and motion are one attention over all tokens. Axes:

    - joint: one sequence per batch item over its text + video tokens (the DiT self-attention);
    - perceiver: one sequence per batch item over its video tokens, the queries of the
      cross-attention to the reference tokens (keys/values constant over the run).

    A sequence is a whole batch item, so an accelerator narrowing an axis to a subset of its
    sequences narrows it to batch items (e.g. one CFG half)."""

    batch: int
    text: int
    frames: int   # latent frames
    height: int   # token grid, not pixels
    width: int
    ref_tokens: int = 0

    axes: ClassVar[tuple] = JOINT_AXES

    def __post_init__(self):
        for name in ("batch", "frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"JointLayout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text", "ref_tokens"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"JointLayout.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def images(self) -> int:
        """Latent frames over the batch (what a bypassed block leaves untouched, for the stats)."""
        return self.batch * self.frames

    def axis_shape(self, axis: str) -> tuple[int, int]:
        """(number of sequences, sequence length) of an axis; the perceiver's length is its queries'."""
        if axis == "joint":
            return self.batch, self.text + self.video_tokens
        if axis == "perceiver":
            return self.batch, self.video_tokens
        raise ValueError(f"unknown joint-DiT axis {axis!r}; expected one of {JOINT_AXES}")
