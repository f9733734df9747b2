"""The gap between synthetic and real images, as the stages measure and report it
(``synthesis.gap``), and the early gap warning after filtering."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from feedback_synth.config import FilterConfig
from feedback_synth.data.imageset import ImageSet, load_info, load_split
from feedback_synth.errors import DataError

log = logging.getLogger(__name__)


def gap_report(dataset_url: str, model_url_: str, images: np.ndarray, labels: np.ndarray,
               device: str) -> dict[str, Any]:
    """The gap between synthetic ``images`` (uint8, labelled ``labels``) and the task's real images,
    per class (``synthesis.gap``): off-support rate and a real-vs-synthetic discriminator under the
    baseline's features (computed on ``device``), the near-copy share and the diversity in pixels."""
    from feedback_synth.synthesis import gap
    from feedback_synth.synthesis.feedback import extract_features, fit_class_stats
    from feedback_synth.training.classifier import load_classifier

    train = load_split(dataset_url, "train")
    clf = load_classifier(model_url_, device)
    real = load_split(dataset_url, "val") if "val" in load_info(dataset_url).splits else train
    real_feats = extract_features(clf, real)
    stats = fit_class_stats(extract_features(clf, train), train.labels, train.num_classes, -1.0,
                            (real_feats, real.labels) if real is not train else None)
    synthetic = ImageSet(images, labels, np.zeros(len(labels), np.int64), np.array([f"s{i}" for i in range(len(labels))]),
                         train.class_names, train.group_names)
    feats = extract_features(clf, synthetic)
    n = train.num_classes
    return {"off_support": gap.off_support_rate(feats, labels, stats, n),
            "discriminator": gap.discriminator_gap(real_feats, real.labels, feats, labels, n),
            "near_copy": gap.near_copy_share(images, labels, train.images, train.labels, n),
            "diversity": gap.diversity(images, labels, train.images, train.labels, n)}


def filter_gap(dataset_url: str, clf, inp, generated: ImageSet, keep: np.ndarray, train: ImageSet) -> dict[str, Any]:
    """The gap of this round's generated images to the real data, per class (``synthesis.gap``):
    the off-support share and the discriminator on all generated images, the near-copy share and
    diversity of the kept ones. Every run gets it, whatever the dataset (no oracle needed)."""
    from feedback_synth.synthesis import gap
    from feedback_synth.synthesis.feedback import extract_features

    n = train.num_classes
    out = {"off_support": gap.off_support_rate(inp.features, inp.labels, inp.stats, n)}
    if "val" in load_info(dataset_url).splits:
        val = load_split(dataset_url, "val")
        out["discriminator"] = gap.discriminator_gap(extract_features(clf, val), val.labels, inp.features, inp.labels, n)
    kept = generated.subset(np.flatnonzero(keep))
    out["near_copy"] = gap.near_copy_share(kept.images, kept.labels, train.images, train.labels, n)
    out["diversity"] = gap.diversity(kept.images, kept.labels, train.images, train.labels, n)
    return out


class GapError(DataError):
    """Most synthetic images of some classes are off the task's support (``filter.on_gap: stop``)."""


def check_gap(report: dict[str, Any], cfg: FilterConfig, table_url: str) -> list[str]:
    """The early gap warning, right after filtering and before the retraining is spent: the classes
    whose off-support share exceeds ``cfg.gap_share``, named in a warning, or (``cfg.on_gap``
    stop) a GapError. Returns those classes (also ``report['off_support_classes']``)."""
    rates = report.get("gap", {}).get("off_support", {}).get("per_class") or []
    names = list(report["per_class"])
    off = [f"{names[c]} ({r:.0%})" for c, r in enumerate(rates) if r is not None and r > cfg.gap_share]
    report["off_support_classes"] = off
    if not off:
        return off
    message = (f"most synthetic images of {len(off)} class(es) are off the task's support: {', '.join(off)}. The "
               f"generator draws in another style than your data: adapt it (--set adapt.method=full, or lora for a "
               f"latent model), or check {table_url}")
    if cfg.on_gap == "stop":
        raise GapError(message + "; stopped before retraining (filter.on_gap: stop)")
    log.warning("filter: %s; going on with re-admission (filter.on_gap: warn)", message)
    return off
