"""What a training run is: the model config it trains, the optimiser, the noise and the data."""
from __future__ import annotations

from dataclasses import dataclass

from ..models.scm_net import CONFIGS, SCMNetConfig
from ..plain import PlainData

DATA_DESCRIPTION = (
    "turbo_core.data.synth4d procedural scenes (floor disc, sky gradient, 1-3 moving textured "
    "spheres/ellipsoids/boxes), rendered on the fly; training seeds 0..999999; V in {views}, "
    "F in {frames}; reference view 0, cameras relative to it; {p:.0%} of scenes on the default orbit "
    "(elevation 20 deg, azimuth 360*v/V), the rest with random elevation {el} deg, start azimuth and span")



@dataclass(frozen=True)
class TrainConfig(PlainData):
    model: str = "default"            # key of models.scm_net.CONFIGS
    images_per_step: int = 512        # scenes per step = images_per_step // (V * F), at least 1
    total_steps: int = 20_000         # length of the learning-rate schedule; training stops there
    lr: float = 6e-4
    min_lr_ratio: float = 0.05        # cosine decays to lr * this
    warmup_steps: int = 300
    weight_decay: float = 0.01        # on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_mean: float = -1.0              # training noise levels: log sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.4
    cond_dropout: float = 0.1
    views: tuple = (2, 3, 4, 6)
    frames: tuple = (4, 6, 8, 12)
    default_camera_prob: float = 0.6  # otherwise random elevation, start azimuth and span
    elevation_range: tuple = (0.0, 40.0)
    seed: int = 0
    schedule_start: int = 0           # step where warm-up and cosine begin (a warm start restarts them)
    data_parallel: int = 1            # processes, each rendering images_per_step images of its own a step

    def __post_init__(self):
        if self.model not in CONFIGS:
            raise ValueError(f"unknown model config {self.model!r}; pick one of {sorted(CONFIGS)}")
        if self.images_per_step < 1 or self.total_steps < 1:
            raise ValueError("images_per_step (--batch) and total_steps (--steps) must be >= 1")

    def describe_data(self) -> str:
        return DATA_DESCRIPTION.format(views=list(self.views), frames=list(self.frames),
                                       p=self.default_camera_prob, el=list(self.elevation_range))


def grid_choices(tcfg: TrainConfig, mcfg: SCMNetConfig):
    views = [v for v in tcfg.views if 1 <= v <= mcfg.max_views]
    frames = [f for f in tcfg.frames if 1 <= f <= mcfg.max_frames]
    if not views or not frames:
        raise ValueError(f"no V x F grid of views {tcfg.views} x frames {tcfg.frames} fits the model's "
                         f"max_views={mcfg.max_views}, max_frames={mcfg.max_frames}")
    return views, frames
