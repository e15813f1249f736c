"""The V x F layout of a view-major IMAGE batch, from the node that made it to the nodes that
split it into views (Save MultiView, MultiView Preview).

An IMAGE is a plain batch: nothing in it says where one view ends and the next begins, and a
views count typed on the saving node goes stale as soon as the sampler's changes. So every node
that makes a grid (MultiView Sampler, MultiView Sampler (SV4D), MultiView Latent to Image,
Synthetic 4D Scene) outputs a `layout` beside its images, and Save / Preview split by it.

Where only the images are wired (a workflow saved before the layout socket), those nodes still
know the layout of the very batch they returned (`remember`): a views count on Save / Preview that
disagrees with it is refused instead of being written as interleaved views. A batch that went
through another node is a new batch and is split by the typed views count, as any IMAGE is.
"""
from __future__ import annotations

import weakref

from turbo_core.multiview import GridLayout

from .types import Turbo4DLayout

# id(images) -> (weak reference to images, its GridLayout). Weak, so a remembered batch is
# forgotten when ComfyUI drops it; the entry is checked against the object itself, so a reused
# id never matches.
_made: dict = {}


def layout_output(what: str) -> "Turbo4DLayout.Output":
    return Turbo4DLayout.Output("layout", display_name="layout",
                                tooltip=f"The views x frames of {what}. Connect it to the layout input of Save "
                                        f"MultiView / MultiView Preview, so they split the images into the "
                                        f"right views whatever their own views says.")


def layout_input() -> "Turbo4DLayout.Input":
    return Turbo4DLayout.Input("layout", optional=True,
                               tooltip="The views x frames of images, from the node that made them (the layout "
                                       "output of MultiView Sampler, MultiView Sampler (SV4D), MultiView Latent "
                                       "to Image or Synthetic 4D Scene). When connected, views is not used.")


VIEWS_TOOLTIP = ("V, the number of views in images (the frame count is images / V). Used only when layout is not "
                 "connected; images straight from a Turbo4D node must match that node's views.")


def remember(images, views: int, frames: int) -> GridLayout:
    """The layout of a batch this node returns, kept with the batch for as long as it lives."""
    layout = GridLayout(int(views), int(frames))
    if int(images.shape[0]) != layout.images:
        raise ValueError(f"internal: {int(images.shape[0])} images do not make a {layout} grid")
    key = id(images)
    _made[key] = (weakref.ref(images, lambda _ref, key=key: _made.pop(key, None)), layout)
    return layout


def made_as(images):
    """The GridLayout a Turbo4D node returned this very batch with, or None."""
    entry = _made.get(id(images))
    if entry is not None and entry[0]() is images:
        return entry[1]
    return None


def resolve(node: str, images, layout, views: int) -> GridLayout:
    """The V x F grid to split `images` by; refuses every way it could come out wrong."""
    n = int(images.shape[0])
    if layout is not None:
        if not isinstance(layout, GridLayout):
            raise ValueError(f"{node}: 'layout' is not a Turbo4D layout (got {type(layout).__name__}). Connect the "
                             f"layout output of the node that made the images.")
        if layout.images != n:
            raise ValueError(f"{node}: 'layout' is {layout} = {layout.images} images, but 'images' holds {n}. "
                             f"Connect images and layout from the same node.")
        return layout
    made = made_as(images)
    if made is not None and views != made.views:
        raise ValueError(f"{node}: images come from a Turbo4D node as {made}, but views={views}; split that way "
                         f"every file would mix views. Connect that node's layout output to layout (views is "
                         f"then not used), or set views to {made.views}. The sampling result is cached: queueing "
                         f"again runs only this node.")
    if made is not None:
        return made
    if views < 1 or n % views:
        raise ValueError(f"{node}: images holds {n} images, which is not a whole number of views={views} rows. "
                         f"Connect the layout output of the node that made the images, or set views to the V "
                         f"it used.")
    return GridLayout(views, n // views)
