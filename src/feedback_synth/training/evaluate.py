"""Evaluation: overall, many / medium / few-shot, per-class, worst-class and group accuracy."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from feedback_synth.config import METRICS, DataConfig
from feedback_synth.data.imageset import ImageSet, shot_groups
from feedback_synth.devices import module_device
from feedback_synth.training.classifier import Classifier


@torch.no_grad()
def predict_logits(clf: Classifier, data: ImageSet, batch_size: int = 256) -> np.ndarray:
    """The classifier's logits on ``data``, computed on the classifier's own device."""
    clf.eval()
    device = module_device(clf)
    x = data.to_tensor()
    out = [clf(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, clf.spec.num_classes), np.float32)


def _mean_or_none(values: np.ndarray) -> Optional[float]:
    return float(values.mean()) if len(values) else None


def accuracy_metrics(preds: np.ndarray, data: ImageSet, train_class_counts: list[int] | np.ndarray,
                     cfg: DataConfig) -> dict[str, Any]:
    """All gate and report metrics of predictions on ``data`` (usually the balanced test set).

    Shot buckets follow the train counts and the thresholds of ``cfg``; an empty bucket is None.
    """
    correct = preds == data.labels
    per_class = np.array([correct[data.labels == c].mean() if (data.labels == c).any() else np.nan
                          for c in range(data.num_classes)])
    metrics: dict[str, Any] = {"overall": float(correct.mean())}
    for name, classes in shot_groups(np.asarray(train_class_counts), cfg).items():
        metrics[name] = _mean_or_none(correct[np.isin(data.labels, classes)])
    metrics["worst_class"] = float(np.nanmin(per_class))
    metrics["per_class"] = [None if math.isnan(a) else float(a) for a in per_class]
    if data.num_groups > 1:
        # groups are (class, group) cells, as in the subpopulation-shift literature
        cells = {}
        for c in range(data.num_classes):
            for g in range(data.num_groups):
                m = (data.labels == c) & (data.groups == g)
                if m.any():
                    cells[f"{data.class_names[c]}/{data.group_names[g]}"] = float(correct[m].mean())
        metrics["per_group"] = cells
        metrics["average_group"] = float(np.mean(list(cells.values())))
        metrics["worst_group"] = float(min(cells.values()))
    from sklearn.metrics import confusion_matrix

    # rows: true class, columns: predicted class, every class present even if never seen or predicted
    cm = (confusion_matrix(data.labels, preds, labels=range(data.num_classes)) if len(preds)
          else np.zeros((data.num_classes, data.num_classes)))  # sklearn refuses an empty set
    metrics["confusion_matrix"] = cm.astype(np.int64).tolist()
    return metrics


def evaluate(clf: Classifier, data: ImageSet, cfg: DataConfig, batch_size: int = 256) -> dict[str, Any]:
    """Every report metric of ``clf`` on ``data`` (on the classifier's own device)."""
    preds = predict_logits(clf, data, batch_size).argmax(1)
    return accuracy_metrics(preds, data, clf.spec.train_class_counts, cfg)




def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics only (what goes into tables and MLflow)."""
    return {k: metrics[k] for k in METRICS if metrics.get(k) is not None}
