"""How far synthetic images are from the task's real ones, and whether they copy them
(docs/method.md: Adapting the generator to the task). No downloaded weights: the features are the
task's own classifier's (the baseline), the copies are measured in pixel space.

- ``off_support_rate``: per class, the share of synthetic images that the ``off_support`` filter's
  yardstick puts outside the class's real support (Mahalanobis distance under the baseline's
  features beyond what held-out real images reach).
- ``discriminator_gap``: a real-vs-synthetic two-sample test: a logistic regression on the
  baseline's features, scored on held-out folds; per class its balanced accuracy
  (0.5 = indistinguishable, 1.0 = always told apart).
- ``near_copy_share``: per class, the share of near-copies (``synthesis.copies``, the one definition
  the ``near_copy`` filter uses too): synthetic images whose nearest real training image of their
  class is closer (pixel L2) than the median nearest-neighbour distance among real images of the
  classes with at least ``min_images`` images: closer than real images are to each other.
- ``diversity``: per class, the mean pairwise pixel distance of the synthetic images over that of
  the real images of the classes with enough images (1.0 = as varied as real data).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from feedback_synth.config import FilterConfig
from feedback_synth.synthesis import copies


def _flat(images: np.ndarray) -> np.ndarray:
    return copies.flat(images)


def _nn_distances(a: np.ndarray, b: np.ndarray, same: bool = False) -> np.ndarray:
    return copies.nn_distances(a, b, same)


def real_copy_threshold(real: np.ndarray, labels: np.ndarray, min_images: int = copies.MIN_IMAGES) -> float:
    """``synthesis.copies.copy_threshold``: the median nearest-neighbour distance among real images of
    one class, over the classes with at least ``min_images`` images."""
    return copies.copy_threshold(real, labels, min_images)


def near_copy_share(synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                    num_classes: int, min_images: int = copies.MIN_IMAGES) -> dict[str, Any]:
    """Per class (None where a class has no synthetic image or no real one) and overall, the share of
    near-copies (``synthesis.copies.is_near_copy``: the definition the ``near_copy`` filter uses)."""
    threshold = copies.copy_threshold(real, real_labels, min_images)
    close = copies.is_near_copy(synthetic, synthetic_labels, real, real_labels, threshold)
    present = set(np.unique(real_labels).tolist())
    per_class = [v if c in present else None for c, v in enumerate(copies.share_per_class(close, synthetic_labels,
                                                                                          num_classes))]
    return {"per_class": per_class, "overall": float(close.mean()) if len(close) else None, "threshold": threshold}


def diversity(synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
              num_classes: int, min_images: int = 5) -> dict[str, Any]:
    """Per class, mean pairwise pixel distance of the synthetic images / that of real images."""
    def spread(x: np.ndarray) -> float:
        if len(x) < 2:
            return float("nan")
        d = torch.cdist(torch.from_numpy(x), torch.from_numpy(x))
        return float(d.sum() / (len(x) * (len(x) - 1)))

    xs, xr = _flat(synthetic), _flat(real)
    real_spreads = [spread(xr[real_labels == c]) for c in range(num_classes) if (real_labels == c).sum() >= min_images]
    reference = float(np.nanmean(real_spreads)) if real_spreads else spread(xr)
    per_class = [None if (synthetic_labels == c).sum() < 2 else spread(xs[synthetic_labels == c]) / reference
                 for c in range(num_classes)]
    values = [v for v in per_class if v is not None]
    return {"per_class": per_class, "overall": float(np.mean(values)) if values else None, "real_reference": reference}


def off_support_rate(features: np.ndarray, labels: np.ndarray, stats: Any, num_classes: int,
                     cfg: Optional[FilterConfig] = None) -> dict[str, Any]:
    """Per class, the share of images beyond the ``off_support`` filter's limit (None: no image, or
    no held-out real images to measure the support with)."""
    from feedback_synth.synthesis.filtering import support_limits

    if not stats.held_out or not len(features):
        return {"per_class": [None] * num_classes, "overall": None}
    limits = support_limits(stats, cfg or FilterConfig())
    d = stats.mahalanobis_sq(torch.from_numpy(features).float(), torch.from_numpy(labels)).numpy()
    off = d > limits[labels]
    per_class = [float(off[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"per_class": per_class, "overall": float(off.mean())}


def discriminator_gap(real_features: np.ndarray, real_labels: np.ndarray, synthetic_features: np.ndarray,
                      synthetic_labels: np.ndarray, num_classes: int, folds: int = 4, seed: int = 0) -> dict[str, Any]:
    """A real-vs-synthetic two-sample test on the classifier's features: one logistic regression over
    all classes (a class with 2 real images cannot train its own), its held-out predictions
    (``folds``-fold) scored per class as balanced accuracy: 0.5 = indistinguishable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([real_features, synthetic_features])
    y = np.concatenate([np.zeros(len(real_features), int), np.ones(len(synthetic_features), int)])
    cls = np.concatenate([real_labels, synthetic_labels])
    if min(len(real_features), len(synthetic_features)) < folds:
        return {"per_class": [None] * num_classes, "overall": None}
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
    pred = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))

    def balanced(mask: np.ndarray) -> Optional[float]:
        real, synth = mask & (y == 0), mask & (y == 1)
        if not real.any() or not synth.any():
            return None
        return float(((pred[real] == 0).mean() + (pred[synth] == 1).mean()) / 2)

    return {"per_class": [balanced(cls == c) for c in range(num_classes)], "overall": balanced(np.ones(len(y), bool))}
