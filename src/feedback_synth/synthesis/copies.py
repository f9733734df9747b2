"""What a copy is: the one definition that the ``near_copy`` filter, the near-copy measure
(``synthesis.gap.near_copy_share``) and the adaptation guard (``generation.adapt``) share
(docs/method.md: Copies).

A synthetic image of class c is a *near-copy* when its nearest real training image of class c is
closer, in pixels (L2 over [0, 1] intensities), than ``copy_threshold``: the median
nearest-neighbour distance among the real training images of one class, over the classes with at
least ``min_images`` images (the typical distance between two *different* real images of a class).
The threshold is chosen on the data, never a constant: a synthetic image closer to a training image
than half of the real images are to their nearest other real image adds that training image again,
not a new one. A class with too few images has no neighbour distances of its own, hence the
classes with enough images; if no class has ``min_images``, all pairs across classes are used.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

MIN_IMAGES = 5  # classes with at least this many real images set the threshold


def flat(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, H*W*C) in [0, 1]."""
    return images.reshape(len(images), int(np.prod(images.shape[1:]))).astype(np.float32) / 255.0


def nn_distances(a: np.ndarray, b: np.ndarray, same: bool = False) -> np.ndarray:
    """For each row of ``a``, the L2 distance to its nearest row of ``b`` (itself excluded if ``same``);
    inf where ``b`` is empty."""
    if not len(b):
        return np.full(len(a), np.inf, np.float32)
    d = torch.cdist(torch.from_numpy(a), torch.from_numpy(b))
    if same:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values.numpy()


def copy_threshold(real: np.ndarray, labels: np.ndarray, min_images: int = MIN_IMAGES) -> float:
    """The median nearest-neighbour pixel distance among real images of one class, over the classes
    with at least ``min_images`` images."""
    x = flat(real)
    dists = [nn_distances(x[labels == c], x[labels == c], same=True)
             for c in np.unique(labels) if (labels == c).sum() >= min_images]
    if not dists:  # every class is tiny: fall back to all pairs across classes
        return float(np.median(nn_distances(x, x, same=True)))
    return float(np.median(np.concatenate(dists)))


def nearest_real(synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray,
                 real_labels: np.ndarray) -> np.ndarray:
    """Per synthetic image, the pixel distance to the nearest real image of its class (inf: none)."""
    xs, xr = flat(synthetic), flat(real)
    out = np.full(len(xs), np.inf, np.float32)
    for c in np.unique(synthetic_labels):
        s = synthetic_labels == c
        out[s] = nn_distances(xs[s], xr[real_labels == c])
    return out


def is_near_copy(synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                 threshold: Optional[float] = None) -> np.ndarray:
    """True for each synthetic image closer to a real training image of its class than
    ``threshold`` (default: ``copy_threshold`` of the real images)."""
    if threshold is None:
        threshold = copy_threshold(real, real_labels)
    return nearest_real(synthetic, synthetic_labels, real, real_labels) < threshold


def share_per_class(copies: np.ndarray, labels: np.ndarray, num_classes: int) -> list[Optional[float]]:
    """The near-copy share of each class (None where a class has no image)."""
    return [float(copies[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]


def classes_above(per_class: Sequence[Optional[float]], class_names: Sequence[str], share: float) -> list[str]:
    """'name (share%)' for each class whose near-copy share exceeds ``share``."""
    return [f"{class_names[c]} ({v:.0%})" for c, v in enumerate(per_class) if v is not None and v > share]
