"""Filtering of synthetic images: a registry of filters, each reporting per class what it dropped.

Off by default where a filter would undo the guidance: there is no "confidence" filter, since
the guidance deliberately makes samples the classifier is unsure about (docs/method.md: Filtering).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from feedback_synth.config import FilterConfig
from feedback_synth.guidance.criteria import ClassStats
from feedback_synth.plugins import Registry
from feedback_synth.synthesis import copies

log = logging.getLogger(__name__)


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
    real_images: Optional[np.ndarray] = None  # uint8, the real training images (``near_copy``; aligned with real_labels)


@dataclass
class Verdict:
    """A filter's answer over the candidates it was given: which to keep, why the others go, and
    (for filters whose drops may be re-admitted to feed a starved class) by how much each one
    missed: ``excess`` > 0 for a dropped candidate, smaller = closer to passing."""

    keep: np.ndarray
    reason: str
    excess: Optional[np.ndarray] = None


FilterFn = Callable[[FilterInputs, np.ndarray, FilterConfig], Verdict]
FILTERS = Registry("filter")
register_filter = FILTERS.register


@register_filter("degenerate")
def degenerate(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> Verdict:
    """NaN/inf images, constant images and near-black images (never re-admitted)."""
    x = inp.images[idx].reshape(len(idx), -1).astype(np.float64) / 255.0
    keep = inp.finite[idx] & (x.std(axis=1) >= cfg.flat_threshold) & (x.mean(axis=1) >= cfg.dark_threshold)
    return Verdict(keep, f"NaN, constant (std < {cfg.flat_threshold}) or near-black (mean < {cfg.dark_threshold})")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@register_filter("near_copy")
def near_copy(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> Verdict:
    """Drop near-copies of the real training images (``synthesis.copies.is_near_copy``: closer in
    pixels to a training image of its class than the median nearest-neighbour distance among real
    images; the same definition the near-copy measure reports). Never re-admitted for a starved class:
    a near-copy adds a training image again, not a new one."""
    if inp.real_images is None:
        return Verdict(np.ones(len(idx), bool), "skipped: no real training images given")
    threshold = copies.copy_threshold(inp.real_images, inp.real_labels)
    close = copies.is_near_copy(inp.images[idx], inp.labels[idx], inp.real_images, inp.real_labels, threshold)
    return Verdict(~close, f"near-copy of a training image of its class (pixel L2 < {threshold:.3f}, the median "
                           f"nearest-neighbour distance among real images of a class)")


@register_filter("near_duplicate")
def near_duplicate(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> Verdict:
    """Duplicates among the synthetic images (copies of the real ones are ``near_copy``'s): greedy,
    per class, drop an image whose feature cosine to an already kept synthetic image of its class
    exceeds the threshold."""
    keep = np.ones(len(idx), dtype=bool)
    excess = np.zeros(len(idx))
    feats = _unit(inp.features[idx])
    labels = inp.labels[idx]
    for c in np.unique(labels):
        kept: list[np.ndarray] = []
        for m in np.flatnonzero(labels == c):
            top = float((np.concatenate(kept) @ feats[m]).max()) if kept else -1.0
            if top > cfg.duplicate_cosine:
                keep[m], excess[m] = False, top - cfg.duplicate_cosine
            else:
                kept.append(feats[m:m + 1])
    return Verdict(keep, f"feature cosine > {cfg.duplicate_cosine} to a kept synthetic image of its class", excess)


def support_limits(stats: ClassStats, cfg: FilterConfig) -> np.ndarray:
    """Per class, the largest squared Mahalanobis distance to its class mean that ``off_support`` keeps.

    The yardstick is the held-out real images (the validation split), pooled over classes (a class
    with 2 real images has no quantile of its own), after removing the one thing that depends on
    the class's size: a class mean estimated from n images lies farther from a new image, by a
    factor (1 + 1/n) in expectation (for x independent of the mean of n draws of the same Gaussian,
    E[(x - mean_n)' S^-1 (x - mean_n)] = (1 + 1/n) E[(x - mu)' S^-1 (x - mu)]). So
    limit(c) = margin * q_quantile(d_ref / (1 + 1/n_ref)) * (1 + 1/n_c).
    """
    n = np.maximum(np.asarray(stats.train_counts, np.float64), 1.0)
    ref = [d / (1 + 1 / n[c]) for c, d in stats.real_distances.items() if len(d)]
    q = float(np.quantile(np.concatenate(ref), cfg.support_quantile))
    return cfg.support_margin * q * (1 + 1 / n)


@register_filter("off_support")
def off_support(inp: FilterInputs, idx: np.ndarray, cfg: FilterConfig) -> Verdict:
    """Drop images farther from their class mean than held-out real images are (``support_limits``).

    Without held-out real images (no validation split) there is no yardstick: the classifier has
    memorised its training images, whose distances are several times smaller than an unseen real
    image's, so the filter keeps everything and says so."""
    if not inp.stats.held_out:
        return Verdict(np.ones(len(idx), bool), "skipped: no validation split to measure the support of the real "
                                                "data against (the training images are memorised)")
    limits = support_limits(inp.stats, cfg)
    d = inp.stats.mahalanobis_sq(torch.from_numpy(inp.features[idx]).float(),
                                 torch.from_numpy(inp.labels[idx])).numpy()
    limit = limits[inp.labels[idx]]
    return Verdict(d <= limit, f"Mahalanobis^2 to its class mean > {cfg.support_margin} x q{cfg.support_quantile} of "
                               f"held-out real images, x (1 + 1/n) for a mean of n images "
                               f"({limits.min():.1f} .. {limits.max():.1f})", np.maximum(d / limit - 1, 0))


def apply_filters(inp: FilterInputs, cfg: FilterConfig, class_names: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the configured filters in order; then re-admit images of starved classes; returns the
    keep mask and a per-class report.

    A class is starved when it keeps less than ``cfg.min_kept_fraction`` of its generated images:
    the synthesis is for the rare classes, whose few real images make every yardstick shaky. Its
    dropped images are re-admitted, closest to passing first (near duplicates and off-support ones;
    degenerate images never), until it reaches that share. The report says how many per class.
    """
    for name in cfg.filters:
        FILTERS.check(name, "filter.filters")
    alive = np.arange(len(inp.labels))
    report: dict[str, Any] = {"filters": [], "per_class": {}}
    per_class = {name: {"generated": int((inp.labels == c).sum()), "kept": 0, "dropped": {}, "readmitted": 0}
                 for c, name in enumerate(class_names)}
    excess = np.full(len(inp.labels), np.inf)  # how far each dropped image missed (inf: never re-admit)
    for name in cfg.filters:
        verdict = FILTERS[name](inp, alive, cfg)
        dropped = alive[~verdict.keep]
        if verdict.excess is not None:
            excess[dropped] = verdict.excess[~verdict.keep]
        report["filters"].append({"name": name, "reason": verdict.reason, "dropped": int(len(dropped))})
        for c, cname in enumerate(class_names):
            per_class[cname]["dropped"][name] = int((inp.labels[dropped] == c).sum())
        alive = alive[verdict.keep]
    mask = np.zeros(len(inp.labels), dtype=bool)
    mask[alive] = True
    starved = []
    for c, cname in enumerate(class_names):
        generated = per_class[cname]["generated"]
        floor = int(np.ceil(cfg.min_kept_fraction * generated))
        have = int(mask[inp.labels == c].sum())
        if have < floor:
            candidates = np.flatnonzero((inp.labels == c) & ~mask & np.isfinite(excess))
            chosen = candidates[np.argsort(excess[candidates], kind="stable")][:floor - have]
            mask[chosen] = True
            per_class[cname]["readmitted"] = int(len(chosen))
            if have + len(chosen) < floor:
                starved.append(cname)
        per_class[cname]["kept"] = int(mask[inp.labels == c].sum())
    report["per_class"] = per_class
    report["generated"] = int(len(inp.labels))
    report["kept"] = int(mask.sum())
    report["readmitted"] = int(sum(pc["readmitted"] for pc in per_class.values()))
    report["starved"] = starved  # still below the floor after re-admission (e.g. all degenerate)
    report.update(kept_copies(inp, mask, cfg, class_names))
    return mask, report


def kept_copies(inp: FilterInputs, mask: np.ndarray, cfg: FilterConfig, class_names: list[str]) -> dict[str, Any]:
    """The near-copy share of the kept images per class (``synthesis.copies``) and the classes above
    ``cfg.copy_share``, named in a warning (``near_copy`` off, or a user's own filter list, may keep
    copies)."""
    if inp.real_images is None:
        return {"kept_near_copy": None, "copy_classes": []}
    threshold = copies.copy_threshold(inp.real_images, inp.real_labels)
    close = copies.is_near_copy(inp.images[mask], inp.labels[mask], inp.real_images, inp.real_labels, threshold)
    per_class = copies.share_per_class(close, inp.labels[mask], len(class_names))
    above = copies.classes_above(per_class, class_names, cfg.copy_share)
    if above:
        log.warning("filter: the kept synthetic images of %d class(es) are more than %.0f%% near-copies of their "
                    "training images: %s (filter.filters: %s; add near_copy, or guard the adaptation: "
                    "adapt.copy_check_every)", len(above), 100 * cfg.copy_share, ", ".join(above),
                    ",".join(cfg.filters))
    return {"kept_near_copy": {"per_class": per_class, "threshold": threshold, "share": cfg.copy_share},
            "copy_classes": above}


def filter_table(report: dict[str, Any]) -> str:
    """The per-class kept / generated table of a filter report, in Markdown."""
    names = [f["name"] for f in report["filters"]]
    lines = ["| class | generated | kept | " + " | ".join(f"dropped: {n}" for n in names) + " | re-admitted |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for cname, pc in report["per_class"].items():
        if pc["generated"]:
            lines.append(f"| {cname} | {pc['generated']} | {pc['kept']} | "
                         + " | ".join(str(pc["dropped"].get(n, 0)) for n in names) + f" | {pc['readmitted']} |")
    return "\n".join(lines) + "\n"
