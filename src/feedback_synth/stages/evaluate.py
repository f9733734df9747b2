"""The evaluate stage: no synthesis against synthesis on the test split, the report and its plots."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Optional

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.imageset import ImageSet, load_info
from feedback_synth.devices import resolve_device
from feedback_synth.stages.outputs import model_url
from feedback_synth.stages.result import StageResult, scalar_metrics
from feedback_synth.stages.resume import digests, run_stage
from feedback_synth.tracking.descriptors import splits, synthetic_set
from feedback_synth.training.recipes import recipe_from

if TYPE_CHECKING:
    from feedback_synth.reporting.tables import EvaluationReport

REPORT_FILES = ("report.md", "per_class_accuracy.png", "confusion_no_synthesis.png", "confusion_retrained.png")


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
    from feedback_synth.reporting.tables import format_report
    from feedback_synth.training.classifier import classifier_spec
    from feedback_synth.training.oracle import fidelity

    info = load_info(dataset_url)
    synthetic = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    model = classifier_spec(model_url(baseline_url)).model
    fid = fidelity(dataset_url, synthetic, model, device=device, oracle_url=storage.join(output_url, "oracle"))
    reference = storage.read_json(storage.join(retrained_url, "reference_metrics.json"))
    after = storage.read_json(storage.join(retrained_url, "metrics.json"))
    report = build_report(baseline_url, retrained_url, filtered_url, adapted_url, info, len(synthetic), fid,
                          reference, after)
    files = write_plots(output_url, report, {"no_synthesis": reference["confusion_matrix"],
                                             "retrained": after["confusion_matrix"]})
    storage.write_json(storage.join(output_url, "report.json"), report)
    storage.write_text(storage.join(output_url, "report.md"), format_report(report))
    return StageResult("evaluate", report, report_metrics(report), [storage.join(output_url, n) for n in files],
                       datasets=[splits(dataset_url, "test", "oracle"), synthetic_set(filtered_url, "evaluation", info.name)])


def _distill_weight(saved: dict, kept: int) -> float:
    """The retraining's ``retrain.distill_weight``, as its checkpoint's ``train_config.yaml``
    (``saved``) records it (0 when nothing synthetic was kept: then there was nothing to distil beside)."""
    return float((saved.get("train") or {}).get("distill_weight") or 0.0) if kept else 0.0


def build_report(baseline_url: str, retrained_url: str, filtered_url: str, adapted_url: Optional[str], info,
                 kept: int, fid: Optional[float], reference: dict, after: dict) -> "EvaluationReport":
    """The evaluation report from what the earlier stages wrote: the no-synthesis model (same
    recipe) against the retrained one on the test split, the baseline with its own recipe, each
    round, what the filter kept and the gap to the real data. ``reference`` and ``after``: the
    retrain stage's ``reference_metrics.json`` and ``metrics.json``."""
    from feedback_synth.training.evaluate import summary

    rounds = storage.read_json(storage.join(retrained_url, "rounds.json"))
    filter_report = storage.read_json(storage.join(filtered_url, "filter_report.json"))
    adaptation = None
    if adapted_url:
        adaptation = {k: v for k, v in storage.read_json(storage.join(adapted_url, "adapt_report.json")).items()
                      if k != "losses"}
    before, with_synthesis = summary(reference), summary(after)
    saved = storage.read_yaml(storage.join(model_url(retrained_url), "train_config.yaml")) or {}
    return {"no_synthesis": before, "retrained": with_synthesis,
            "delta": {k: v - before[k] for k, v in with_synthesis.items() if k in before},
            "recipe": asdict(recipe_from(saved)),
            "no_synthesis_source": reference.get("source", "baseline"),
            "no_synthesis_training": {k: reference[k] for k in ("epochs", "steps") if k in reference},
            "distill_weight": _distill_weight(saved, kept),
            "baseline": summary(storage.read_json(storage.join(baseline_url, "metrics.json"))),
            "generated": filter_report.get("generated_so_far", filter_report["generated"]),
            "kept": kept, "readmitted": filter_report.get("readmitted", 0),
            "starved": filter_report.get("starved", []),
            "off_support_classes": filter_report.get("off_support_classes", []),
            "copy_classes": filter_report.get("copy_classes", []),
            "fidelity": fid,
            "rounds": [{"round": r["round"], "num_synthetic": r["num_synthetic"], **r["test"]} for r in rounds],
            "per_class": {"no_synthesis": reference["per_class"], "retrained": after["per_class"]},
            "class_names": info.class_names, "train_class_counts": info.train_class_counts,
            "gap": filter_report.get("gap"), "adaptation": adaptation}


def write_plots(output_url: str, report: "EvaluationReport", confusion: dict[str, list[list[int]]]) -> list[str]:
    """The report's plots under ``output_url`` (``confusion``: each model's test confusion matrix);
    the names of the files written (with report.md)."""
    from feedback_synth.reporting import plots

    names, counts = report["class_names"], report["train_class_counts"]
    loss = report["recipe"]["loss"]
    storage.write_bytes(storage.join(output_url, "per_class_accuracy.png"), plots.per_class_accuracy(
        report["per_class"]["no_synthesis"], report["per_class"]["retrained"], names, counts,
        labels=(f"no synthesis ({loss})", f"with synthesis ({loss})")))
    for name, matrix in confusion.items():
        storage.write_bytes(storage.join(output_url, f"confusion_{name}.png"),
                            plots.confusion_matrix(matrix, names, f"{name.replace('_', ' ')} (test)"))
    files = list(REPORT_FILES)
    adaptation, gap = report["adaptation"], report["gap"]
    if gap or adaptation:
        storage.write_bytes(storage.join(output_url, "gap_per_class.png"), plots.gap_per_class(
            adaptation["before"] if adaptation else None, adaptation["after"] if adaptation else gap, names, counts,
            labels=("before adaptation", "after adaptation") if adaptation else ("", "generated images")))
        files.append("gap_per_class.png")
    if len(report["rounds"]) > 1:
        storage.write_bytes(storage.join(output_url, "rounds.png"),
                            plots.rounds_curve(report["no_synthesis"], report["rounds"]))
        files.append("rounds.png")
    return files


def report_metrics(report: "EvaluationReport") -> dict[str, float]:
    """The report's scalars, as the evaluate run and the parent run log them."""
    return {**scalar_metrics(report["no_synthesis"], "no_synthesis_"), **scalar_metrics(report["retrained"], "retrained_"),
            **scalar_metrics(report["delta"], "delta_"),
            **scalar_metrics({"fidelity": report["fidelity"], "generated": report["generated"], "kept": report["kept"]}),
            **{f"gap_{k}": v["overall"] for k, v in (report["gap"] or {}).items() if v.get("overall") is not None}}
