"""Training and evaluation: seeded, per-epoch metrics, safetensors checkpoints, metric definitions."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from feedback_synth.config import DataConfig, RetrainConfig, TrainConfig
from feedback_synth.data.imageset import ImageSet, load_split
from feedback_synth.errors import ConfigError
from feedback_synth.training.classifier import build_classifier, load_classifier, save_classifier
from feedback_synth.training.evaluate import accuracy_metrics, predict_logits
from feedback_synth.training.train import train_classifier


@pytest.mark.slow
def test_training_is_seeded_and_records_epochs(digits):
    cfg = RetrainConfig(epochs=2, seed=3)
    a, hist_a = train_classifier(digits["train"], cfg, "test_resnet")
    b, hist_b = train_classifier(digits["train"], cfg, "test_resnet")
    assert [h["epoch"] for h in hist_a] == [1, 2]
    assert hist_a == hist_b
    x = digits["test"].to_tensor()[:32]
    assert torch.equal(a(x), b(x))


def test_checkpoint_roundtrip_is_safetensors(small_classifier, digits, memory_url):
    clf, _ = small_classifier
    save_classifier(clf, memory_url + "/m")
    from feedback_synth import storage

    assert storage.read_bytes(memory_url + "/m/model.safetensors")[8:9] == b"{"  # safetensors header, no pickle
    again = load_classifier(memory_url + "/m", "cpu")
    assert np.allclose(predict_logits(again, digits["test"]), predict_logits(clf, digits["test"]), atol=1e-5)
    assert again.spec.train_class_counts == [60, 41, 28, 19, 13, 9, 6, 4, 2, 2]
    # half precision: half the file, float32 again once loaded, the same predictions
    save_classifier(clf, memory_url + "/half", half=True)
    assert len(storage.read_bytes(memory_url + "/half/model.safetensors")) < 0.6 * len(
        storage.read_bytes(memory_url + "/m/model.safetensors"))
    halved = load_classifier(memory_url + "/half", "cpu")
    assert all(p.dtype == torch.float32 for p in halved.parameters())
    assert np.array_equal(predict_logits(halved, digits["test"]).argmax(1), predict_logits(clf, digits["test"]).argmax(1))


def test_unknown_timm_model_is_named():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet_nope'"):
        build_classifier("resnet_nope", 10, 1, 16)


def test_accuracy_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    data = ImageSet(np.zeros((6, 2, 2, 1), np.uint8), labels, np.zeros(6, np.int64), np.array(list("abcdef")),
                    ["a", "b", "c"])
    preds = np.array([0, 0, 1, 0, 0, 0])
    m = accuracy_metrics(preds, data, [30, 10, 2], DataConfig(many_threshold=20, few_threshold=5))
    assert m["overall"] == pytest.approx(3 / 6)
    assert m["many"] == 1.0 and m["medium"] == 0.5 and m["few"] == 0.0
    assert m["per_class"] == [1.0, 0.5, 0.0] and m["worst_class"] == 0.0
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [2, 0, 0]]
    assert "worst_group" not in m


def test_group_metrics():
    labels = np.array([0, 0, 1, 1])
    groups = np.array([0, 1, 0, 1])
    data = ImageSet(np.zeros((4, 2, 2, 1), np.uint8), labels, groups, np.array(list("abcd")), ["a", "b"], ["x", "y"])
    m = accuracy_metrics(np.array([0, 1, 1, 1]), data, [5, 5], DataConfig())
    assert m["per_group"] == {"a/x": 1.0, "a/y": 0.0, "b/x": 1.0, "b/y": 1.0}
    assert m["worst_group"] == 0.0 and m["average_group"] == 0.75


def test_batches_mix_real_and_synthetic_at_the_fraction():
    from feedback_synth.training.train import _batches

    cfg = RetrainConfig(batch_size=10)
    batches = list(_batches(40, 7, cfg, 0.3, np.random.default_rng(0), None))
    assert len(batches) == 6  # ceil(40 / 7 real per batch): one epoch is one pass over the real data
    assert all(len(real) <= 7 and len(syn) == 3 for real, syn in batches)
    assert sorted(np.concatenate([r for r, _ in batches]).tolist()) == list(range(40))
    assert set(np.concatenate([s for _, s in batches]).tolist()) == set(range(7))  # synthetic cycles


def test_recipe_loss_changes_training_and_unknown_loss_is_named(digits):
    from feedback_synth.errors import ConfigError
    from feedback_synth.training.train import Recipe

    cfg = RetrainConfig(epochs=1, seed=0)
    _, ce = train_classifier(digits["train"], cfg, "test_resnet", recipe=Recipe("ce"))
    _, bs = train_classifier(digits["train"], cfg, "test_resnet", recipe=Recipe("balanced_softmax"))
    assert ce[0]["loss"] != pytest.approx(bs[0]["loss"])  # same seed and batches: only the loss differs
    with pytest.raises(ConfigError, match="unknown loss 'focal'"):
        train_classifier(digits["train"], cfg, "test_resnet", recipe=Recipe("focal"))


@pytest.mark.slow
def test_fidelity_oracle_is_trained_once_and_cached(prepared, digits, tmp_path, monkeypatch):
    """The oracle depends only on the oracle split, model and config: later runs load it."""
    from feedback_synth import storage
    from feedback_synth.training import oracle

    monkeypatch.setenv("FEEDBACK_SYNTH_CACHE", str(tmp_path / "cache"))
    synthetic = digits["val"]
    trained = []
    real_train = oracle.train_classifier
    monkeypatch.setattr(oracle, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    short = RetrainConfig(epochs=8)
    first = oracle.fidelity(prepared, synthetic, "test_resnet", device="cpu", oracle_url=str(tmp_path / "run1" / "oracle"),
                            train_cfg=short)
    second = oracle.fidelity(prepared, synthetic, "test_resnet", device="cpu", oracle_url=str(tmp_path / "run2" / "oracle"),
                             train_cfg=short)
    assert trained == [1] and first == second and 0.3 < first <= 1  # the val images: mostly right
    assert storage.exists(str(tmp_path / "run2" / "oracle" / "config.json"))  # each run keeps its copy
    # another split, model or config is another oracle
    split = digits["oracle"]
    key = oracle.oracle_cache_key(split, "test_resnet", RetrainConfig(seed=0))
    assert key != oracle.oracle_cache_key(split, "resnet18", RetrainConfig(seed=0))
    assert key != oracle.oracle_cache_key(split, "test_resnet", RetrainConfig(seed=1))
    fewer = ImageSet(split.images[1:], split.labels[1:], split.groups[1:], split.ids[1:], split.class_names)
    assert key != oracle.oracle_cache_key(fewer, "test_resnet", RetrainConfig(seed=0))


def test_the_builtin_datasets_oracle_ships_with_the_package(prepared, digits, monkeypatch, tmp_path):
    """A run on the built-in digits-lt with the default model measures fidelity with the shipped
    oracle: nothing is trained, nothing is cached, and every machine uses the same instrument."""
    from feedback_synth import storage
    from feedback_synth.training import oracle

    shipped = oracle.bundled_oracle_path(digits["oracle"], TrainConfig().model, oracle.oracle_config())
    assert storage.exists(storage.join(shipped, "config.json")), (
        "the built-in data, the default model or the oracle's training settings changed: "
        "run `feedback-synth pretrain-oracle` to ship the oracle that matches them")
    monkeypatch.setenv("FEEDBACK_SYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(oracle, "train_classifier", lambda *a, **k: pytest.fail("the shipped oracle was not used"))
    synthetic = digits["val"]
    fid = oracle.fidelity(prepared, synthetic, TrainConfig().model, device="cpu", oracle_url=str(tmp_path / "oracle"))
    preds = predict_logits(load_classifier(shipped, "cpu"), synthetic).argmax(1)
    assert fid == pytest.approx(float((preds == synthetic.labels).mean())) and fid > 0.9  # styled real digits
    assert storage.exists(str(tmp_path / "oracle" / "config.json")) and not (tmp_path / "cache").exists()
    # another model (or seed, or data) is not the shipped oracle's: it is trained
    assert oracle.bundled_oracle_path(digits["oracle"], "test_resnet", oracle.oracle_config()) != shipped
    assert oracle.bundled_oracle_path(digits["oracle"], TrainConfig().model, oracle.oracle_config(seed=1)) != shipped


def _baseline_and_kept_images(prepared, digits, tmp_path) -> tuple[str, str]:
    """A one-epoch logit-adjusted baseline and 60 pool images as the filter's kept set (their folders)."""
    from feedback_synth import storage
    from feedback_synth.stages.train_baseline import train_baseline

    base = str(tmp_path / "baseline")
    train_baseline(prepared, base, TrainConfig(model="test_resnet", epochs=1, loss="logit_adjusted", tau=2.0),
                   DataConfig())
    filtered = str(tmp_path / "filtered")
    digits["pool"].subset(np.arange(0, 600, 10)).save(f"{filtered}/synthetic.npz")
    storage.write_json(f"{filtered}/filter_report.json", {"generated": 60, "kept": 60})
    return base, filtered


@pytest.mark.slow
def test_retraining_takes_the_baselines_recipe_or_trains_a_same_recipe_reference(prepared, digits, tmp_path):
    """Like with like: retraining uses the baseline's loss unless told otherwise; with another loss,
    the retrain stage also trains that loss without synthesis, and the report compares with it. By
    default that reference also takes the retraining's optimiser steps (half-synthetic batches:
    twice the steps per epoch), so the baseline of the same epochs does not serve."""
    from feedback_synth import storage
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.stages.retrain import retrain

    base, filtered = _baseline_and_kept_images(prepared, digits, tmp_path)
    same = retrain(prepared, model_url(base), filtered, str(tmp_path / "same"),
                   RetrainConfig(epochs=1, reference_steps="epochs"), DataConfig())
    assert same.summary["recipe"] == {"loss": "logit_adjusted", "tau": 2.0, "balanced_sampler": False, "prior": "real"}
    assert same.summary["reference"] == "baseline" and not (tmp_path / "same" / "reference").exists()
    steps = retrain(prepared, model_url(base), filtered, str(tmp_path / "steps"), RetrainConfig(epochs=1), DataConfig())
    assert steps.summary["reference"] == "reference"
    n_real = len(load_split(prepared, "train"))
    trained = storage.read_yaml(str(tmp_path / "steps" / "reference" / "model" / "train_config.yaml"))["train"]
    assert trained["epochs"] == round(math.ceil(n_real / 32) / math.ceil(n_real / 64)) == 2  # 32 real per batch of 64
    assert storage.read_json(str(tmp_path / "steps" / "reference_metrics.json"))["epochs"] == 2
    other = retrain(prepared, model_url(base), filtered, str(tmp_path / "other"),
                           RetrainConfig(epochs=1, loss="balanced_softmax"), DataConfig())
    assert other.summary["recipe"]["loss"] == "balanced_softmax" and other.summary["reference"] == "reference"
    reference = storage.read_json(str(tmp_path / "other" / "reference_metrics.json"))
    baseline = storage.read_json(f"{base}/metrics.json")
    assert reference["source"] == "reference" and reference["per_class"] != baseline["per_class"]
    assert storage.read_yaml(str(tmp_path / "other" / "reference" / "model" / "train_config.yaml"))["num_synthetic"] == 0


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 10, 20, 37])
def test_the_one_cycle_schedule_runs_any_number_of_steps(total_steps):
    """torch's OneCycleLR divides by zero when the warm-up is exactly one step (10 steps at 10%):
    ``adapt.steps=10`` crashed adaptation, and 5 epochs of 2 batches crashed training."""
    from feedback_synth.training.train import one_cycle

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = one_cycle(opt, 0.1, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert len(lrs) == total_steps and all(0 < lr <= 0.1 + 1e-12 for lr in lrs)
    if total_steps >= 4:  # warm-up to the peak, then decay below it
        assert max(lrs) > 0.09 and lrs[-1] < 0.01 and lrs[0] < 0.05


@pytest.mark.parametrize("n_real, n_syn, batch, fraction, epochs, expected", [
    (184, 412, 64, 0.5, 40, 80),    # digits-lt: 6 half-real batches an epoch against 3 real ones
    (184, 412, 64, 0.25, 40, 53),   # 4 batches of 48 real: 160 steps, 53 real-only epochs of 3
    (184, 0, 64, 0.5, 40, 40),      # nothing kept: the retraining is real-only, so is its reference
    (184, 412, 64, 0.0, 40, 40),    # no synthetic share
    (10, 5, 64, 0.5, 1, 1),         # one batch either way
])
def test_the_same_steps_reference_takes_the_retrainings_optimiser_steps(n_real, n_syn, batch, fraction, epochs,
                                                                         expected):
    from feedback_synth.training.train import epoch_steps, same_steps_epochs

    assert same_steps_epochs(epochs, n_real, n_syn, batch, fraction) == expected
    with_synthesis = epochs * epoch_steps(n_real, n_syn, batch, fraction)
    assert abs(expected * epoch_steps(n_real, 0, batch, 0.0) - with_synthesis) <= epoch_steps(n_real, 0, batch, 0.0) / 2


@pytest.mark.slow
def test_pretrain_oracle_writes_a_half_precision_oracle_that_fidelity_would_train(tmp_path, capsys):
    """The command that builds the shipped oracle: the oracle split, ``oracle_config``, float16 on disk."""
    from feedback_synth import storage
    from feedback_synth.cli.main import main

    assert main(["pretrain-oracle", "--model", "test_resnet", "--output", str(tmp_path / "oracle")]) == 0
    assert f"oracle written to {tmp_path / 'oracle'}" in capsys.readouterr().out
    from safetensors.torch import load as load_safetensors

    state = load_safetensors(storage.read_bytes(str(tmp_path / "oracle" / "model.safetensors")))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    oracle = load_classifier(str(tmp_path / "oracle"), "cpu")
    assert oracle.spec.model == "test_resnet" and oracle.spec.train_class_counts == [60] * 10  # the oracle split


def test_distillation_pulls_the_student_to_its_teacher_and_weight_zero_is_plain_training(small_classifier, digits):
    from feedback_synth.training.train import distillation_loss

    teacher, _ = small_classifier
    x = digits["test"].to_tensor()[:64]
    with torch.no_grad():
        own = teacher(x)
    assert float(distillation_loss(own, teacher, x, 2.0)) == pytest.approx(0.0, abs=1e-5)  # KL(p || p)
    assert float(distillation_loss(own.flip(1), teacher, x, 2.0)) > 0.1
    # a teacher that says the rarest class for everything: a strong pull makes the student say it too
    biased = copy.deepcopy(teacher)
    rarest = int(digits["train"].class_counts().argmin())
    biased.set_logit_bias([20.0 if c == rarest else 0.0 for c in range(teacher.spec.num_classes)])
    cfg = RetrainConfig(epochs=1, seed=0)
    plain, plain_hist = train_classifier(digits["train"], cfg, "test_resnet")
    zero, zero_hist = train_classifier(digits["train"], cfg, "test_resnet", teacher=biased, distill_weight=0.0)
    pulled, _ = train_classifier(digits["train"], cfg, "test_resnet", teacher=biased, distill_weight=20.0)
    assert zero_hist == plain_hist
    share_of_rarest = [float((predict_logits(m, digits["test"]).argmax(1) == rarest).mean()) for m in (plain, pulled)]
    assert share_of_rarest[1] > max(0.5, 2 * share_of_rarest[0]), share_of_rarest
    assert biased.training is False  # the teacher is frozen in eval mode


def test_distillation_by_real_share_weighs_each_class_by_its_real_images():
    from feedback_synth.training.train import distill_class_weights

    real, synthetic = np.array([100, 10, 2, 0]), np.array([0, 90, 98, 0])
    assert distill_class_weights(real, synthetic, "all").tolist() == [1, 1, 1, 1]
    assert distill_class_weights(real, synthetic, "real_share").tolist() == pytest.approx([1.0, 0.1, 0.02, 0.0])
    with pytest.raises(ValueError, match="unknown distill_classes 'some'"):
        distill_class_weights(real, synthetic, "some")


def test_retraining_distils_from_its_no_synthesis_reference(prepared, digits, tmp_path, monkeypatch):
    """retrain.distill_weight: the teacher is the no-synthesis reference, the model trained here, or
    the baseline where it serves as the reference, or round 1's reference in a later round."""
    from feedback_synth import storage
    from feedback_synth.stages import retrain as retrain_module
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.training import train as train_module

    base, filtered = _baseline_and_kept_images(prepared, digits, tmp_path)
    teachers = []
    real_train = train_module.train_classifier

    def spy(*args, **kwargs):  # records which teacher each retraining got
        if kwargs.get("synthetic") is not None:
            teachers.append(kwargs.get("teacher"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_classifier", spy)
    cfg = RetrainConfig(epochs=1, head_epochs=0, distill_weight=1.0)
    distilled = retrain_module.retrain(prepared, model_url(base), filtered, str(tmp_path / "distilled"), cfg,
                                       DataConfig())
    reference = storage.read_json(str(tmp_path / "distilled" / "reference_metrics.json"))
    assert reference["model_url"] == model_url(str(tmp_path / "distilled" / "reference"))
    assert reference["model_path"] == "reference/model"  # also relative to its folder: it moves with the run
    assert distilled.summary["distill_weight"] == 1.0
    from feedback_synth.reporting.tables import format_report
    from feedback_synth.stages.evaluate import _distill_weight

    report = {"no_synthesis": {"overall": 0.5}, "retrained": {"overall": 0.6}, "delta": {"overall": 0.1},
              "generated": 60, "kept": 60, "distill_weight": _distill_weight(
                  storage.read_yaml(model_url(str(tmp_path / "distilled")) + "/train_config.yaml"), 60)}
    assert "| with synthesis (ce, distilled from no synthesis at 1) | 0.600 |" in format_report(report)
    assert "distilled" not in format_report({**report, "distill_weight": 0.0})
    x = digits["test"].to_tensor()[:16]
    assert torch.equal(teachers[0](x), load_classifier(reference["model_url"], "cpu")(x))
    # the baseline as the reference (the same recipe and epochs), and round 2 from round 1's record
    retrain_module.retrain(prepared, model_url(base), filtered, str(tmp_path / "epochs"),
                           RetrainConfig(epochs=1, head_epochs=0, distill_weight=1.0, reference_steps="epochs"),
                           DataConfig())
    assert torch.equal(teachers[1](x), load_classifier(model_url(base), "cpu")(x))
    retrain_module.retrain(prepared, model_url(base), filtered, str(tmp_path / "round2"), cfg, DataConfig(),
                           previous_retrained_url=str(tmp_path / "distilled"), round_index=2)
    assert torch.equal(teachers[2](x), teachers[0](x))
