"""The losses of the registry against values computed by hand, and the class prior they use."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from feedback_synth.training.losses import LOSSES, LossInputs, cell_weights, class_prior

LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
TARGETS = torch.tensor([0, 1])
PRIOR = torch.tensor([0.8, 0.2])


def _inputs(tau: float = 1.0, weights=(1.0, 1.0)) -> LossInputs:
    return LossInputs(LOGITS, TARGETS, PRIOR.log(), torch.tensor(weights), tau)


def _ce(z: list[float], y: int) -> float:
    return -z[y] + math.log(sum(math.exp(v) for v in z))


def test_cross_entropy_by_hand():
    expected = [_ce([2.0, 0.0], 0), _ce([0.0, 1.0], 1)]  # log(1 + e^-2), log(1 + e^-1)
    assert LOSSES["ce"](_inputs()).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.126928, 0.313262], abs=1e-6)


def test_balanced_softmax_adds_the_log_prior():
    # sample 0: z + log p = [2 + log .8, log .2]; sample 1: [log .8, 1 + log .2]
    expected = [_ce([2 + math.log(0.8), math.log(0.2)], 0), _ce([math.log(0.8), 1 + math.log(0.2)], 1)]
    assert LOSSES["balanced_softmax"](_inputs()).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.0333, 0.9048], abs=1e-4)
    # the rare class's sample costs more than under CE, the frequent one's less: the rare class is pushed up
    ce = LOSSES["ce"](_inputs())
    bs = LOSSES["balanced_softmax"](_inputs())
    assert bs[0] < ce[0] and bs[1] > ce[1]


def test_logit_adjusted_is_balanced_softmax_at_tau_1_and_scales_with_tau():
    assert LOSSES["logit_adjusted"](_inputs(1.0)).tolist() == pytest.approx(
        LOSSES["balanced_softmax"](_inputs()).tolist(), abs=1e-7)
    tau = 2.0
    expected = [_ce([2 + tau * math.log(0.8), tau * math.log(0.2)], 0),
                _ce([tau * math.log(0.8), 1 + tau * math.log(0.2)], 1)]
    assert LOSSES["logit_adjusted"](_inputs(tau)).tolist() == pytest.approx(expected, abs=1e-6)


def test_group_reweighted_weights_each_sample():
    weights = (3.0, 0.5)
    expected = [3.0 * _ce([2.0, 0.0], 0), 0.5 * _ce([0.0, 1.0], 1)]
    assert LOSSES["group_reweighted"](_inputs(weights=weights)).tolist() == pytest.approx(expected, abs=1e-6)


def test_cell_weights_are_inverse_cell_frequencies():
    labels, groups = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 0])  # cells (0,0) x2, (0,1) x1, (1,0) x1
    w = cell_weights(labels, groups, num_classes=2, num_groups=2).numpy()
    raw = np.array([0.5, 0.5, 1.0, 1.0])
    assert w == pytest.approx(raw / raw.mean())


def test_class_prior_real_or_batch_mix():
    real, syn = np.array([60, 2]), np.array([0, 58])
    assert class_prior(real, syn, 0.5, "real") == pytest.approx([60 / 62, 2 / 62])
    # batch: half real (drawn by frequency), half synthetic (all class 1)
    assert class_prior(real, syn, 0.5, "batch") == pytest.approx([0.5 * 60 / 62, 0.5 * 2 / 62 + 0.5])
    # under a balanced sampler the real half is uniform
    assert class_prior(real, syn, 0.5, "batch", real_sampling=np.array([0.5, 0.5])) == pytest.approx([0.25, 0.75])
    assert class_prior(real, None, 0.5, "batch") == pytest.approx([60 / 62, 2 / 62])  # no synthetic: the counts
