"""The champion/challenger gate and the metrics that travel with a model version."""
from __future__ import annotations

import math
from typing import Any, Optional

from feedback_synth.config import PromoteConfig

CHAMPION = "champion"

CHALLENGER = "challenger"


METRIC_TAG = "metric."  # model version tag prefix: metric.few = "0.52"

TEST_SET_TAG = "test_set"  # which test set the metrics were measured on


DECISION_TAGS = ("promotion.decision", "promotion.reason", "promotion.reference", "promotion.lock")

PREVIOUS_CHAMPION_TAG = "promotion.previous_champion"  # on a promoted version: the champion it replaced

_EPS = 1e-9  # accuracies are fractions k/n: differences closer than this are equal


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def gate_decision(candidate: dict[str, Any], reference: Optional[dict[str, Any]],
                  cfg: PromoteConfig) -> tuple[bool, str]:
    """Does ``candidate`` beat ``reference`` by the thresholds of ``cfg``? Returns (passed, reason).

    Passes when the gate metric rises by at least ``min_gain`` (strictly rises when ``min_gain``
    is 0) and overall accuracy drops by at most ``max_overall_drop``. With no reference at all
    the candidate passes (nothing to compare with).
    """
    g = cfg.gate_metric
    if reference is None:
        return True, "no champion and no baseline to compare with"
    for who, metrics in (("candidate", candidate), ("reference", reference)):
        for key in dict.fromkeys((g, "overall")):
            value = metrics.get(key)
            if value is None or not isinstance(value, (int, float)) or math.isnan(float(value)):
                return False, f"{who} has no '{key}' metric to compare"
    gain = float(candidate[g]) - float(reference[g])
    drop = float(reference["overall"]) - float(candidate["overall"])
    if cfg.min_gain > 0:
        gain_ok, need = gain >= cfg.min_gain - _EPS, f">= {cfg.min_gain:g}"
    else:
        gain_ok, need = gain > _EPS, "> 0"
    drop_ok = drop <= cfg.max_overall_drop + _EPS
    parts = [f"{g} {_fmt(reference[g])} -> {_fmt(candidate[g])} ({gain:+.4f}, needs {need})"]
    if g != "overall":
        parts.append(f"overall {_fmt(reference['overall'])} -> {_fmt(candidate['overall'])} "
                     f"({-drop:+.4f}, may drop {cfg.max_overall_drop:g})")
    checks = [(parts[0], gain_ok)] + ([(parts[1], drop_ok)] if g != "overall" else [])
    failed = [part for part, ok in checks if not ok]
    if failed:
        return False, "fails: " + "; ".join(failed)
    return True, "passes: " + "; ".join(parts)


def metric_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Scalar metrics as model version tags (``metric.few`` = ``'0.52'``), full precision."""
    return {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))}


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG):]] = float(value)
            except ValueError:
                pass
    return out


def model_id_of(mv) -> Optional[str]:
    """A model version's LoggedModel id: ``mv.model_id`` where the registry stores it (MLflow 3.17's
    SQL registry does not), else from its source ``models:/<model_id>``."""
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return model_id
    source = mv.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None
