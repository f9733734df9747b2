"""The tables a person reads: no synthesis vs synthesis, in Markdown."""
from __future__ import annotations

from typing import Any, Optional, TypedDict

from feedback_synth import storage
from feedback_synth.config import METRICS


class EvaluationReport(TypedDict, total=False):
    """What the evaluate stage writes (``report/report.json``) and four modules read: the table
    (here), the promotion gate (``registry``), both runners' summaries (``orchestration.shared``)."""

    no_synthesis: dict[str, float]  # the same recipe without synthesis (the gate's reference), test metrics
    retrained: dict[str, float]  # with synthesis, test metrics
    delta: dict[str, float]  # retrained - no_synthesis
    recipe: dict[str, Any]  # the retraining's loss, tau, sampler, prior
    no_synthesis_source: str  # 'baseline' (the baseline has the same recipe) or 'reference' (a model trained for it)
    no_synthesis_training: dict[str, Any]  # its epochs, and steps: 'same' (the retraining's optimiser steps) or 'epochs'
    distill_weight: float  # the retraining's distillation from the no-synthesis model (retrain.distill_weight; 0 = none)
    baseline: dict[str, float]  # the baseline (train_baseline), with its own recipe
    generated: int
    kept: int
    readmitted: int
    starved: list[str]  # classes below filter.min_kept_fraction even after re-admission
    off_support_classes: list[str]  # classes named by the early gap warning
    copy_classes: list[str]  # classes whose kept images are above filter.copy_share near-copies (synthesis.copies)
    fidelity: Optional[float]  # the oracle's agreement with the intended class (built-in data)
    rounds: list[dict[str, Any]]
    per_class: dict[str, list[Optional[float]]]
    class_names: list[str]
    train_class_counts: list[int]
    gap: Optional[dict[str, Any]]  # synthesis.gap measures of the run's generated and kept images
    adaptation: Optional[dict[str, Any]]  # adapt_generator's report: the gap before and after


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_report(report: EvaluationReport) -> str:
    """Was synthesis worth it? The same recipe without and with synthesis, side by side, and their
    difference; then the rounds (if any) and the synthetic images (Markdown, readable in a terminal)."""
    keys = [k for k in METRICS if k in report["no_synthesis"]]
    loss = (report.get("recipe") or {}).get("loss", "ce")
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    if report.get("no_synthesis_source") == "reference":
        lines.append("| baseline (its own recipe) | " + " | ".join(_fmt(report["baseline"].get(k)) for k in keys)
                     + " |")
    training = report.get("no_synthesis_training") or {}
    how = f", {training['epochs']} epochs" if training.get("epochs") else ""
    how += ": the same steps" if training.get("steps") == "same" else ""
    lines.append(f"| no synthesis ({loss}{how}) | " + " | ".join(_fmt(report["no_synthesis"].get(k)) for k in keys)
                 + " |")
    rounds = report.get("rounds") or []
    if len(rounds) > 1:
        for r in rounds[:-1]:
            lines.append(f"| round {r['round']} ({r['num_synthetic']} synthetic) | "
                         + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    distilled = f", distilled from no synthesis at {report['distill_weight']:g}" if report.get("distill_weight") else ""
    lines.append(f"| with synthesis ({loss}{distilled}) | " + " | ".join(_fmt(report["retrained"].get(k)) for k in keys) + " |")
    lines.append("| difference | " + " | ".join(f"{report['delta'][k]:+.3f}" if k in report["delta"] else "-"
                                                for k in keys) + " |")
    fid = report.get("fidelity")
    line = f"synthetic images: {report['generated']} generated, {report['kept']} kept"
    if report.get("readmitted"):
        line += f" ({report['readmitted']} re-admitted for starved classes)"
    if fid is not None:
        line += f"; fidelity (oracle agrees with the intended class): {fid:.3f}"
    lines += ["", line]
    gap = gap_table(report)
    if gap:
        lines += ["", gap.rstrip()]
    if report.get("starved"):
        lines.append(f"warning: classes {', '.join(report['starved'])} kept too few synthetic images (see filter_table.md)")
    if report.get("copy_classes"):
        lines.append(f"warning: the kept synthetic images of classes {', '.join(report['copy_classes'])} are near-copies "
                     f"of their training images above the threshold share (filter.copy_share; see filter_report.json)")
    return "\n".join(lines) + "\n"


def _pc(g: Optional[dict[str, Any]], key: str, c: int) -> Optional[float]:
    values = ((g or {}).get(key) or {}).get("per_class") or []
    return values[c] if c < len(values) else None


def gap_table(report: EvaluationReport) -> str:
    """The gap to the real data per class (``synthesis.gap``): off-support share and real-vs-synthetic
    discriminator accuracy (0.5 = indistinguishable) of the generated images, before and after
    adapting the generator when it was adapted; near-copy share and diversity of the kept images."""
    gap, adaptation = report.get("gap"), report.get("adaptation")
    if not gap and not adaptation:
        return ""
    names, counts = report["class_names"], report.get("train_class_counts") or [None] * len(report["class_names"])
    cols = ["class (train)"]
    if adaptation:
        cols += ["off-support before", "after", "discriminator before", "after", "near-copy before", "after"]
    cols += ["off-support (run)", "discriminator (run)", "near-copy (kept)", "diversity (kept)"]
    lines = ["gap to the real data per class (off-support and near-copy: share of images; discriminator: "
             "0.5 = indistinguishable; diversity: 1 = as varied as real images):", "",
             "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for c, name in enumerate(names):
        row = [f"{name} ({counts[c]})"]
        if adaptation:
            for key in ("off_support", "discriminator", "near_copy"):
                row += [_fmt(_pc(adaptation["before"], key, c)), _fmt(_pc(adaptation["after"], key, c))]
        row += [_fmt(_pc(gap, k, c)) for k in ("off_support", "discriminator", "near_copy", "diversity")]
        lines.append("| " + " | ".join(row) + " |")
    if report.get("off_support_classes"):
        lines.append(f"\nwarning: off the task's support: {', '.join(report['off_support_classes'])}")
    return "\n".join(lines) + "\n"


def format_summary(report: dict[str, Any]) -> str:
    """What ``feedback-synth run`` prints at the end."""
    urls = report["outputs"]
    lines = ["", format_report(report).rstrip(), ""]
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    lines += ["", "outputs:",
              f"  baseline model     {storage.join(urls['baseline'], 'model')}",
              f"  retrained model    {storage.join(urls['retrained'], 'model')}",
              f"  synthetic samples  {storage.join(urls['filtered'], 'samples.png')}",
              f"  per-class accuracy {storage.join(urls['report'], 'per_class_accuracy.png')}",
              f"  report             {storage.join(urls['report'], 'report.md')}"]
    if report.get("promotion"):
        p = report["promotion"]
        lines.append(f"  registry           {p.get('model_name')} v{p.get('version')}: "
                     f"{'promoted to champion' if p.get('promoted') else 'stays challenger'} ({p.get('reason')})")
    if report.get("mlflow_run_id"):
        lines.append(f"  MLflow run         {report['mlflow_run_id']}")
    return "\n".join(lines)
