"""Filtering of synthetic images: a registry of filters, each reporting per class what it dropped.

Off by default where a filter would undo the guidance: there is no "confidence" filter, since
the guidance deliberately makes samples the classifier is unsure about (DESIGN: Filtering).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from feedback_synth.config import FilterConfig
from feedback_synth.guidance.criteria import ClassStats
from feedback_synth.plugins import Registry


@dataclass
class FilterInputs:
    """What filters may look at. ``features`` are the frozen classifier's penultimate features."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray
    finite: np.ndarray  # False where generation produced NaN/inf
    features: np.ndarray
    real_features: np.ndarray
    real_labels: np.ndarray
    stats: ClassStats


# a filter returns (keep mask over the candidates it is given, reason for the dropped ones)
FilterFn = Callable[[FilterInputs, np.ndarray, FilterConfig], tuple[np.ndarray, str]]
FILTERS = Registry("filter")
register_filter = FILTERS.register


@register_filter("degenerate")
def degenerate(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> tuple[np.ndarray, str]:
    """NaN/inf images, constant images and near-black images."""
    x = inp.images[idx].reshape(len(idx), -1).astype(np.float64) / 255.0
    keep = inp.finite[idx] & (x.std(axis=1) >= cfg.flat_threshold) & (x.mean(axis=1) >= cfg.dark_threshold)
    return keep, f"NaN, constant (std < {cfg.flat_threshold}) or near-black (mean < {cfg.dark_threshold})"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@register_filter("near_duplicate")
def near_duplicate(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> tuple[np.ndarray, str]:
    """Greedy, per class: drop an image whose feature cosine to a real image of its class, or to an
    already kept synthetic one, exceeds the threshold."""
    keep = np.ones(len(idx), dtype=bool)
    feats = _unit(inp.features[idx])
    real = _unit(inp.real_features)
    labels = inp.labels[idx]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        kept = [real[inp.real_labels == c]]
        for m in members:
            ref = np.concatenate(kept) if kept else np.zeros((0, feats.shape[1]))
            if len(ref) and float((ref @ feats[m]).max()) > cfg.duplicate_cosine:
                keep[m] = False
            else:
                kept.append(feats[m:m + 1])
    return keep, f"feature cosine > {cfg.duplicate_cosine} to a real or kept synthetic image of its class"


@register_filter("off_support")
def off_support(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> tuple[np.ndarray, str]:
    """Drop images whose Mahalanobis distance to their class mean exceeds ``margin`` times the
    ``quantile`` of held-out real images' distances (the validation split when the dataset has one,
    else the training images; pooled over classes: the covariance is shared, and few-shot classes
    have too few real images for a quantile of their own)."""
    real = np.concatenate(list(inp.stats.real_distances.values()))
    limit = cfg.support_margin * float(np.quantile(real, cfg.support_quantile))
    d = inp.stats.mahalanobis_sq(torch.from_numpy(inp.features[idx]).float(),
                                 torch.from_numpy(inp.labels[idx])).numpy()
    return d <= limit, f"Mahalanobis^2 to its class mean > {cfg.support_margin} x q{cfg.support_quantile} of real ({limit:.1f})"


def apply_filters(inp: FilterInputs, cfg: FilterConfig, class_names: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the configured filters in order; returns the keep mask and a per-class report."""
    for name in cfg.filters:
        FILTERS.check(name, "filter.filters")
    alive = np.arange(len(inp.labels))
    report: dict[str, Any] = {"filters": [], "per_class": {}}
    per_class = {name: {"generated": int((inp.labels == c).sum()), "kept": 0, "dropped": {}}
                 for c, name in enumerate(class_names)}
    for name in cfg.filters:
        keep, reason = FILTERS[name](inp, alive, cfg)
        dropped = alive[~keep]
        report["filters"].append({"name": name, "reason": reason, "dropped": int(len(dropped))})
        for c, cname in enumerate(class_names):
            per_class[cname]["dropped"][name] = int((inp.labels[dropped] == c).sum())
        alive = alive[keep]
    mask = np.zeros(len(inp.labels), dtype=bool)
    mask[alive] = True
    for c, cname in enumerate(class_names):
        per_class[cname]["kept"] = int((inp.labels[alive] == c).sum())
    report["per_class"] = per_class
    report["generated"] = int(len(inp.labels))
    report["kept"] = int(mask.sum())
    return mask, report
