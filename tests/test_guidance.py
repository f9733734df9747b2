"""Feedback criteria and the guided step: gradients against finite differences, ascent raises C."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from feedback_synth.guidance.criteria import CRITERIA, ClassStats
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, guided_step_indices
from feedback_synth.synthesis.feedback import extract_features, fit_class_stats


@pytest.fixture(scope="module")
def stats(small_classifier, digits):
    clf, _ = small_classifier
    train = digits["train"]
    return fit_class_stats(extract_features(clf, train), train.labels, train.num_classes)


def test_registry_has_the_three_criteria():
    assert {"loss", "entropy", "hardness"} <= set(CRITERIA)


def test_criteria_values_match_their_definitions(stats):
    torch.manual_seed(0)
    logits = torch.randn(5, 10, dtype=torch.float64)
    feats = torch.randn(5, stats.means.shape[1], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 9])
    p = logits.softmax(1)
    assert torch.allclose(CRITERIA["entropy"](feats, logits, y, None), -(p * p.log()).sum(1))
    assert torch.allclose(CRITERIA["loss"](feats, logits, y, None), -p[torch.arange(5), y].log())
    d = feats - stats.means.double()[y]
    expected = 0.5 * torch.einsum("bi,ij,bj->b", d, stats.precision.double(), d)
    assert torch.allclose(CRITERIA["hardness"](feats, logits, y, stats), expected)


@pytest.mark.parametrize("criterion", ["loss", "entropy", "hardness"])
def test_guidance_gradient_matches_finite_differences(criterion, small_classifier, stats):
    """d C(f(decode(.))) / d z_t through the x0 prediction, checked along random directions (float64)."""
    clf = copy.deepcopy(small_classifier[0]).double().eval()
    st = ClassStats(stats.means.double(), stats.precision.double(), stats.shrinkage, stats.real_distances)
    guide = FeedbackGuidance(clf, criterion, 0.05, st)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64) * 0.5
    eps = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64) * 0.1
    alpha_bar = torch.tensor(0.7, dtype=torch.float64)
    labels = torch.tensor([7, 8, 9])

    def total(zz):
        grad_z = zz.detach().clone().requires_grad_(True)
        return guide.gradient(grad_z, eps, alpha_bar, labels)

    grad, _ = total(z)
    for k in range(3):
        v = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        h = 1e-7  # the model is piecewise linear (ReLU, clamp): a small step stays on one piece
        _, c_plus = total(z + h * v)
        _, c_minus = total(z - h * v)
        fd = float((c_plus.sum() - c_minus.sum()) / (2 * h))
        an = float((grad * v).sum())
        assert an == pytest.approx(fd, rel=1e-5, abs=1e-8), (criterion, k, an, fd)


def test_step_is_per_sample_normalised_ascent(small_classifier, stats):
    clf = small_classifier[0]
    guide = FeedbackGuidance(clf, "entropy", 0.1, stats)
    z = torch.randn(4, 1, 16, 16)
    eps = torch.zeros_like(z)
    a = torch.tensor(0.5)
    y = torch.tensor([0, 1, 2, 3])
    shifted = guide.step(z, eps, a, y)
    delta = (shifted - z).flatten(1)
    # each sample moves by exactly s * ||z_i||
    assert torch.allclose(delta.norm(dim=1), 0.1 * z.flatten(1).norm(dim=1), rtol=1e-4)
    # and in the ascent direction of the criterion
    with torch.enable_grad():
        zz = z.clone().requires_grad_(True)
        g, _ = guide.gradient(zz, eps, a, y)
    assert ((delta * g.flatten(1)).sum(1) > 0).all()


def test_guided_step_schedule():
    assert guided_step_indices(30, 5) == [0, 5, 10, 15, 20, 25]
    assert guided_step_indices(10, 3, 0.5) == [5, 8]
    assert guided_step_indices(4, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize("criterion", ["loss", "entropy", "hardness"])
@pytest.mark.slow
def test_guidance_raises_the_criterion_versus_unguided(criterion, small_classifier, stats, tiny_generator, digits):
    """Same seeds and starting images, with and without feedback: guided samples score higher."""
    from feedback_synth.generation.loading import load_generator

    clf = small_classifier[0]
    pipe = load_generator(tiny_generator, device="cpu")
    labels = torch.tensor([c for c in range(10) for _ in range(2)])
    train = digits["train"]
    init = torch.stack([train.to_tensor()[np.flatnonzero(train.labels == c)[0]] for c in labels.tolist()])
    scorer = FeedbackGuidance(clf, criterion, 0.0, stats)

    def sample(feedback):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(len(labels))]
        out = pipe(class_labels=labels, generators=gens, images=init, strength=0.6, num_inference_steps=10,
                   cfg_scale=2.0, cond_dropout=0.1, feedback=feedback, guide_steps=guided_step_indices(6, 1))
        return scorer.score_images(out.images, labels).detach()

    unguided = sample(None)
    guided = sample(FeedbackGuidance(clf, criterion, 0.05, stats))
    assert guided.mean() > unguided.mean(), (criterion, float(guided.mean()), float(unguided.mean()))
    # unguided sampling is deterministic given the seeds (so the comparison is paired)
    assert torch.allclose(sample(None), unguided)
