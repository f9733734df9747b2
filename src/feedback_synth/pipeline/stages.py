"""The pipeline's stages as plain functions: each reads and writes fsspec URLs, takes one typed
config, and returns a ``StageResult``. The CLI, the in-process runner and the KFP components all
call these (docs/method.md: the system).

    prepare_data -> train_baseline -> adapt_generator -> extract_feedback -> generate (sharded)
    -> filter_synthetic -> retrain -> evaluate_run -> promote (feedback_synth.registry)

Heavy libraries (timm, diffusers, scikit-learn) are imported inside the stage that needs them: a
KFP task imports only its own stage's, which keeps its start-up short.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.config import (
    AdaptConfig,
    DataConfig,
    FeedbackConfig,
    FilterConfig,
    GenerateConfig,
    RetrainConfig,
    TrainConfig,
    result_settings,
)
from feedback_synth.devices import resolve_device
from feedback_synth.data.imageset import ImageSet, load_info, load_split
from feedback_synth.errors import DataError
from feedback_synth.fingerprints import folder_digest
from feedback_synth.tracking.descriptors import splits, synthetic_set
from feedback_synth.synthesis.gap_checks import GapError, check_gap, filter_gap, gap_report  # noqa: F401  (re-exported)
from feedback_synth.training.recipes import baseline_recipe, recipe_of, retrain_recipe, same_training
from feedback_synth.pipeline.result import StageResult, scalar_metrics
from feedback_synth.pipeline.resume import digests, run_stage

log = logging.getLogger(__name__)

EpochHook = Optional[Callable[[dict[str, Any]], None]]


def model_url(stage_output_url: str) -> str:
    """Where a training stage puts its checkpoint folder."""
    return storage.join(stage_output_url, "model")


def plan_url(feedback_url: str) -> str:
    """Where extract_feedback puts the generation plan."""
    return storage.join(feedback_url, "plan.json")


def prepare_data(cfg: DataConfig, output_url: str, overwrite: bool = False) -> StageResult:
    """Load and check the dataset (built-in or URL) and write its splits to ``output_url``."""
    from feedback_synth.data.prepare import BUILTIN, scan_dataset

    if cfg.dataset not in BUILTIN:
        scan_dataset(cfg.dataset, cfg)  # fails fast (bounded wait) on an unreachable store, before the listing below
    source = {} if cfg.dataset in BUILTIN else {"dataset": folder_digest(cfg.dataset, content=False)}
    return run_stage("prepare_data", output_url, asdict(cfg), source, lambda: _prepare_data(cfg, output_url),
                     overwrite)


def _prepare_data(cfg: DataConfig, output_url: str) -> StageResult:
    from feedback_synth.data.prepare import prepare_dataset

    info = prepare_dataset(cfg, output_url)
    return StageResult("prepare_data", asdict(info), {"train_images": float(sum(info.train_class_counts)),
                                                       "classes": float(len(info.class_names))},
                       datasets=[splits(output_url, "train", "val", "test")])


def _val_eval(dataset_url: str, data_cfg: DataConfig) -> Optional[Callable]:
    from feedback_synth.training.evaluate import evaluate

    if "val" not in load_info(dataset_url).splits:
        return None
    val = load_split(dataset_url, "val")

    def fn(clf) -> dict[str, float]:
        m = evaluate(clf, val, data_cfg)
        return {"val_accuracy": m["overall"], **({"val_few": m["few"]} if m.get("few") is not None else {})}

    return fn


def _finish_training(stage: str, clf, history, dataset_url: str, output_url: str, cfg: Any, data_cfg: DataConfig,
                     extra: Optional[dict[str, Any]] = None) -> StageResult:
    import yaml

    from feedback_synth.training.classifier import save_classifier
    from feedback_synth.training.evaluate import evaluate

    metrics = evaluate(clf, load_split(dataset_url, "test"), data_cfg)
    save_classifier(clf, model_url(output_url), {"train_config.yaml": yaml.safe_dump(
        {"train": asdict(cfg), "data": asdict(data_cfg), **(extra or {})}, sort_keys=False)})
    storage.write_json(storage.join(output_url, "metrics.json"), metrics)
    storage.write_json(storage.join(output_url, "history.json"), history)
    return StageResult(stage, {**metrics, **(extra or {})}, scalar_metrics(metrics, "test_"),
                       datasets=[splits(dataset_url, "train", "val", "test")])


def train_baseline(dataset_url: str, output_url: str, cfg: TrainConfig, data_cfg: DataConfig,
                   on_epoch: EpochHook = None, overwrite: bool = False) -> StageResult:
    """Train the baseline classifier on the real (imbalanced) data and evaluate it on the test set.

    Writes ``model/`` (safetensors + config.json + train_config.yaml), ``metrics.json`` and
    ``history.json`` (per-epoch metrics) under ``output_url``.
    """
    return run_stage("train_baseline", output_url, {"train": result_settings(cfg), "data": asdict(data_cfg)},
                     digests(data=dataset_url),
                     lambda: _train_baseline(dataset_url, output_url, cfg, data_cfg, on_epoch), overwrite)


def _train_baseline(dataset_url: str, output_url: str, cfg: TrainConfig, data_cfg: DataConfig,
                   on_epoch: EpochHook = None) -> StageResult:
    from feedback_synth.training.train import train_classifier

    train = load_split(dataset_url, "train")
    clf, history = train_classifier(train, cfg, cfg.model, recipe=baseline_recipe(cfg), on_epoch=on_epoch,
                                    eval_fn=_val_eval(dataset_url, data_cfg), desc="baseline")
    return _finish_training("train_baseline", clf, history, dataset_url, output_url, cfg, data_cfg)


def adapt_generator(dataset_url: str, baseline_model_url: str, output_url: str, cfg: AdaptConfig,
                    gen_cfg: GenerateConfig, overwrite: bool = False) -> StageResult:
    """Fine-tune the generator (``gen_cfg.generator``) on the task's real training images
    (``generation.adapt``) and measure the gap to the real data before and after, per class.

    Writes ``generator/`` (a diffusers folder that generation loads instead of the original),
    ``adapt_report.json`` (losses, gap, near-copy share and diversity before and after, per
    class), ``loss.png`` and ``samples_before_after.png`` under ``output_url``. With
    ``cfg.method`` none it writes nothing and names the original generator. ``summary['generator']``
    is the generator folder to generate with either way.
    """
    from feedback_synth.generation.loading import generator_path

    if cfg.method == "none":
        return StageResult("adapt_generator", {"generator": gen_cfg.generator, "method": "none"})
    base = generator_path(gen_cfg.generator, load_info(dataset_url).name)
    sampling = {k: getattr(gen_cfg, k) for k in ("generator", "strength", "condition_on_real", "num_inference_steps",
                                                 "cfg_scale", "cond_dropout", "prompt_template", "class_map",
                                                 "noise_level")}
    return run_stage("adapt_generator", output_url, {"adapt": result_settings(cfg), "sampling": sampling},
                     {**digests(data=dataset_url, baseline=baseline_model_url), "generator": folder_digest(base)},
                     lambda: _adapt_generator(dataset_url, baseline_model_url, output_url, cfg, gen_cfg, base),
                     overwrite)


def _adapt_generator(dataset_url: str, baseline_model_url: str, output_url: str, cfg: AdaptConfig,
                     gen_cfg: GenerateConfig, base: str) -> StageResult:
    import numpy as np

    from feedback_synth.generation.adapt import adapt_unet, sample_per_class, save_adapted
    from feedback_synth.generation.adapters import adapter_of
    from feedback_synth.generation.loading import class_index, generator_meta, load_generator
    from feedback_synth.reporting import plots

    train = load_split(dataset_url, "train")
    info = load_info(dataset_url)
    index_map = class_index(base, train.class_names, gen_cfg.class_map)
    pipe = load_generator(gen_cfg.generator, info.name, device=resolve_device(cfg.device, "adapt.device"))
    kind = adapter_of(pipe).name
    before, labels = sample_per_class(pipe, train, cfg.samples_per_class, gen_cfg, index_map, cfg.seed)
    losses = adapt_unet(pipe, kind, train, cfg, index_map, gen_cfg.prompt_template, gen_cfg=gen_cfg)
    after, _ = sample_per_class(pipe, train, cfg.samples_per_class, gen_cfg, index_map, cfg.seed)
    meta = generator_meta(base)
    generator_url = storage.join(output_url, "generator")
    save_adapted(pipe, kind, cfg.method, base, generator_url, {
        **{k: v for k, v in meta.items() if k in ("class_names", "group_names", "joint_groups")},
        "class_names": meta.get("class_names") or train.class_names, "task_class_names": train.class_names,
        "adapted_from": base, "adapt": asdict(cfg), "final_loss": float(np.mean(losses[-50:]))})
    device = resolve_device(cfg.device, "adapt.device")
    gap_before = gap_report(dataset_url, baseline_model_url, before, labels, device)
    gap_after = gap_report(dataset_url, baseline_model_url, after, labels, device)
    report = {"method": cfg.method, "kind": kind, "generator": generator_url, "base": base, "losses": losses,
              "final_loss": float(np.mean(losses[-50:])), "class_names": train.class_names,
              "train_class_counts": train.class_counts().tolist(), "before": gap_before, "after": gap_after,
              "copy_guard": getattr(losses, "copy_guard", None)}
    storage.write_json(storage.join(output_url, "adapt_report.json"), report)
    storage.write_bytes(storage.join(output_url, "loss.png"), plots.loss_curve(losses, f"adapting the generator ({cfg.method})"))
    storage.write_bytes(storage.join(output_url, "samples_before_after.png"), plots.sample_grid(
        {"real (train)": (train.images, train.labels), "before adaptation": (before, labels),
         "after adaptation": (after, labels)}, train.class_names,
        title="Unguided samples per class, before and after adapting the generator to the task"))
    storage.write_bytes(storage.join(output_url, "gap_per_class.png"), plots.gap_per_class(
        gap_before, gap_after, train.class_names, train.class_counts().tolist()))
    metrics = {"final_loss": report["final_loss"]}
    for when, g in (("before", gap_before), ("after", gap_after)):
        for measure in ("off_support", "discriminator", "near_copy", "diversity"):
            if g[measure]["overall"] is not None:
                metrics[f"{measure}_{when}"] = g[measure]["overall"]
    weights = [u for u in storage.find(generator_url) if u.endswith(".safetensors")]
    summary = {k: v for k, v in report.items() if k != "losses"}
    return StageResult("adapt_generator", summary, metrics,
                       [storage.join(output_url, n) for n in ("adapt_report.json", "loss.png", "samples_before_after.png",
                                                               "gap_per_class.png")] + weights,
                       datasets=[splits(dataset_url, "train", "val")])


def extract_feedback(dataset_url: str, baseline_model_url: str, output_url: str, cfg: FeedbackConfig,
                     round_index: int = 1, previous_feedback_url: Optional[str] = None,
                     overwrite: bool = False) -> StageResult:
    """Freeze the classifier, fit the class statistics of ``hardness``, and plan the generation.

    In rounds (``cfg.rounds`` > 1), ``baseline_model_url`` is the latest model (the baseline in
    round 1, the previous round's retrained model after that), its validation mistakes per cell
    steer the round's share of the budget, and ``previous_feedback_url`` (the previous round's
    output) says where each cell's image indices continue (synthesis.plan).
    """
    return run_stage("extract_feedback", output_url, {"feedback": result_settings(cfg), "round": round_index},
                     digests(data=dataset_url, model=baseline_model_url, previous=previous_feedback_url),
                     lambda: _extract_feedback(dataset_url, baseline_model_url, output_url, cfg, round_index,
                                               previous_feedback_url), overwrite)


def _extract_feedback(dataset_url: str, baseline_model_url: str, output_url: str, cfg: FeedbackConfig,
                     round_index: int = 1, previous_feedback_url: Optional[str] = None) -> StageResult:
    from feedback_synth.synthesis.feedback import extract_features, fit_class_stats, save_class_stats
    from feedback_synth.synthesis.plan import GenerationPlan, make_plan
    from feedback_synth.training.classifier import load_classifier

    train = load_split(dataset_url, "train")
    clf = load_classifier(baseline_model_url, resolve_device(cfg.device, "feedback.device"))
    reference, val_errors = None, None
    if "val" in load_info(dataset_url).splits:  # held-out real images: the off_support yardstick
        val = load_split(dataset_url, "val")
        val_feats = extract_features(clf, val)
        reference = (val_feats, val.labels)
        if round_index > 1:
            val_errors = cell_errors(clf, val, cfg.per_group)
    stats = fit_class_stats(extract_features(clf, train), train.labels, train.num_classes, cfg.shrinkage, reference)
    save_class_stats(stats, output_url)
    offsets = GenerationPlan.load(plan_url(previous_feedback_url)).next_offsets() if previous_feedback_url else None
    plan = make_plan(train, cfg, round_index, val_errors, offsets)
    plan.save(plan_url(output_url))
    storage.write_json(storage.join(output_url, "feedback_config.json"), result_settings(cfg))
    summary = {"num_images": plan.total, "num_shards": len(plan.shards), "target": plan.target,
               "shrinkage": stats.shrinkage, "counts": plan.counts, "round": round_index, "rounds": cfg.rounds,
               "steered_by_validation": val_errors is not None}
    return StageResult("extract_feedback", summary, {"planned_images": float(plan.total),
                                                     "shards": float(len(plan.shards)), "shrinkage": stats.shrinkage},
                       datasets=[splits(dataset_url, "train", "val")])


def cell_errors(clf, data: ImageSet, per_group: bool) -> dict[str, tuple[int, int]]:
    """``{cell key: (mistakes, images)}`` of ``clf`` on ``data``, per class or per (class, group)."""
    from feedback_synth.training.evaluate import predict_logits

    wrong = predict_logits(clf, data).argmax(1) != data.labels
    out = {}
    for c in range(data.num_classes):
        for g in range(data.num_groups if per_group else 1):
            mask = (data.labels == c) & ((data.groups == g) if per_group else True)
            key = f"{data.class_names[c]}/{data.group_names[g]}" if per_group else data.class_names[c]
            out[key] = (int(wrong[mask].sum()), int(mask.sum()))
    return out


def generate(dataset_url: str, baseline_model_url: str, feedback_url: str, output_url: str, cfg: GenerateConfig,
             shard_ids: Optional[list[int]] = None, overwrite: bool = False) -> StageResult:
    """Generate every shard of the plan (or ``shard_ids``) in this process. Shards resume on their
    own (``generation.shards``): one committed with the same fingerprint is skipped, one committed
    differently is refused unless ``overwrite``."""
    from feedback_synth.generation.shards import generate as generate_shards
    from feedback_synth.guidance.criteria import CRITERIA

    CRITERIA.check(cfg.criterion, "generate.criterion")
    summary = generate_shards(plan_url(feedback_url), dataset_url, baseline_model_url, feedback_url, output_url, cfg,
                              shard_ids=shard_ids, overwrite=overwrite)
    return StageResult("generate", summary, {"generated_images": float(summary["num_images"]),
                                             "generation_seconds": float(summary["seconds"])},
                       datasets=[splits(dataset_url, "train")])


def filter_synthetic(dataset_url: str, baseline_model_url: str, feedback_url: str, generated_url: str | list[str],
                     output_url: str, cfg: FilterConfig, previous_filtered_url: Optional[str] = None,
                     overwrite: bool = False) -> StageResult:
    """Filter the generated images (``generated_url``: the generate output, or one per shard task).

    Writes ``synthetic.npz`` (the kept images, plus those kept by earlier rounds when
    ``previous_filtered_url`` names the previous round's output), ``kept_metadata.json`` (their
    metadata rows), ``filter_report.json`` (per class: generated, kept, dropped by which filter and
    why, re-admitted), ``filter_table.md`` and ``samples.png``. Stops with the report's reasons
    when the filters leave nothing of a non-empty round.
    """
    from feedback_synth.generation.shards import generated_digest
    from feedback_synth.synthesis.plan import GenerationPlan

    shards = generated_digest(generated_url, GenerationPlan.load(plan_url(feedback_url)))
    inputs = {**digests(data=dataset_url, model=baseline_model_url, feedback=feedback_url,
                        previous=previous_filtered_url), "generated": shards}
    return run_stage("filter", output_url, result_settings(cfg), inputs,
                     lambda: _filter_synthetic(dataset_url, baseline_model_url, feedback_url, generated_url, output_url,
                                               cfg, previous_filtered_url), overwrite)


def _filter_synthetic(dataset_url: str, baseline_model_url: str, feedback_url: str, generated_url: str | list[str],
                     output_url: str, cfg: FilterConfig, previous_filtered_url: Optional[str] = None) -> StageResult:
    import numpy as np

    from feedback_synth.generation.shards import load_generated
    from feedback_synth.reporting import plots
    from feedback_synth.synthesis.feedback import extract_features, load_class_stats
    from feedback_synth.synthesis.filtering import FilterInputs, apply_filters, filter_table
    from feedback_synth.synthesis.plan import GenerationPlan
    from feedback_synth.training.classifier import load_classifier

    train = load_split(dataset_url, "train")
    plan = GenerationPlan.load(plan_url(feedback_url))
    generated, rows = load_generated(generated_url, plan, train)
    clf = load_classifier(baseline_model_url, resolve_device(cfg.device, "filter.device"))
    inp = FilterInputs(generated.images, generated.labels, np.array([r["finite"] for r in rows], bool),
                       extract_features(clf, generated), extract_features(clf, train), train.labels,
                       load_class_stats(feedback_url), real_images=train.images)
    keep, report = apply_filters(inp, cfg, train.class_names)
    report["gap"] = filter_gap(dataset_url, clf, inp, generated, keep, train)
    kept = generated.subset(np.flatnonzero(keep))
    kept_rows = [r for r, k in zip(rows, keep) if k]
    crit = [r["criterion_value"] for r in rows]
    report["mean_criterion_value"] = float(np.mean(crit)) if crit else None
    report["criterion"] = rows[0]["criterion"] if rows else None
    report["round"] = plan.round
    report["plan"] = plan_url(feedback_url)
    report["generate_config"] = generate_config_of(generated_url, plan)
    earlier = 0
    if previous_filtered_url:  # rounds: retraining takes every image kept so far
        before = ImageSet.load(storage.join(previous_filtered_url, "synthetic.npz"))
        earlier = len(before)
        kept = ImageSet.concat([before, kept])
        kept_rows = storage.read_json(storage.join(previous_filtered_url, "kept_metadata.json")) + kept_rows
    report["kept_so_far"] = len(kept)
    report["generated_so_far"] = report["generated"] + (storage.read_json(storage.join(
        previous_filtered_url, "filter_report.json"))["generated_so_far"] if previous_filtered_url else 0)
    storage.write_json(storage.join(output_url, "filter_report.json"), report)
    storage.write_text(storage.join(output_url, "filter_table.md"), filter_table(report))
    check_gap(report, cfg, storage.join(output_url, "filter_table.md"))
    if report["generated"] and not report["kept"]:
        dropped = ", ".join(f"{f['name']} {f['dropped']} ({f['reason']})" for f in report["filters"])
        raise DataError(f"the filters dropped all {report['generated']} synthetic images: {dropped}. Nothing to "
                        f"retrain on; see {storage.join(output_url, 'filter_report.json')} and loosen filter.* "
                        f"(or check the generator against the data)")
    kept.save(storage.join(output_url, "synthetic.npz"))
    storage.write_json(storage.join(output_url, "kept_metadata.json"), kept_rows)
    storage.write_bytes(storage.join(output_url, "samples.png"), plots.sample_grid(
        {"real (train)": (train.images, train.labels), "synthetic (kept)": (kept.images[earlier:], kept.labels[earlier:])},
        train.class_names, title="Real training images and kept synthetic images per class"))
    if report["starved"]:
        log.warning("filter: classes %s keep less than %.0f%% of their generated images even after re-admission "
                    "(see %s)", ", ".join(report["starved"]), 100 * cfg.min_kept_fraction,
                    storage.join(output_url, "filter_table.md"))
    metrics = {"generated": report["generated"], "kept": report["kept"], "readmitted": report["readmitted"],
               "starved_classes": len(report["starved"]), "kept_so_far": len(kept),
               "mean_criterion_value": report["mean_criterion_value"]}
    return StageResult("filter", report, scalar_metrics(metrics),
                       [storage.join(output_url, n) for n in ("filter_report.json", "filter_table.md", "samples.png")],
                       datasets=[splits(dataset_url, "train")])


def retrain(dataset_url: str, baseline_model_url: str, filtered_url: str, output_url: str, cfg: RetrainConfig,
            data_cfg: DataConfig, on_epoch: EpochHook = None, overwrite: bool = False,
            previous_retrained_url: Optional[str] = None, round_index: int = 1) -> StageResult:
    """Retrain the baseline's architecture from scratch on real + kept synthetic images, with the
    baseline's loss and sampler unless ``cfg`` names its own (``retrain_recipe``).

    Writes ``model/``, ``metrics.json``, ``history.json``; ``reference_metrics.json``: the
    no-synthesis reference with the same recipe (the baseline's test metrics when the recipes
    agree; else a model trained with retraining's recipe on the real images alone, in
    ``reference/``); ``rounds.json``: every round's test metrics so far (``previous_retrained_url``:
    the previous round's output).
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
    from feedback_synth.training.classifier import classifier_spec
    from feedback_synth.training.evaluate import summary as summary_of
    from feedback_synth.training.train import refit_head, train_classifier

    train = load_split(dataset_url, "train")
    synthetic = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    if synthetic.class_names != train.class_names:
        raise DataError(f"synthetic images in {filtered_url} have classes {synthetic.class_names[:5]}..., "
                        f"the dataset has {train.class_names[:5]}...")
    model = classifier_spec(baseline_model_url).model
    recipe = retrain_recipe(cfg, baseline_model_url)
    base_recipe = recipe_of(baseline_model_url)
    val_eval = _val_eval(dataset_url, data_cfg)
    # the no-synthesis reference: the baseline when the recipes agree; else the baseline's
    # architecture trained with retraining's recipe on the real images alone (once, in round 1)
    reference = storage.join(output_url, "reference")
    if previous_retrained_url:
        history_so_far = storage.read_json(storage.join(previous_retrained_url, "rounds.json"))
        reference_metrics = storage.read_json(storage.join(previous_retrained_url, "reference_metrics.json"))
    else:
        history_so_far = []
        if same_training(recipe, base_recipe, cfg, baseline_model_url):
            reference_metrics = {**storage.read_json(storage.join(baseline_model_url.rsplit("/", 1)[0], "metrics.json")),
                                 "source": "baseline"}
        else:
            ref_clf, ref_history = train_classifier(train, cfg, model, recipe=recipe, eval_fn=val_eval,
                                                    desc="reference (no synthesis)")
            ref = _finish_training("reference", ref_clf, ref_history, dataset_url, reference, cfg, data_cfg,
                                   {"model": model, "num_synthetic": 0, "recipe": asdict(recipe)})
            reference_metrics = {**{k: v for k, v in ref.summary.items() if k not in ("model", "recipe")},
                                 "source": "reference"}
    clf, history = train_classifier(train, cfg, model, synthetic=synthetic, synthetic_fraction=cfg.synthetic_fraction,
                                    recipe=recipe, on_epoch=on_epoch, eval_fn=val_eval, desc=f"retrain (round {round_index})")
    if cfg.head_epochs and len(synthetic):  # no class group loses: the head re-fit on the real images
        head_loss = refit_head(clf, train, cfg, recipe, cfg.head_epochs)[-1]["head_loss"]
        history[-1].update(head_loss=head_loss, **(val_eval(clf) if val_eval else {}))  # the shipped model's
    calibration = _calibrate(clf, dataset_url, baseline_model_url, train, synthetic, cfg, recipe, data_cfg)
    storage.write_json(storage.join(output_url, "calibration.json"), calibration)
    result = _finish_training("retrain", clf, history, dataset_url, output_url, cfg, data_cfg,
                              {"model": model, "num_synthetic": len(synthetic), "recipe": asdict(recipe)})
    rounds = history_so_far + [{"round": round_index, "num_synthetic": len(synthetic),
                                "test": summary_of(result.summary), "val": (history[-1] if history else {})}]
    storage.write_json(storage.join(output_url, "rounds.json"), rounds)
    storage.write_json(storage.join(output_url, "reference_metrics.json"), reference_metrics)
    result.summary.update(round=round_index, reference=reference_metrics.get("source"),
                          head_epochs=cfg.head_epochs if len(synthetic) else 0)
    result.datasets.append(synthetic_set(filtered_url, "training", load_info(dataset_url).name))
    result.metrics["num_synthetic"] = float(len(synthetic))
    if calibration.get("weight") is not None:
        result.metrics["calibration_weight"] = float(calibration["weight"])
    return result


def _calibrate(clf, dataset_url: str, replaced_model_url: str, train: ImageSet, synthetic: ImageSet,
               cfg: RetrainConfig, recipe, data_cfg: DataConfig) -> dict[str, Any]:
    """No class group loses (training.calibration): set ``clf``'s logit offset, chosen on the
    validation split against the model it replaces; what was chosen and why."""
    from feedback_synth.devices import module_device
    from feedback_synth.training.calibration import calibrate
    from feedback_synth.training.classifier import load_classifier

    if cfg.calibration == "none":
        return {"weight": None, "reason": "retrain.calibration is 'none'"}
    if not len(synthetic):
        return {"weight": None, "reason": "no synthetic image was kept: nothing to calibrate"}
    if "val" not in load_info(dataset_url).splits:
        return {"weight": None, "reason": "the dataset has no validation split"}
    replaced = load_classifier(replaced_model_url, str(module_device(clf)))
    return calibrate(clf, load_split(dataset_url, "val"), replaced, train, synthetic, cfg.synthetic_fraction, recipe,
                     data_cfg, cfg.calibration_metric).to_dict()


def generate_config_of(generated_url: str | list[str], plan) -> dict[str, Any]:
    """The generate config of a plan's committed shards (their fingerprints record it)."""
    from feedback_synth.generation.shards import find_shard

    for s in plan.shards:
        url = find_shard(generated_url, s.shard_id)
        if url:
            return (storage.read_json(storage.join(url, "_SUCCESS")).get("config") or {}).get("generate", {})
    return {}


REPORT_FILES = ("report.md", "per_class_accuracy.png", "confusion_baseline.png", "confusion_retrained.png")


def evaluate_run(dataset_url: str, baseline_url: str, retrained_url: str, filtered_url: str, output_url: str,
                 data_cfg: DataConfig, *, device: str, overwrite: bool = False,
                 adapted_url: Optional[str] = None) -> StageResult:
    """Compare baseline and retrained models; write ``report.json``, ``report.md`` and the plots,
    with the gap to the real data per class (the filter's, and adapt_generator's before/after
    when ``adapted_url`` holds an adaptation). ``device``: where the fidelity oracle trains and
    runs (the run's device; not part of the fingerprint)."""
    adapted = adapted_url if adapted_url and storage.exists(storage.join(adapted_url, "adapt_report.json")) else None
    return run_stage("evaluate", output_url, asdict(data_cfg),
                     digests(data=dataset_url, baseline=baseline_url, retrained=retrained_url, filtered=filtered_url,
                             adapted=adapted),
                     lambda: _evaluate_run(dataset_url, baseline_url, retrained_url, filtered_url, output_url, data_cfg,
                                           resolve_device(device), adapted),
                     overwrite)


def _evaluate_run(dataset_url: str, baseline_url: str, retrained_url: str, filtered_url: str, output_url: str,
                  data_cfg: DataConfig, device: str, adapted_url: Optional[str] = None) -> StageResult:
    from feedback_synth.training.oracle import fidelity
    from feedback_synth.reporting import plots
    from feedback_synth.reporting.tables import format_report
    from feedback_synth.training.classifier import classifier_spec
    from feedback_synth.training.evaluate import summary

    first = storage.read_json(storage.join(baseline_url, "metrics.json"))
    reference = storage.read_json(storage.join(retrained_url, "reference_metrics.json"))
    after = storage.read_json(storage.join(retrained_url, "metrics.json"))
    rounds = storage.read_json(storage.join(retrained_url, "rounds.json"))
    info = load_info(dataset_url)
    synthetic = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    filter_report = storage.read_json(storage.join(filtered_url, "filter_report.json"))
    model = classifier_spec(model_url(baseline_url)).model
    recipe = recipe_of(model_url(retrained_url))
    fid = fidelity(dataset_url, synthetic, model, device=device, oracle_url=storage.join(output_url, "oracle"))
    storage.write_bytes(storage.join(output_url, "per_class_accuracy.png"), plots.per_class_accuracy(
        reference["per_class"], after["per_class"], info.class_names, info.train_class_counts,
        labels=(f"no synthesis ({recipe.loss})", f"with synthesis ({recipe.loss})")))
    for name, m in (("baseline", reference), ("retrained", after)):
        storage.write_bytes(storage.join(output_url, f"confusion_{name}.png"),
                            plots.confusion_matrix(m["confusion_matrix"], info.class_names, f"{name} (test)"))
    from feedback_synth.reporting.tables import EvaluationReport

    b, a = summary(reference), summary(after)
    report: EvaluationReport = {"baseline": b, "retrained": a, "delta": {k: v - b[k] for k, v in a.items() if k in b},
              "recipe": asdict(recipe), "baseline_source": reference.get("source", "baseline"),
              "first_baseline": summary(first),
              "generated": filter_report.get("generated_so_far", filter_report["generated"]),
              "kept": len(synthetic), "readmitted": filter_report.get("readmitted", 0),
              "starved": filter_report.get("starved", []), "off_support_classes": filter_report.get("off_support_classes", []),
              "copy_classes": filter_report.get("copy_classes", []),
              "fidelity": fid,
              "rounds": [{"round": r["round"], "num_synthetic": r["num_synthetic"], **r["test"]} for r in rounds],
              "per_class": {"baseline": reference["per_class"], "retrained": after["per_class"]},
              "class_names": info.class_names, "train_class_counts": info.train_class_counts}
    files = list(REPORT_FILES)
    adaptation = None
    if adapted_url:
        adaptation = {k: v for k, v in storage.read_json(storage.join(adapted_url, "adapt_report.json")).items()
                      if k != "losses"}
    report["gap"], report["adaptation"] = filter_report.get("gap"), adaptation
    if report["gap"] or adaptation:
        storage.write_bytes(storage.join(output_url, "gap_per_class.png"), plots.gap_per_class(
            adaptation["before"] if adaptation else None, adaptation["after"] if adaptation else report["gap"],
            info.class_names, info.train_class_counts,
            labels=("before adaptation", "after adaptation") if adaptation else ("", "generated images")))
        files.append("gap_per_class.png")
    if len(rounds) > 1:
        storage.write_bytes(storage.join(output_url, "rounds.png"), plots.rounds_curve(b, report["rounds"]))
        files.append("rounds.png")
    storage.write_json(storage.join(output_url, "report.json"), report)
    storage.write_text(storage.join(output_url, "report.md"), format_report(report))
    metrics = {**scalar_metrics(b, "baseline_"), **scalar_metrics(a, "retrained_"),
               **scalar_metrics(report["delta"], "delta_"),
               **scalar_metrics({"fidelity": fid, "generated": report["generated"], "kept": report["kept"]}),
               **{f"gap_{k}": v["overall"] for k, v in (report["gap"] or {}).items() if v.get("overall") is not None}}
    return StageResult("evaluate", report, metrics, [storage.join(output_url, n) for n in files],
                       datasets=[splits(dataset_url, "test", "oracle"), synthetic_set(filtered_url, "evaluation", info.name)])
