"""Filters: each catches what it should and reports per class what it dropped and why."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from feedback_synth.config import FilterConfig
from feedback_synth.errors import ConfigError
from feedback_synth.guidance.criteria import ClassStats
from feedback_synth.synthesis.filtering import FILTERS, FilterInputs, apply_filters


def _inputs(n=6, d=4):
    rng = np.random.default_rng(0)
    images = rng.integers(40, 255, size=(n, 8, 8, 1)).astype(np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    feats = rng.normal(size=(n, d))
    real_feats = rng.normal(size=(10, d))
    real_labels = np.array([0] * 5 + [1] * 5)
    means = torch.tensor(np.stack([real_feats[real_labels == c].mean(0) for c in range(2)])).float()
    stats = ClassStats(means, torch.eye(d), 0.1, {0: np.array([1.0, 2.0, 3.0, 4.0]), 1: np.array([1.0, 2.0, 3.0, 4.0])})
    return FilterInputs(images, labels, np.ones(n, bool), feats, real_feats, real_labels, stats)


def test_registry():
    assert set(FILTERS) == {"degenerate", "near_duplicate", "off_support"}


def test_degenerate_catches_nan_black_and_constant():
    inp = _inputs()
    inp.images[0] = 0  # black
    inp.images[3] = 128  # constant grey
    inp.finite[4] = False  # NaN at generation time
    mask, report = apply_filters(inp, FilterConfig(filters=["degenerate"]), ["a", "b"])
    assert mask.tolist() == [False, True, True, False, False, True]
    assert report["per_class"]["a"]["dropped"]["degenerate"] == 1
    assert report["per_class"]["b"]["dropped"]["degenerate"] == 2
    assert report["per_class"]["b"]["kept"] == 1 and report["kept"] == 3
    assert "near-black" in report["filters"][0]["reason"]


def test_near_duplicate_catches_copies_of_real_and_of_each_other():
    inp = _inputs()
    inp.features[1] = inp.real_features[2] * 3.0  # same direction as a real image of class 0
    inp.features[5] = inp.features[4] + 1e-6  # a copy of a kept synthetic image of class 1
    mask, report = apply_filters(inp, FilterConfig(filters=["near_duplicate"], duplicate_cosine=0.999), ["a", "b"])
    assert not mask[1] and not mask[5] and mask[4]
    assert report["per_class"]["a"]["dropped"]["near_duplicate"] == 1


def test_off_support_drops_far_images():
    inp = _inputs()
    inp.features[2] = inp.stats.means[0].numpy() + 100.0
    mask, report = apply_filters(inp, FilterConfig(filters=["off_support"], support_quantile=1.0, support_margin=1.5),
                                 ["a", "b"])
    assert not mask[2]
    assert report["filters"][0]["dropped"] >= 1
    assert "Mahalanobis" in report["filters"][0]["reason"]


def test_filters_run_in_order_and_counts_add_up():
    inp = _inputs()
    inp.images[0] = 0
    mask, report = apply_filters(inp, FilterConfig(), ["a", "b"])
    for name, pc in report["per_class"].items():
        assert pc["generated"] == pc["kept"] + sum(pc["dropped"].values())
    assert report["kept"] == int(mask.sum())


def test_unknown_filter_is_named():
    with pytest.raises(ConfigError, match="config field 'filter.filters': unknown filter 'confidence'; known: degenerate"):
        apply_filters(_inputs(), FilterConfig(filters=["confidence"]), ["a", "b"])
