"""Feedback criteria C(f(x)), maximised by the guidance (docs/method.md: Feedback criteria).

A small registry in timm's ``@register_model`` style: adding a criterion is one decorated function
``fn(features, logits, labels, stats) -> per-sample values``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from feedback_synth.plugins import Registry

CriterionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional["ClassStats"]], torch.Tensor]
CRITERIA = Registry("criterion", extra=("none",))  # 'none' in a config: unguided generation
register_criterion = CRITERIA.register


@dataclass
class ClassStats:
    """Class-conditional Gaussians of the frozen classifier's penultimate features.

    ``means``: (C, D) per-class means; ``precision``: (D, D) inverse of the shared, shrunk
    covariance. ``real_distances``: per class, the sorted squared Mahalanobis distances of held-out
    real images to their class mean (the yardstick of the ``off_support`` filter; the training
    images' own when ``held_out`` is False).
    """

    means: torch.Tensor
    precision: torch.Tensor
    shrinkage: float
    real_distances: dict[int, np.ndarray]
    train_counts: list[int] = field(default_factory=list)  # images per class behind each mean
    held_out: bool = True  # real_distances come from held-out (validation) images, not the training ones

    def mahalanobis_sq(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = feats - self.means.to(feats)[labels.to(feats.device)]
        return ((d @ self.precision.to(feats)) * d).sum(dim=1)


def get_criterion(name: str) -> CriterionFn:
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion '{name}'; known: {', '.join(CRITERIA)}")
    return CRITERIA[name]


@register_criterion("loss")
def loss_criterion(feats, logits, labels, stats=None):
    """Cross-entropy of the classifier's logits against the intended class."""
    return F.cross_entropy(logits, labels, reduction="none")


@register_criterion("entropy")
def entropy_criterion(feats, logits, labels, stats=None):
    """Entropy of softmax(f(x)): H(p) = -sum_k p_k log p_k."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


@register_criterion("hardness")
def hardness_criterion(feats, logits, labels, stats=None):
    """Negative log-likelihood of the features under N(mu_y, Sigma), up to a constant:
    0.5 * (h - mu_y)^T Sigma^-1 (h - mu_y)."""
    if stats is None:
        raise ValueError("the 'hardness' criterion needs the class statistics of the feedback stage")
    return 0.5 * stats.mahalanobis_sq(feats, labels)
