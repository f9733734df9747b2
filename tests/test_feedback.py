"""Feedback extraction: the generation plan (reference rule, budget, shards) and class statistics."""
from __future__ import annotations

import numpy as np
import pytest

from feedback_synth.config import FeedbackConfig
from feedback_synth.errors import ConfigError
from feedback_synth.synthesis.feedback import extract_features, fit_class_stats, load_class_stats, save_class_stats
from feedback_synth.synthesis.plan import GenerationPlan, image_seed, images_to_generate, make_plan


def test_reference_rule_on_digits_lt(digits):
    plan = make_plan(digits["train"], FeedbackConfig(shard_size=100))
    # target = the largest class (60): max(60 - n, 1)
    assert list(plan.counts.values()) == [1, 19, 32, 41, 47, 51, 54, 56, 58, 58]
    assert plan.target == 60 and plan.total == 417


def test_budget_fraction_and_explicit_target(digits):
    half = make_plan(digits["train"], FeedbackConfig(budget_fraction=0.5))
    assert list(half.counts.values()) == [1, 10, 16, 21, 24, 26, 27, 28, 29, 29]
    big = make_plan(digits["train"], FeedbackConfig(target=100))
    assert big.counts["0"] == 40 and big.counts["9"] == 98
    assert images_to_generate(500, 100, 1.0) == 1  # classes above target still get one


def test_shards_cover_the_plan_exactly_once(digits):
    plan = make_plan(digits["train"], FeedbackConfig(shard_size=64))
    assert all(s.num_images <= 64 for s in plan.shards)
    assert [s.shard_id for s in plan.shards] == list(range(len(plan.shards)))
    seen = {}
    for s in plan.shards:
        for e in s.entries:
            for i in range(e.start, e.start + e.count):
                key = (e.class_index, e.group_index, i)
                assert key not in seen
                seen[key] = s.shard_id
    assert len(seen) == plan.total
    for c, n in enumerate(plan.counts.values()):
        assert {i for (cc, _, i) in seen if cc == c} == set(range(n))


def test_plan_roundtrip(digits, memory_url):
    plan = make_plan(digits["train"], FeedbackConfig(shard_size=50))
    plan.save(memory_url + "/plan.json")
    assert GenerationPlan.load(memory_url + "/plan.json") == plan


def test_seeds_are_derived_and_distinct():
    seeds = {image_seed(0, c, g, i) for c in range(10) for g in range(2) for i in range(100)}
    assert len(seeds) == 2000
    assert image_seed(0, 3, 0, 5) == image_seed(0, 3, 0, 5) != image_seed(1, 3, 0, 5)


def test_class_stats_shrinkage_and_roundtrip(small_classifier, digits, memory_url):
    clf, _ = small_classifier
    train = digits["train"]
    feats = extract_features(clf, train)
    stats = fit_class_stats(feats, train.labels, 10)
    assert stats.means.shape == (10, feats.shape[1]) and stats.precision.shape == (feats.shape[1],) * 2
    assert 0 < stats.shrinkage <= 1
    assert np.allclose(stats.means[3].numpy(), feats[train.labels == 3].mean(0), atol=1e-5)
    fixed = fit_class_stats(feats, train.labels, 10, shrinkage=0.3)
    assert fixed.shrinkage == 0.3
    save_class_stats(stats, memory_url)
    again = load_class_stats(memory_url)
    assert np.allclose(again.precision.numpy(), stats.precision.numpy())
    assert set(again.real_distances) == set(range(10))
    # real samples of a class are closer to their own mean than to another class's
    import torch

    x = torch.from_numpy(feats).float()
    own = stats.mahalanobis_sq(x, torch.from_numpy(train.labels)).mean()
    other = stats.mahalanobis_sq(x, torch.from_numpy((train.labels + 1) % 10)).mean()
    assert own < other


def test_per_group_plan():
    from feedback_synth.data.imageset import ImageSet

    labels = np.array([0] * 6 + [1] * 3)
    groups = np.array([0, 0, 0, 0, 1, 1, 0, 0, 1])
    data = ImageSet(np.zeros((9, 4, 4, 1), np.uint8), labels, groups, np.array([str(i) for i in range(9)]),
                    ["a", "b"], ["land", "water"])
    plan = make_plan(data, FeedbackConfig(per_group=True))
    assert plan.counts == {"a/land": 1, "a/water": 2, "b/land": 2, "b/water": 3}
    with pytest.raises(ConfigError, match="config field 'feedback.shard_size': input should be greater than or equal to 1"):
        FeedbackConfig(shard_size=0)
