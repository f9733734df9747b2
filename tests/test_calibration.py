"""No class group loses: retraining's post-hoc offset, chosen on validation (training.calibration)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from feedback_synth.config import DataConfig, RetrainConfig, TrainConfig
from feedback_synth.data.imageset import ImageSet
from feedback_synth.training.calibration import choose_weight, prior_offset
from feedback_synth.training.evaluate import accuracy_metrics

# 2 classes: 0 is many-shot (100 train images), 1 is few-shot (5)
COUNTS = [100, 5]
CFG = DataConfig(many_threshold=50, few_threshold=10)


def _val(n: int = 10) -> ImageSet:
    labels = np.repeat([0, 1], n)
    return ImageSet(np.zeros((2 * n, 4, 4, 1), np.uint8), labels, np.zeros(2 * n, np.int64),
                    np.array([f"v{i}" for i in range(2 * n)]), ["many", "few"])


def test_the_offset_undoes_the_double_correction_toward_the_rare_class():
    # synthesis balanced the stream: the real prior over-corrects, so the offset lowers the rare class
    offset = prior_offset("logit_adjusted", 2.0, np.array(COUNTS), np.array([1, 95]), 0.5)
    assert offset[1] < offset[0] and abs(offset.sum()) < 1e-9
    # by hand: tau (log p_real - log p_batch), centred
    p_real = np.array(COUNTS) / 105
    p_batch = 0.5 * p_real + 0.5 * np.array([1, 95]) / 96
    want = 2.0 * (np.log(p_real) - np.log(p_batch))
    assert np.allclose(offset, want - want.mean())
    # no synthetic image: the two priors agree and there is nothing to undo
    assert np.allclose(prior_offset("logit_adjusted", 2.0, np.array(COUNTS), np.array([0, 0]), 0.5), 0)
    # cross-entropy has no prior in its loss: the offset is the post-hoc adjustment toward balance,
    # -log p_batch (here the stream, 20% synthetic, still favours class 0)
    ce = prior_offset("ce", 1.0, np.array(COUNTS), np.array([1, 20]), 0.2)
    p_batch = 0.8 * p_real + 0.2 * np.array([1, 20]) / 21
    assert ce[1] > ce[0] and np.allclose(ce, -np.log(p_batch) + np.log(p_batch).mean())


def test_the_weight_keeps_every_group_then_maximises_the_metric():
    val = _val()
    # margins (logit 0 - logit 1) of the retrained model on validation: it over-predicts the rare
    # class, so 4 many-shot images fall to it; an offset of +1 per unit weight for class 0
    margins = np.r_[[2, 2, 2, 2, 2, 2, -0.3, -0.3, -0.6, -0.9], [-2, -2, -2, -2, -2, -2, -2, -0.2, -0.4, -0.8]]
    logits = np.stack([margins, np.zeros_like(margins)], 1)
    offset = np.array([1.0, 0.0])
    # the replaced model: many-shot 0.9, few-shot 0.5
    ref = accuracy_metrics(np.r_[[0] * 9 + [1], [1] * 5 + [0] * 5], val, COUNTS, CFG)
    chosen = choose_weight(logits, val, COUNTS, CFG, offset, ref, grid=(0.0, 0.25, 0.5, 0.75, 1.0))
    rows = {r["weight"]: r for r in chosen.table}
    assert rows[0.0]["many"] == 0.6 and rows[0.0]["few"] == 1.0  # as trained: many-shot loses
    # weight 0.75: many 0.9 (= the replaced model), few 0.8; weight 1.0: many 1.0, few 0.7
    assert rows[0.75]["many"] == 0.9 and rows[0.75]["few"] == 0.8 and rows[1.0]["few"] == 0.7
    assert chosen.feasible and chosen.weight == 0.75 and chosen.metric == "few"
    assert np.allclose(chosen.logit_bias, [0.75, 0.0])
    # a replaced model no weight can match (perfect): the smallest worst loss, -0.2 at weights 0.5
    # (many 0.8, few 0.8) and 0.75 (many 0.9, few 0.8); the tie goes to the better overall
    better = accuracy_metrics(val.labels, val, COUNTS, CFG)
    fallback = choose_weight(logits, val, COUNTS, CFG, offset, better, grid=(0.0, 0.25, 0.5, 0.75, 1.0))
    assert not fallback.feasible and fallback.weight == 0.75
    assert [round(r["worst_change"], 6) for r in fallback.table] == [-0.4, -0.4, -0.2, -0.2, -0.3]


def test_the_offset_travels_with_the_checkpoint(small_classifier, digits, memory_url):
    from feedback_synth.training.classifier import load_classifier, save_classifier
    from feedback_synth.training.evaluate import predict_logits

    clf, _ = small_classifier
    before = predict_logits(clf, digits["test"])
    bias = [0.5 * i for i in range(clf.spec.num_classes)]
    clf.set_logit_bias(bias)
    try:
        after = predict_logits(clf, digits["test"])
        assert np.allclose(after - before, np.array(bias)[None, :], atol=1e-5)
        _, logits = clf.features_and_logits(digits["test"].to_tensor()[:8])  # guidance sees the same logits
        assert np.allclose(logits.detach().numpy(), after[:8], atol=1e-5)
        save_classifier(clf, memory_url + "/calibrated")
        again = load_classifier(memory_url + "/calibrated", "cpu")
        assert again.spec.logit_bias == bias
        assert np.allclose(predict_logits(again, digits["test"]), after, atol=1e-5)
        with pytest.raises(ValueError, match="3 values for 10 classes"):
            clf.set_logit_bias([0.0, 1.0, 2.0])
        # a checkpoint whose config.json carries a bias of the wrong length: one line naming the file
        from feedback_synth import storage
        from feedback_synth.errors import DataError

        cfg = storage.read_json(memory_url + "/calibrated/config.json")
        storage.write_json(memory_url + "/calibrated/config.json", {**cfg, "logit_bias": [0.0, 1.0]})
        with pytest.raises(DataError, match=r"calibrated/config.json: .*logit_bias has 2 values for 10 classes"):
            load_classifier(memory_url + "/calibrated", "cpu")
    finally:
        clf.set_logit_bias([0.0] * clf.spec.num_classes)


@pytest.mark.slow
def test_retrain_ships_the_chosen_offset_and_says_why(prepared, digits, tmp_path):
    from feedback_synth import storage
    from feedback_synth.data.imageset import load_split
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.stages.retrain import retrain
    from feedback_synth.stages.train_baseline import train_baseline
    from feedback_synth.training.classifier import load_classifier

    base = str(tmp_path / "baseline")
    train_baseline(prepared, base, TrainConfig(model="test_resnet", epochs=2, loss="logit_adjusted", tau=2.0),
                          DataConfig())
    filtered = str(tmp_path / "filtered")
    pool = digits["pool"]
    rare = np.flatnonzero(np.isin(pool.labels, [7, 8, 9]))[:60]  # synthesis for the rare classes only
    pool.subset(rare).save(f"{filtered}/synthetic.npz")
    storage.write_json(f"{filtered}/filter_report.json", {"generated": 60, "kept": 60})
    out = retrain(prepared, model_url(base), filtered, str(tmp_path / "retrained"),
                         RetrainConfig(epochs=2, calibration="no_group_loses", head_epochs=0), DataConfig())
    cal = storage.read_json(str(tmp_path / "retrained" / "calibration.json"))
    assert cal["weight"] in [r["weight"] for r in cal["table"]] and cal["metric"] == "few" and cal["reason"]
    clf = load_classifier(model_url(str(tmp_path / "retrained")), "cpu")
    assert np.allclose(clf.spec.logit_bias, cal["logit_bias"])
    assert out.metrics["calibration_weight"] == cal["weight"]
    chosen = next(r for r in cal["table"] if r["weight"] == cal["weight"])
    if cal["feasible"]:  # every class group at or above the no-synthesis reference on validation
        assert all(v >= 0 for v in chosen["changes"].values())
    # the shipped model's validation metrics are the chosen row's
    val = load_split(prepared, "val")
    from feedback_synth.training.evaluate import evaluate

    assert evaluate(clf, val, DataConfig())["few"] == pytest.approx(chosen["few"])
    # the yardstick is the no-synthesis reference the report and the gate compare with (trained here
    # with the retraining's steps), not the baseline it replaces
    assert cal["reference"] == "reference"
    reference_val = evaluate(load_classifier(model_url(str(tmp_path / "retrained" / "reference")), "cpu"), val,
                             DataConfig())
    for group, change in chosen["changes"].items():
        assert change == pytest.approx(chosen[group] - reference_val[group])
    # and its cross-fitted validation scores (what the pilot reads): each half of the split with the
    # weight chosen on the other half, the offset as calibrate computes it
    from feedback_synth.training.calibration import crossfit_predictions, prior_offset
    from feedback_synth.training.evaluate import accuracy_metrics, predict_logits, summary
    from feedback_synth.training.recipes import retrain_recipe
    from feedback_synth.training.train import drawn_class_mix

    recipe = retrain_recipe(RetrainConfig(epochs=2, calibration="no_group_loses", head_epochs=0), model_url(base))
    train = load_split(prepared, "train")
    counts = train.class_counts().tolist()
    offset = prior_offset(recipe.loss, recipe.tau, np.array(counts), np.bincount(pool.labels[rare], minlength=10), 0.5,
                          drawn_class_mix(train, recipe))
    assert np.allclose(cal["logit_bias"], cal["weight"] * offset, atol=1e-5)
    plain_logits = predict_logits(clf, val) - np.asarray(cal["logit_bias"], np.float32)[None, :]
    reference_predictions = predict_logits(load_classifier(model_url(str(tmp_path / "retrained" / "reference")), "cpu"),
                                           val).argmax(1)
    want = crossfit_predictions(plain_logits, val, counts, DataConfig(), offset, reference_predictions)
    assert cal["crossfit"] == pytest.approx(summary(accuracy_metrics(want, val, counts, DataConfig())))
    # 'none' ships the model as trained
    plain = retrain(prepared, model_url(base), filtered, str(tmp_path / "plain"),
                           RetrainConfig(epochs=2, calibration="none", head_epochs=0), DataConfig())
    assert "calibration_weight" not in plain.metrics and plain.summary["head_epochs"] == 0
    plain_clf = load_classifier(model_url(str(tmp_path / "plain")), "cpu")
    assert plain_clf.spec.logit_bias == []
    # the default: the head re-fit on the real images; the representation is the same model's
    head = retrain(prepared, model_url(base), filtered, str(tmp_path / "head"),
                          RetrainConfig(epochs=2, head_epochs=3), DataConfig())
    assert head.summary["head_epochs"] == 3
    head_clf = load_classifier(model_url(str(tmp_path / "head")), "cpu")
    fc_name = plain_clf.backbone.default_cfg.get("classifier", "fc")
    changed = {k for k, v in head_clf.state_dict().items() if not torch.equal(v, plain_clf.state_dict()[k])}
    assert changed and all(k.startswith(f"backbone.{fc_name}.") for k in changed), changed


def test_cross_fitted_scores_predict_each_half_with_the_other_halfs_weight():
    """Calibration's weight keeps every group on the split it was chosen on by construction, so its
    scores there say nothing about whether it holds: each half of the split is predicted with the
    weight chosen on the other half (what the pilot and the benchmarks' choice read)."""
    from feedback_synth.training.calibration import crossfit_halves, crossfit_predictions

    rng = np.random.default_rng(1)
    val = _val(21)  # 21 images a class: an odd one out
    first = crossfit_halves(val.labels, seed=3)
    assert np.array_equal(first, crossfit_halves(val.labels, seed=3))  # seeded
    assert all(abs(2 * first[val.labels == c].sum() - 21) == 1 for c in (0, 1))  # half of each class
    logits = rng.normal(size=(len(val), 2)).astype(np.float32)
    offset = np.array([1.0, -1.0])
    reference = rng.integers(0, 2, len(val))
    got = crossfit_predictions(logits, val, COUNTS, CFG, offset, reference, seed=3)
    for fit in (first, ~first):  # each half: the weight choose_weight picks on the other half
        fit_set = val.subset(np.flatnonzero(fit))
        chosen = choose_weight(logits[fit], fit_set, COUNTS, CFG, offset, accuracy_metrics(reference[fit], fit_set,
                                                                                            COUNTS, CFG))
        assert np.array_equal(got[~fit], (logits[~fit] + chosen.weight * offset[None, :]).argmax(1))
