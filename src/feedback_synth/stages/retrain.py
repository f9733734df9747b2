"""The retrain stage: the baseline's architecture on real + kept synthetic images, then the head
re-fit on the real images, and the no-synthesis reference with the same recipe."""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.config import DataConfig, RetrainConfig, result_settings
from feedback_synth.data.imageset import ImageSet, load_info, load_split
from feedback_synth.errors import DataError
from feedback_synth.stages.outputs import EpochHook, finish_training, model_url, val_eval
from feedback_synth.stages.result import StageResult
from feedback_synth.stages.resume import digests, run_stage
from feedback_synth.tracking.descriptors import synthetic_set
from feedback_synth.training.recipes import recipe_of, retrain_recipe, same_training


def retrain(dataset_url: str, baseline_model_url: str, filtered_url: str, output_url: str, cfg: RetrainConfig,
            data_cfg: DataConfig, on_epoch: EpochHook = None, overwrite: bool = False,
            previous_retrained_url: Optional[str] = None, round_index: int = 1) -> StageResult:
    """Retrain the baseline's architecture from scratch on real + kept synthetic images, with the
    baseline's loss and sampler unless ``cfg`` names its own (``retrain_recipe``).

    Writes ``model/``, ``metrics.json``, ``history.json``; ``reference_metrics.json``: the
    no-synthesis reference with the same recipe and, by default, the same optimiser steps
    (``cfg.reference_steps``; the baseline's test metrics when it was trained so; else a model
    trained with retraining's recipe on the real images alone, in ``reference/``);
    ``rounds.json``: every round's test metrics so far (``previous_retrained_url``: the previous
    round's output). With ``cfg.distill_weight`` > 0 the reference model is retraining's teacher
    (knowledge distillation on the real images: docs/method.md, No class group loses).
    """
    return run_stage("retrain", output_url, {"retrain": result_settings(cfg), "data": asdict(data_cfg),
                                             "round": round_index},
                     digests(data=dataset_url, baseline=baseline_model_url, filtered=filtered_url,
                             previous=previous_retrained_url),
                     lambda: _retrain(dataset_url, baseline_model_url, filtered_url, output_url, cfg, data_cfg,
                                      on_epoch, previous_retrained_url, round_index), overwrite)


def _retrain(dataset_url: str, baseline_model_url: str, filtered_url: str, output_url: str, cfg: RetrainConfig,
             data_cfg: DataConfig, on_epoch: EpochHook = None, previous_retrained_url: Optional[str] = None,
             round_index: int = 1) -> StageResult:
    from feedback_synth.devices import resolve_device
    from feedback_synth.training.classifier import classifier_spec, load_classifier
    from feedback_synth.training.evaluate import summary as summary_of
    from feedback_synth.training.train import refit_head, same_steps_epochs, train_classifier

    train = load_split(dataset_url, "train")
    synthetic = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    if synthetic.class_names != train.class_names:
        raise DataError(f"synthetic images in {filtered_url} have classes {synthetic.class_names[:5]}..., "
                        f"the dataset has {train.class_names[:5]}...")
    model = classifier_spec(baseline_model_url).model
    recipe = retrain_recipe(cfg, baseline_model_url)
    base_recipe = recipe_of(baseline_model_url)
    evaluate_on_val = val_eval(dataset_url, data_cfg)
    # the no-synthesis reference: retraining's recipe on the real images alone, with its optimiser
    # steps (reference_steps 'same') or its epochs; the baseline when that is how it was trained;
    # else trained here (once, in round 1)
    reference = storage.join(output_url, "reference")
    ref_cfg = replace(cfg, epochs=same_steps_epochs(cfg.epochs, len(train), len(synthetic), cfg.batch_size,
                                                    cfg.synthetic_fraction)) if cfg.reference_steps == "same" else cfg
    ref_clf = None
    if previous_retrained_url:
        history_so_far = storage.read_json(storage.join(previous_retrained_url, "rounds.json"))
        reference_metrics = storage.read_json(storage.join(previous_retrained_url, "reference_metrics.json"))
        if reference_metrics.get("model_url"):  # the run may have moved since
            reference_metrics["model_url"] = storage.relocated(previous_retrained_url,
                                                               reference_metrics.pop("model_path", None),
                                                               reference_metrics["model_url"])
    else:
        history_so_far = []
        if same_training(recipe, base_recipe, ref_cfg, baseline_model_url):
            reference_metrics = {**storage.read_json(storage.join(baseline_model_url.rsplit("/", 1)[0], "metrics.json")),
                                 "source": "baseline", "model_url": baseline_model_url}
        else:
            ref_clf, ref_history = train_classifier(train, ref_cfg, model, recipe=recipe, eval_fn=evaluate_on_val,
                                                    desc="reference (no synthesis)")
            ref = finish_training("reference", ref_clf, ref_history, dataset_url, reference, ref_cfg, data_cfg,
                                   {"model": model, "num_synthetic": 0, "recipe": asdict(recipe)})
            reference_metrics = {**{k: v for k, v in ref.summary.items() if k not in ("model", "recipe")},
                                 "source": "reference", "model_url": model_url(reference)}
        reference_metrics.update(epochs=ref_cfg.epochs, steps=cfg.reference_steps)
    # the no-synthesis reference (trained here, the baseline, or round 1's): distillation's teacher and
    # calibration's yardstick
    reference_clf = ref_clf
    calibrating = cfg.calibration != "none" and evaluate_on_val is not None  # it needs the validation split
    if reference_clf is None and len(synthetic) and (cfg.distill_weight > 0 or calibrating):
        reference_clf = load_classifier(reference_metrics.get("model_url") or baseline_model_url,
                                        resolve_device(cfg.device, "retrain.device"))
    teacher = reference_clf if cfg.distill_weight > 0 and len(synthetic) else None
    clf, history = train_classifier(train, cfg, model, synthetic=synthetic, synthetic_fraction=cfg.synthetic_fraction,
                                    recipe=recipe, on_epoch=on_epoch, eval_fn=evaluate_on_val,
                                    desc=f"retrain (round {round_index})", teacher=teacher,
                                    distill_weight=cfg.distill_weight, distill_temperature=cfg.distill_temperature,
                                    distill_classes=cfg.distill_classes)
    if cfg.head_epochs and len(synthetic):  # no class group loses: the head re-fit on the real images
        head_loss = refit_head(clf, train, cfg, recipe, cfg.head_epochs)[-1]["head_loss"]
        history[-1].update(head_loss=head_loss, **(evaluate_on_val(clf) if evaluate_on_val else {}))  # the shipped model's
    calibration = _calibrate(clf, dataset_url, reference_clf, train, synthetic, cfg, recipe, data_cfg)
    if calibration.get("weight") is not None:
        calibration["reference"] = reference_metrics.get("source")  # the yardstick: 'reference' or 'baseline'
    storage.write_json(storage.join(output_url, "calibration.json"), calibration)
    result = finish_training("retrain", clf, history, dataset_url, output_url, cfg, data_cfg,
                              {"model": model, "num_synthetic": len(synthetic), "recipe": asdict(recipe)})
    rounds = history_so_far + [{"round": round_index, "num_synthetic": len(synthetic),
                                "test": summary_of(result.summary), "val": (history[-1] if history else {})}]
    storage.write_json(storage.join(output_url, "rounds.json"), rounds)
    # the reference's checkpoint also relative to this folder, so that a later round finds it in a moved run
    storage.write_json(storage.join(output_url, "reference_metrics.json"), {
        **reference_metrics, **({"model_path": storage.relative(reference_metrics["model_url"], output_url)}
                                if reference_metrics.get("model_url") else {})})
    result.summary.update(round=round_index, reference=reference_metrics.get("source"),
                          head_epochs=cfg.head_epochs if len(synthetic) else 0,
                          distill_weight=cfg.distill_weight if len(synthetic) else 0.0)
    result.datasets.append(synthetic_set(filtered_url, "training", load_info(dataset_url).name))
    result.metrics["num_synthetic"] = float(len(synthetic))
    if calibration.get("weight") is not None:
        result.metrics["calibration_weight"] = float(calibration["weight"])
    return result


def _calibrate(clf, dataset_url: str, reference_clf, train: ImageSet, synthetic: ImageSet,
               cfg: RetrainConfig, recipe, data_cfg: DataConfig) -> dict[str, Any]:
    """No class group loses (training.calibration): set ``clf``'s logit offset, chosen on the
    validation split against ``reference_clf`` (the no-synthesis reference); what was chosen and why."""
    from feedback_synth.training.calibration import calibrate

    if cfg.calibration == "none":
        return {"weight": None, "reason": "retrain.calibration is 'none'"}
    if not len(synthetic):
        return {"weight": None, "reason": "no synthetic image was kept: nothing to calibrate"}
    if "val" not in load_info(dataset_url).splits:
        return {"weight": None, "reason": "the dataset has no validation split"}
    return calibrate(clf, load_split(dataset_url, "val"), reference_clf, train, synthetic, cfg.synthetic_fraction,
                     recipe, data_cfg, cfg.calibration_metric).to_dict()
