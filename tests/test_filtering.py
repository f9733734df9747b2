"""Filters: each catches what it should and reports per class what it dropped and why."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from feedback_synth.config import FilterConfig
from feedback_synth.errors import ConfigError
from feedback_synth.guidance.criteria import ClassStats
from feedback_synth.synthesis.filtering import FILTERS, FilterInputs, apply_filters, filter_table, support_limits


def _inputs(n=6, d=4):
    rng = np.random.default_rng(0)
    images = rng.integers(40, 255, size=(n, 8, 8, 1)).astype(np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    feats = rng.normal(size=(n, d))
    real_feats = rng.normal(size=(10, d))
    real_labels = np.array([0] * 5 + [1] * 5)
    means = torch.tensor(np.stack([real_feats[real_labels == c].mean(0) for c in range(2)])).float()
    stats = ClassStats(means, torch.eye(d), 0.1, {0: np.array([1.0, 2.0, 3.0, 4.0]), 1: np.array([1.0, 2.0, 3.0, 4.0])},
                       train_counts=[5, 5])
    return FilterInputs(images, labels, np.ones(n, bool), feats, real_feats, real_labels, stats)


def test_registry():
    assert set(FILTERS) == {"degenerate", "near_copy", "near_duplicate", "off_support"}


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


def test_near_duplicate_catches_duplicates_among_synthetic_images():
    inp = _inputs()
    inp.features[1] = inp.real_features[2] * 3.0  # same direction as a real image: near_copy's business, not this
    inp.features[2] = inp.features[0] * 2.0  # a duplicate of a kept synthetic image of class 0
    inp.features[5] = inp.features[4] + 1e-6  # a copy of a kept synthetic image of class 1
    mask, report = apply_filters(inp, FilterConfig(filters=["near_duplicate"], duplicate_cosine=0.999,
                                                   min_kept_fraction=0), ["a", "b"])
    assert mask[1] and not mask[2] and not mask[5] and mask[4]
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


def test_support_limits_allow_for_a_mean_of_few_images():
    """The yardstick is pooled, corrected by (1 + 1/n) for a class mean of n images (a mean of 2
    images lies farther from a new image than a mean of 60 does)."""
    stats = ClassStats(torch.zeros(2, 3), torch.eye(3), 0.1, {0: np.array([1.2, 2.4]), 1: np.array([3.0, 4.5])},
                       train_counts=[5, 2])
    cfg = FilterConfig(support_quantile=1.0, support_margin=2.0)
    normalised_max = max(2.4 / 1.2, 4.5 / 1.5)  # d_ref / (1 + 1/n_ref): 2.0 (class 0), 3.0 (class 1)
    assert support_limits(stats, cfg).tolist() == pytest.approx([2.0 * normalised_max * 1.2, 2.0 * normalised_max * 1.5])


def test_off_support_is_skipped_without_held_out_images():
    inp = _inputs()
    inp.stats.held_out = False
    inp.features[2] = inp.stats.means[0].numpy() + 100.0
    mask, report = apply_filters(inp, FilterConfig(filters=["off_support"]), ["a", "b"])
    assert mask.all() and "skipped: no validation split" in report["filters"][0]["reason"]


def test_starved_class_gets_its_closest_drops_back_but_never_degenerate_ones():
    inp = _inputs()
    far = inp.stats.means[0].numpy()
    inp.features[0], inp.features[1], inp.features[2] = far + 50.0, far + 20.0, far + 80.0  # all of class a far
    inp.images[3] = 0  # class b: one black image
    cfg = FilterConfig(filters=["degenerate", "off_support"], support_quantile=1.0, support_margin=1.0,
                       min_kept_fraction=0.5)
    mask, report = apply_filters(inp, cfg, ["a", "b"])
    a = report["per_class"]["a"]
    assert a["dropped"]["off_support"] == 3 and a["readmitted"] == 2 and a["kept"] == 2
    assert mask[:3].tolist() == [True, True, False]  # the two closest back, the farthest stays out
    assert not mask[3] and report["per_class"]["b"]["kept"] == 2  # black is never re-admitted: b's others are
    assert report["starved"] == []
    inp.images[4] = inp.images[5] = 0  # now all of class b is black: nothing to re-admit, it stays starved
    assert apply_filters(inp, cfg, ["a", "b"])[1]["starved"] == ["b"]
    without = apply_filters(inp, FilterConfig(filters=cfg.filters, support_quantile=1.0, support_margin=1.0,
                                              min_kept_fraction=0.0), ["a", "b"])[1]
    assert without["per_class"]["a"]["kept"] == 0
    table = filter_table(report)
    assert "| a | 3 | 2 | 0 | 3 | 2 |" in table and "dropped: off_support" in table
