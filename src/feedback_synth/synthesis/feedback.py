"""Feedback extraction: the frozen classifier's class statistics."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sklearn.covariance import LedoitWolf, ShrunkCovariance

from feedback_synth import storage
from feedback_synth.data.imageset import ImageSet
from feedback_synth.devices import module_device
from feedback_synth.guidance.criteria import ClassStats
from feedback_synth.training.classifier import Classifier


@torch.no_grad()
def extract_features(clf: Classifier, data: ImageSet, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of ``data`` (the embedding of ``hardness`` and the filters), computed on
    the classifier's own device."""
    clf.eval()
    device = module_device(clf)
    x = data.to_tensor()
    out = [clf.features_and_logits(x[i:i + batch_size].to(device))[0].float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 1))


def fit_class_stats(feats: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = -1.0,
                    reference: tuple[np.ndarray, np.ndarray] | None = None) -> ClassStats:
    """Per-class means and a shared covariance with shrinkage (Ledoit-Wolf unless given).

    The covariance is fitted on class-centred features, so it is shared by all classes.
    ``real_distances`` (the yardstick of the ``off_support`` filter) are measured on ``reference``
    (features, labels) of held-out real images when given: the classifier has memorised its own
    training images, whose distances are several times smaller than those of unseen real images.
    """
    means = np.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    centred = feats - means[labels]
    est = LedoitWolf(assume_centered=True) if shrinkage < 0 else ShrunkCovariance(shrinkage=shrinkage, assume_centered=True)
    est.fit(centred)
    used = float(est.shrinkage_) if shrinkage < 0 else float(shrinkage)
    precision = torch.from_numpy(est.precision_).float()
    counts = np.bincount(labels, minlength=num_classes).tolist()
    stats = ClassStats(torch.from_numpy(means).float(), precision, used, {}, counts, reference is not None)
    ref_feats, ref_labels = reference if reference is not None else (feats, labels)
    d = stats.mahalanobis_sq(torch.from_numpy(ref_feats).float(), torch.from_numpy(ref_labels)).numpy()
    stats.real_distances = {c: np.sort(d[ref_labels == c]) for c in range(num_classes)}
    return stats


def save_class_stats(stats: ClassStats, url: str) -> None:
    storage.write_bytes(storage.join(url, "class_stats.safetensors"), st_save({"means": stats.means.contiguous(),
                                                                      "precision": stats.precision.contiguous()}))
    storage.write_json(storage.join(url, "class_stats.json"), {
        "shrinkage": stats.shrinkage, "train_counts": stats.train_counts, "held_out": stats.held_out,
        "real_distances": {str(c): v.tolist() for c, v in stats.real_distances.items()}})


def load_class_stats(url: str) -> ClassStats:
    tensors = st_load(storage.read_bytes(storage.join(url, "class_stats.safetensors")))
    meta = storage.read_json(storage.join(url, "class_stats.json"))
    return ClassStats(tensors["means"], tensors["precision"], meta["shrinkage"],
                      {int(c): np.array(v) for c, v in meta["real_distances"].items()},
                      meta.get("train_counts", []), meta.get("held_out", True))
