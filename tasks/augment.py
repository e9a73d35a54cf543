"""Koch et al.'s (2015) affine distortions of training images, deterministic in (seed, step, slot).

Each image gets its own distortion: a rotation, a shear, a scale and a translation, each applied with probability
``p`` (else left at the identity) at a strength drawn uniformly within its bound. The parameters come from a
generator of the episode's key, and the geometry is torchvision's (``transforms.v2.functional.affine``), so an
augmented episode is still a pure function of (seed, step, slot) in any process. Ours is only the drawing of the
parameters from that key: torchvision's ``RandomAffine`` draws from torch's global generator, which no key controls.

Two departures from Koch et al., both from torchvision's affine: one isotropic scale where they scale x and y
separately, and the shear given as a factor here is passed to it as the angle ``atan(factor)`` in degrees.

    aug = Affine(rotation=10, shear=0.3, scale=0.2, translate=2, p=0.5)
    x = aug.apply(x, rng)          # x: (n, C, H, W) in [0, 1]; background 0 fills what moves in
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from metatrain.tasks.errors import EpisodeError
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Affine:
    """Bounds of one image's distortion; each component is applied with probability ``p``."""

    rotation: float = 10.0
    """Degrees: the angle is drawn from U(-rotation, rotation)."""
    shear: float = 0.3
    """Shear factor along x and along y, each from U(-shear, shear)."""
    scale: float = 0.2
    """Scale drawn from U(1 - scale, 1 + scale)."""
    translate: float = 2.0
    """Pixels along x and along y, each from U(-translate, translate)."""
    p: float = 0.5
    """Probability of each of the four components."""

    def __post_init__(self):
        for name in ("rotation", "shear", "scale", "translate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise EpisodeError(f"augment {name} must be a finite number >= 0, got {value!r}")
        if self.scale >= 1:
            raise EpisodeError(f"augment scale must be < 1 (the scale is drawn from 1 +- scale), got {self.scale}")
        if not 0 <= self.p <= 1:
            raise EpisodeError(f"augment p must be in [0, 1], got {self.p}")

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, 6) parameters: angle, shear x, shear y (factors), scale, translate x, translate y. Every image draws
        the same count of numbers whatever is applied, so one image's distortion never shifts another's."""
        on = rng.random((n, 4)) < self.p
        u = rng.uniform(-1.0, 1.0, (n, 6))
        bound = np.array([self.rotation, self.shear, self.shear, self.scale, self.translate, self.translate])
        params = u * bound * on[:, [0, 1, 1, 2, 3, 3]]
        params[:, 3] += 1.0
        return params

    def apply(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``x`` (n, C, H, W), each image with its own distortion; an image left at the identity is not resampled."""
        params = self.draw(rng, x.shape[0])
        out = x.clone()
        for i in np.flatnonzero((params != [0, 0, 0, 1, 0, 0]).any(axis=1)):
            angle, sx, sy, scale, tx, ty = params[i].tolist()
            out[i] = TF.affine(x[i], angle=angle, translate=[tx, ty], scale=scale,
                               shear=[math.degrees(math.atan(sx)), math.degrees(math.atan(sy))],
                               interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        return out
