"""No class group loses: a post-hoc logit offset chosen on validation after retraining.

Why (docs/method.md, "No class group loses"): logit adjustment with the real-count prior, applied to
a stream that synthesis has already balanced, corrects twice for the same imbalance. The retrained
model then over-predicts the rare classes, and the many-shot classes lose. Retraining with the
stream's own prior (``retrain.prior: batch``) removes the double correction, but also most of the
few-shot gain (digits-lt validation: few 0.939 with the real prior, 0.767 with the batch prior).

The two priors differ only by a per-class offset of the logits (Menon et al. 2021, post-hoc logit
adjustment): a model trained with prior p_r has logits f_r = log p_train(y|x) - tau log p_r, so the
model trained with p_b would have f_r + tau (log p_r - log p_b). Calibration adds lambda times that
offset, lambda in a grid on [0, 1], and picks on the validation split:

1. the lambdas under which no class group (many / medium / few-shot; with groups, also the
   average group) is below the no-synthesis reference on validation (the model the report and
   the gate compare with: the same recipe on the real images alone);
2. among them, the best validation ``metric`` (few, or worst_group for group data);
3. if none qualifies, the lambda whose worst group change is the largest (maximin).

The test split is never read. The chosen offset becomes the checkpoint's ``logit_bias``.

Scored on the split it was chosen on, a calibrated model keeps every group there by construction,
so ``calibrate`` also scores it **cross-fitted** (``crossfit_predictions``: each half of the split
predicted with the weight chosen on the other half): what it scores on images its weight was not
chosen on. The pilot, whose folds hold out one split for both, reads those scores
(``orchestration.tune.score_cell``), as the benchmarks' choice among retrainings does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from feedback_synth.config import DataConfig
from feedback_synth.data.imageset import ImageSet
from feedback_synth.training.losses import class_prior

# lambda in [0, 1] by 0.05: the groups trade steeply near 0 (on digits-lt, 10 seeds, it chose 0 to 0.5)
GRID = tuple(round(0.05 * i, 2) for i in range(21))
ADJUSTED_LOSSES = ("logit_adjusted", "balanced_softmax")


@dataclass
class Calibration:
    """The chosen offset and how it was chosen (written as ``calibration.json``)."""

    weight: float  # lambda: 0 = the model as trained
    logit_bias: list[float]  # weight x offset, added to every logit
    metric: str  # the validation metric maximised
    feasible: bool  # some weight kept every class group at or above the reference
    reason: str
    table: list[dict[str, Any]] = field(default_factory=list)  # per weight: val metrics and changes
    # the validation metrics, cross-fitted (crossfit_predictions): each half of the split predicted
    # with the weight chosen on the other half; empty where no split was scored
    crossfit: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prior_offset(loss: str, tau: float, real_counts: np.ndarray, synthetic_counts: np.ndarray,
                 synthetic_fraction: float, real_sampling: Optional[np.ndarray] = None) -> np.ndarray:
    """The per-class logit offset from the model as trained to the one trained with the stream's
    own class prior (the real + synthetic mix of a batch).

    Adjusted losses (trained with the real-count prior): tau (log p_real - log p_batch).
    Other losses have no prior in the loss: -log p_batch, the post-hoc logit adjustment to a
    balanced posterior. Centred (a shared constant changes no prediction).
    """
    p_batch = class_prior(real_counts, synthetic_counts, synthetic_fraction, "batch", real_sampling)
    log_batch = np.log(np.clip(p_batch, 1e-12, None))
    if loss in ADJUSTED_LOSSES:
        p_real = class_prior(real_counts, mode="real")
        scale = 1.0 if loss == "balanced_softmax" else tau
        offset = scale * (np.log(np.clip(p_real, 1e-12, None)) - log_batch)
    else:
        offset = -log_batch
    return offset - offset.mean()


def group_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The class groups that must not lose: the shot buckets present, and the average group."""
    return {k: float(metrics[k]) for k in ("many", "medium", "few", "average_group") if metrics.get(k) is not None}


def default_metric(metrics: dict[str, Any]) -> str:
    """few where the data has few-shot classes, worst_group with groups, else overall."""
    if metrics.get("worst_group") is not None and metrics.get("few") is None:
        return "worst_group"
    return "few" if metrics.get("few") is not None else "overall"


def choose_weight(val_logits: np.ndarray, val: ImageSet, train_class_counts: list[int], data_cfg: DataConfig,
                  offset: np.ndarray, reference: dict[str, Any], metric: str = "",
                  grid: tuple[float, ...] = GRID, tolerance: float = 0.0) -> Calibration:
    """Pick lambda on validation (the rule in the module docstring).

    Args:
        val_logits: the retrained model's logits on ``val`` (no offset).
        offset: ``prior_offset``'s vector.
        reference: the no-synthesis reference's validation metrics (``accuracy_metrics``).
        metric: the validation metric to maximise; '' = ``default_metric``.
        tolerance: how far below the reference a class group may fall and still count as not losing.
    """
    from feedback_synth.training.evaluate import accuracy_metrics

    metric = metric or default_metric(reference)
    ref_groups = group_scores(reference)
    table = []
    for w in grid:
        m = accuracy_metrics((val_logits + w * offset[None, :]).argmax(1), val, train_class_counts, data_cfg)
        changes = {k: v - ref_groups[k] for k, v in group_scores(m).items() if k in ref_groups}
        table.append({"weight": w, "metric": m.get(metric), "overall": m["overall"], **group_scores(m),
                      "worst_change": min(changes.values()) if changes else 0.0,
                      "changes": changes})
    feasible = [row for row in table if row["worst_change"] >= -tolerance and row["metric"] is not None]
    if feasible:  # best metric, then overall; ties go to the smallest weight (the model as trained)
        best = max(feasible, key=lambda r: (r["metric"], r["overall"], -r["weight"]))
        reason = (f"the best validation {metric} ({best['metric']:.3f}) among the weights under which no class "
                  f"group is below the no-synthesis reference")
    else:
        best = max(table, key=lambda r: (r["worst_change"], r["overall"], -r["weight"]))
        reason = (f"no weight keeps every class group at the no-synthesis reference's level on validation; the one whose "
                  f"worst change is the smallest loss ({best['worst_change']:+.3f})")
    return Calibration(weight=float(best["weight"]), logit_bias=[float(x) for x in best["weight"] * offset],
                       metric=metric, feasible=bool(feasible), reason=reason, table=table)


CROSSFIT_SEED = 0  # the halves of the validation split


def crossfit_halves(labels: np.ndarray, seed: int = CROSSFIT_SEED) -> np.ndarray:
    """The first half of a split for ``crossfit_predictions`` (a mask): half of each class's images
    (an odd one out goes to either half at random), seeded."""
    rng = np.random.default_rng(seed)
    first = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == c))
        first[index[:len(index) // 2 + int(len(index) % 2 == 1 and rng.random() < 0.5)]] = True
    return first


def crossfit_predictions(val_logits: np.ndarray, val: ImageSet, train_class_counts: list[int], data_cfg: DataConfig,
                         offset: np.ndarray, reference_predictions: np.ndarray, metric: str = "",
                         tolerance: float = 0.0, seed: int = CROSSFIT_SEED) -> np.ndarray:
    """Calibration's predictions on ``val``, cross-fitted: the split cut in two halves
    (``crossfit_halves``), each half predicted with the weight ``choose_weight`` picks on the other
    half against the reference's predictions there (``reference_predictions``, on all of ``val``).
    Half the images choose each weight, so the scores are those of a slightly noisier choice."""
    from feedback_synth.training.evaluate import accuracy_metrics

    first = crossfit_halves(val.labels, seed)
    predictions = np.empty(len(val), np.int64)
    for fit in (first, ~first):
        fit_set = val.subset(np.flatnonzero(fit))
        reference = accuracy_metrics(reference_predictions[fit], fit_set, train_class_counts, data_cfg)
        chosen = choose_weight(val_logits[fit], fit_set, train_class_counts, data_cfg, offset, reference, metric,
                               tolerance=tolerance)
        predictions[~fit] = (val_logits[~fit] + np.asarray(chosen.logit_bias, np.float32)[None, :]).argmax(1)
    return predictions


def calibrate(clf, val: ImageSet, reference_clf, train: ImageSet, synthetic: ImageSet, synthetic_fraction: float,
              recipe, data_cfg: DataConfig, metric: str = "") -> Calibration:
    """Choose and set ``clf``'s logit offset on ``val`` against ``reference_clf`` (the no-synthesis
    reference); returns how it was chosen. ``recipe`` is the ``training.train.Recipe`` it was trained with."""
    from feedback_synth.training.evaluate import accuracy_metrics, predict_logits, summary
    from feedback_synth.training.train import drawn_class_mix

    counts = train.class_counts()
    syn_counts = np.bincount(synthetic.labels, minlength=train.num_classes)
    offset = prior_offset(recipe.loss, recipe.tau, counts, syn_counts, synthetic_fraction, drawn_class_mix(train, recipe))
    counts = counts.tolist()
    reference_predictions = predict_logits(reference_clf, val).argmax(1)
    reference = accuracy_metrics(reference_predictions, val, counts, data_cfg)
    val_logits = predict_logits(clf, val)
    chosen = choose_weight(val_logits, val, counts, data_cfg, offset, reference, metric)
    crossfit = crossfit_predictions(val_logits, val, counts, data_cfg, offset, reference_predictions, metric)
    chosen.crossfit = summary(accuracy_metrics(crossfit, val, counts, data_cfg))
    clf.set_logit_bias(chosen.logit_bias)
    return chosen
