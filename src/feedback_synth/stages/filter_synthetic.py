"""The filter stage (KFP component ``filter_synthetic``): keep the synthetic images that are on the
real data's support, not copies, and useful; say per class what was dropped and why."""
from __future__ import annotations

import logging
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.config import FilterConfig, result_settings
from feedback_synth.data.imageset import ImageSet, load_split
from feedback_synth.devices import resolve_device
from feedback_synth.errors import DataError
from feedback_synth.stages.outputs import plan_url
from feedback_synth.stages.result import StageResult, scalar_metrics
from feedback_synth.stages.resume import digests, run_stage
from feedback_synth.synthesis.gap_checks import check_gap, filter_gap
from feedback_synth.tracking.descriptors import splits

log = logging.getLogger(__name__)


def filter_synthetic(dataset_url: str, latest_model_url: str, feedback_url: str, generated_url: str | list[str],
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
    inputs = {**digests(data=dataset_url, model=latest_model_url, feedback=feedback_url,
                        previous=previous_filtered_url), "generated": shards}
    return run_stage("filter", output_url, result_settings(cfg), inputs,
                     lambda: _filter_synthetic(dataset_url, latest_model_url, feedback_url, generated_url, output_url,
                                               cfg, previous_filtered_url), overwrite)


def _filter_synthetic(dataset_url: str, latest_model_url: str, feedback_url: str, generated_url: str | list[str],
                      output_url: str, cfg: FilterConfig, previous_filtered_url: Optional[str] = None) -> StageResult:
    train = load_split(dataset_url, "train")
    kept, kept_rows, report = filter_round(dataset_url, latest_model_url, feedback_url, generated_url, cfg, train)
    earlier = 0
    if previous_filtered_url:  # rounds: retraining takes every image kept so far
        earlier, kept, kept_rows = with_earlier_rounds(previous_filtered_url, kept, kept_rows, report)
    else:
        report["kept_so_far"], report["generated_so_far"] = len(kept), report["generated"]
    write_filter_outputs(output_url, report, cfg, kept, kept_rows, train, earlier)
    metrics = {"generated": report["generated"], "kept": report["kept"], "readmitted": report["readmitted"],
               "starved_classes": len(report["starved"]), "kept_so_far": len(kept),
               "mean_criterion_value": report["mean_criterion_value"]}
    return StageResult("filter", report, scalar_metrics(metrics),
                       [storage.join(output_url, n) for n in ("filter_report.json", "filter_table.md", "samples.png")],
                       datasets=[splits(dataset_url, "train")])


def filter_round(dataset_url: str, latest_model_url: str, feedback_url: str, generated_url: str | list[str],
                 cfg: FilterConfig, train: ImageSet) -> tuple[ImageSet, list[dict[str, Any]], dict[str, Any]]:
    """This round's generated images through the filters: the kept images, their metadata rows and
    the filter report (per class and filter, the gap to the real data, the criterion, the plan)."""
    import numpy as np

    from feedback_synth.generation.shards import load_generated
    from feedback_synth.synthesis.feedback import extract_features, load_class_stats
    from feedback_synth.synthesis.filtering import FilterInputs, apply_filters
    from feedback_synth.synthesis.plan import GenerationPlan
    from feedback_synth.training.classifier import load_classifier

    plan = GenerationPlan.load(plan_url(feedback_url))
    generated, rows = load_generated(generated_url, plan, train)
    clf = load_classifier(latest_model_url, resolve_device(cfg.device, "filter.device"))
    inp = FilterInputs(generated.images, generated.labels, np.array([r["finite"] for r in rows], bool),
                       extract_features(clf, generated), extract_features(clf, train), train.labels,
                       load_class_stats(feedback_url), real_images=train.images)
    keep, report = apply_filters(inp, cfg, train.class_names)
    report["gap"] = filter_gap(dataset_url, clf, inp, generated, keep, train)
    crit = [r["criterion_value"] for r in rows]
    report.update(mean_criterion_value=float(np.mean(crit)) if crit else None,
                  criterion=rows[0]["criterion"] if rows else None, round=plan.round, plan=plan_url(feedback_url),
                  generate_config=generate_config_of(generated_url, plan))
    return generated.subset(np.flatnonzero(keep)), [r for r, k in zip(rows, keep) if k], report


def with_earlier_rounds(previous_filtered_url: str, kept: ImageSet, kept_rows: list[dict[str, Any]],
                        report: dict[str, Any]) -> tuple[int, ImageSet, list[dict[str, Any]]]:
    """The images kept by the earlier rounds (the previous filter output) ahead of this round's:
    how many came before, the images and their rows; ``report`` gets the running totals."""
    before = ImageSet.load(storage.join(previous_filtered_url, "synthetic.npz"))
    rows = storage.read_json(storage.join(previous_filtered_url, "kept_metadata.json")) + kept_rows
    everything = ImageSet.concat([before, kept])
    report["kept_so_far"] = len(everything)
    report["generated_so_far"] = report["generated"] + storage.read_json(
        storage.join(previous_filtered_url, "filter_report.json"))["generated_so_far"]
    return len(before), everything, rows


def write_filter_outputs(output_url: str, report: dict[str, Any], cfg: FilterConfig, kept: ImageSet,
                         kept_rows: list[dict[str, Any]], train: ImageSet, earlier: int) -> None:
    """The gap check with the report and its table (written even when the check stops the run: they
    explain it), then the kept images, their rows and the sample grid of this round's (``kept[earlier:]``)."""
    from feedback_synth.reporting import plots
    from feedback_synth.synthesis.filtering import filter_table

    if report.get("plan"):  # the plan's path from here beside its URL: found after the run folder moved
        report["plan_path"] = storage.relative(report["plan"], output_url)
    table_url = storage.join(output_url, "filter_table.md")
    try:  # the gap check names the off-support classes in the report; written even when the check stops the run
        check_gap(report, cfg, table_url)
    finally:
        storage.write_json(storage.join(output_url, "filter_report.json"), report)
        storage.write_text(table_url, filter_table(report))
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


def generate_config_of(generated_url: str | list[str], plan) -> dict[str, Any]:
    """The generate config of a plan's committed shards (their fingerprints record it)."""
    from feedback_synth.generation.shards import find_shard

    for s in plan.shards:
        url = find_shard(generated_url, s.shard_id)
        if url:
            return (storage.read_json(storage.join(url, "_SUCCESS")).get("config") or {}).get("generate", {})
    return {}
