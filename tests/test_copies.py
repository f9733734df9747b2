"""Copies (issue 24, "No copies"): one definition of a near-copy for the filter, the measure and the
adaptation guard (synthesis.copies); the near_copy filter drops them and reports them per class;
the run and the report name a class whose kept set is still above filter.copy_share."""
from __future__ import annotations

import logging

import numpy as np
import torch

from feedback_synth.config import FilterConfig
from feedback_synth.guidance.criteria import ClassStats
from feedback_synth.reporting.tables import format_report
from feedback_synth.synthesis import copies, gap
from feedback_synth.synthesis.filtering import FILTERS, FilterInputs, apply_filters


def _digits(n_per_class=(8, 8, 2), seed=0):
    """Real 'digits': a per-class stroke pattern on 12x12, with a little noise and jitter per image."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, n in enumerate(n_per_class):
        for _ in range(n):
            x = np.zeros((12, 12), np.float32)
            if c == 0:
                x[2:10, 3:5] = 1  # a vertical bar
            elif c == 1:
                x[3:5, 2:10] = 1  # a horizontal bar
            else:
                np.fill_diagonal(x[1:11, 1:11], 1)  # a diagonal
            x = np.roll(x, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), (0, 1))
            x = np.clip(x + rng.normal(0, 0.15, x.shape), 0, 1)
            images.append(x)
            labels.append(c)
    return (np.round(np.stack(images) * 255).astype(np.uint8)[..., None], np.array(labels))


def test_a_copy_of_a_training_image_is_a_copy_and_a_shifted_or_other_digit_is_not():
    real, labels = _digits()
    copy = real[[1, 9, 16]].copy()  # one training image of each class, as it is
    copy[..., 0] = np.clip(copy[..., 0].astype(int) + 3, 0, 255).astype(np.uint8)  # a faint change
    assert copies.is_near_copy(copy, labels[[1, 9, 16]], real, labels).all()
    shifted = np.roll(real[[1, 9]], 4, axis=2)  # the same image moved by a third of its width
    other = real[[9, 1]]  # a real image of the *other* class, labelled as this class
    assert not copies.is_near_copy(shifted, np.array([0, 1]), real, labels).any()
    assert not copies.is_near_copy(other, np.array([0, 1]), real, labels).any()


def test_the_threshold_is_chosen_on_the_real_images():
    real, labels = _digits()
    t = copies.copy_threshold(real, labels)
    x = copies.flat(real)
    nn = np.concatenate([copies.nn_distances(x[labels == c], x[labels == c], same=True) for c in (0, 1)])
    assert t == np.median(nn)  # classes 0 and 1 (8 images); class 2 (2 images) has no neighbours of its own
    assert copies.copy_threshold(real // 2, labels) < t  # fainter images, closer neighbours: a smaller threshold


def test_the_measure_and_the_filter_use_the_one_definition():
    real, labels = _digits()
    synth = np.concatenate([real[[0, 1, 16]], np.roll(real[[2, 17]], 4, axis=2)])
    synth_labels = np.array([0, 0, 2, 0, 2])
    share = gap.near_copy_share(synth, synth_labels, real, labels, 3)
    close = copies.is_near_copy(synth, synth_labels, real, labels)
    assert close.tolist() == [True, True, True, False, False]
    assert share["per_class"] == [2 / 3, None, 0.5]
    assert share["threshold"] == copies.copy_threshold(real, labels)


def _inputs(synth, synth_labels, real, labels):
    d = 4
    rng = np.random.default_rng(1)
    feats, real_feats = rng.normal(size=(len(synth), d)), rng.normal(size=(len(real), d))
    means = torch.tensor(np.stack([real_feats[labels == c].mean(0) for c in range(3)])).float()
    stats = ClassStats(means, torch.eye(d), 0.1, {}, train_counts=np.bincount(labels).tolist())
    return FilterInputs(synth, synth_labels, np.ones(len(synth), bool), feats, real_feats, labels, stats,
                        real_images=real)


def test_near_copy_filter_drops_copies_reports_them_per_class_and_never_readmits_them():
    assert "near_copy" in FILTERS and FilterConfig().filters[:2] == ["degenerate", "near_copy"]
    real, labels = _digits()
    synth = np.concatenate([real[[0]], np.roll(real[[1, 2]], 4, axis=2), real[[16, 17]]])
    synth_labels = np.array([0, 0, 0, 2, 2])
    mask, report = apply_filters(_inputs(synth, synth_labels, real, labels),
                                 FilterConfig(filters=["near_copy"], min_kept_fraction=0.5), ["a", "b", "c"])
    assert mask.tolist() == [False, True, True, False, False]
    assert report["per_class"]["a"]["dropped"]["near_copy"] == 1
    assert report["per_class"]["c"]["dropped"]["near_copy"] == 2
    assert report["per_class"]["c"]["readmitted"] == 0 and report["starved"] == ["c"]  # a copy never comes back
    assert "near-copy" in report["filters"][0]["reason"]
    assert report["kept_near_copy"]["per_class"] == [0.0, None, None] and report["copy_classes"] == []


def test_a_class_above_the_share_is_named_in_the_run_and_in_the_report(caplog):
    real, labels = _digits()
    synth = np.concatenate([real[[0]], np.roll(real[[1, 2]], 4, axis=2), real[[16]], np.roll(real[[17]], 4, axis=2)])
    synth_labels = np.array([0, 0, 0, 2, 2])
    with caplog.at_level(logging.WARNING):  # the filter list without near_copy: the copies stay
        _, report = apply_filters(_inputs(synth, synth_labels, real, labels),
                                  FilterConfig(filters=["degenerate"], copy_share=0.4), ["a", "b", "c"])
    assert report["copy_classes"] == ["c (50%)"]  # a: 1 of 3 = 33% is under 40%
    assert "c (50%)" in caplog.text and "near-copies" in caplog.text
    evaluation = {"no_synthesis": {"overall": 0.5}, "retrained": {"overall": 0.6}, "delta": {"overall": 0.1},
                  "generated": 5, "kept": 5, "copy_classes": report["copy_classes"]}
    text = format_report(evaluation)
    assert "warning: the kept synthetic images of classes c (50%) are near-copies" in text
    assert "near-copies" not in format_report({**evaluation, "copy_classes": []})


def test_the_adaptation_guard_stops_at_the_first_copying_check_and_keeps_the_last_passing_weights(
        prepared, tiny_generator, monkeypatch):
    from feedback_synth.config import AdaptConfig
    from feedback_synth.data.imageset import load_split
    from feedback_synth.generation import adapt
    from feedback_synth.generation.loading import load_generator

    train = load_split(prepared, "train")
    checks = iter([{"9": 0.0}, {"9": 0.5}])  # step 2 passes, step 4 copies the 2-image class
    monkeypatch.setattr(adapt, "_copy_check", lambda *a, **k: next(checks))
    pipe = load_generator(tiny_generator, device="cpu")
    seen = {}

    def on_step(step, loss):
        if step == 1:  # the weights after 2 steps: the last checkpoint that passed
            seen["w"] = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}

    cfg = AdaptConfig(method="full", steps=6, batch_size=4, copy_check_every=2, copy_check_max_images=2)
    losses = adapt.adapt_unet(pipe, "pixel", train, cfg, list(range(10)), on_step=on_step)
    guard = losses.copy_guard
    assert guard["stopped_at"] == 2 and len(losses) == 4 and guard["classes"] == ["8", "9"]
    assert [c["step"] for c in guard["checks"]] == [2, 4]
    assert all(torch.equal(p, seen["w"][n]) for n, p in pipe.unet.named_parameters())
    off = adapt.adapt_unet(load_generator(tiny_generator, device="cpu"), "pixel", train,
                           AdaptConfig(method="full", steps=2, batch_size=4, copy_check_every=0), list(range(10)))
    assert off.copy_guard is None and len(off) == 2
