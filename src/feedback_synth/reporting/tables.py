"""The tables a person reads: baseline vs retrained, in Markdown."""
from __future__ import annotations

from typing import Any, Optional

from feedback_synth import storage


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The baseline vs retrained table (Markdown, also readable in a terminal)."""
    keys = [k for k in ("overall", "many", "medium", "few", "worst_class", "average_group", "worst_group")
            if k in report["baseline"]]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in ("baseline", "retrained"):
        lines.append(f"| {name} | " + " | ".join(_fmt(report[name].get(k)) for k in keys) + " |")
    lines.append("| delta | " + " | ".join(f"{report['delta'][k]:+.3f}" if k in report["delta"] else "-" for k in keys) + " |")
    fid = report.get("fidelity")
    lines += ["", f"synthetic images: {report['generated']} generated, {report['kept']} kept"
              + (f"; fidelity (oracle agrees with the intended class): {fid:.3f}" if fid is not None else "")]
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
