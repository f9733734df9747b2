"""Training losses for imbalanced data, in a registry shared by baseline training and retraining.

Each loss maps one batch to per-sample losses. The adjusted losses add a log class prior to the
logits while training only (predictions use the raw logits), which targets a class-balanced test:

    ce                CE(z, y)
    logit_adjusted    CE(z + tau * log p, y)         Menon et al. 2021, "Long-tail learning via logit adjustment"
    balanced_softmax  CE(z + log p, y)               Ren et al. 2020, "Balanced Meta-Softmax" (eq. 4: the
                                                     softmax of the balanced posterior; = logit_adjusted at tau 1)
    group_reweighted  w * CE(z, y), w = 1 / n(class, group) of the sample's cell (real samples; 1 for synthetic)

p is the class prior of the training stream (``class_prior``): the real training counts, or, once
synthetic images are mixed in, optionally the expected class mix of a batch (docs/method.md,
"Balanced retraining").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from feedback_synth.plugins import Registry


@dataclass
class LossInputs:
    logits: torch.Tensor  # (B, C) raw logits
    targets: torch.Tensor  # (B,) class indices
    log_prior: torch.Tensor  # (C,) log class prior of the training stream
    sample_weights: torch.Tensor  # (B,) inverse (class, group) cell frequency of real samples, 1 for synthetic
    tau: float = 1.0  # logit_adjusted's temperature


LossFn = Callable[[LossInputs], torch.Tensor]
LOSSES = Registry("loss")
register_loss = LOSSES.register


@register_loss("ce")
def cross_entropy(b: LossInputs) -> torch.Tensor:
    return F.cross_entropy(b.logits, b.targets, reduction="none")


@register_loss("logit_adjusted")
def logit_adjusted(b: LossInputs) -> torch.Tensor:
    """Menon et al. 2021, eq. 10: the logit-adjusted softmax cross-entropy with temperature tau."""
    return F.cross_entropy(b.logits + b.tau * b.log_prior, b.targets, reduction="none")


@register_loss("balanced_softmax")
def balanced_softmax(b: LossInputs) -> torch.Tensor:
    """Ren et al. 2020, eq. 4: p_j n_j / sum_k p_k n_k, i.e. softmax(z + log n), as a loss."""
    return F.cross_entropy(b.logits + b.log_prior, b.targets, reduction="none")


@register_loss("group_reweighted")
def group_reweighted(b: LossInputs) -> torch.Tensor:
    """Cross-entropy weighted by the inverse frequency of each real sample's (class, group) cell."""
    return b.sample_weights * F.cross_entropy(b.logits, b.targets, reduction="none")


def cell_weights(labels: np.ndarray, groups: np.ndarray, num_classes: int, num_groups: int) -> torch.Tensor:
    """Per-sample weights 1 / n(cell) of each sample's (class, group) cell, normalised to mean 1."""
    cell = labels * num_groups + groups
    counts = np.bincount(cell, minlength=num_classes * num_groups).astype(np.float64)
    w = 1.0 / counts[cell]
    return torch.from_numpy(w / w.mean()).float()


def class_prior(real_counts: np.ndarray, synthetic_counts: Optional[np.ndarray] = None,
                synthetic_fraction: float = 0.0, mode: str = "real",
                real_sampling: Optional[np.ndarray] = None) -> np.ndarray:
    """The class prior p of the adjusted losses.

    ``real``: the real training counts, normalised. ``batch``: the expected class mix of a training
    batch, (1 - f) * p_real + f * p_synthetic, where f is ``synthetic_fraction`` and p_real is how
    real samples are drawn (``real_sampling``, e.g. uniform under a balanced sampler; the counts by
    default). Without synthetic images both are the same.
    """
    p_real = np.asarray(real_counts, np.float64) / max(float(np.sum(real_counts)), 1.0)
    if mode == "real" or synthetic_counts is None or np.sum(synthetic_counts) == 0 or synthetic_fraction == 0:
        return p_real
    if mode != "batch":
        raise ValueError(f"unknown prior mode '{mode}' (real | batch)")
    drawn = p_real if real_sampling is None else np.asarray(real_sampling, np.float64)
    p_syn = np.asarray(synthetic_counts, np.float64) / float(np.sum(synthetic_counts))
    return (1 - synthetic_fraction) * drawn + synthetic_fraction * p_syn
