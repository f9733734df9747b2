"""What a StageResult records of the datasets a stage read, for MLflow (``tracking.datasets``
logs them as dataset inputs of the stage's run)."""
from __future__ import annotations

from typing import Any

from feedback_synth import storage


def splits(dataset_url: str, *names: str) -> dict[str, Any]:
    """A StageResult's record of the real splits a stage read (missing ones are skipped when logged)."""
    return {"url": dataset_url, "splits": list(names)}


def synthetic_set(filtered_url: str, context: str, dataset_name: str) -> dict[str, Any]:
    """A StageResult's record of the kept synthetic set a stage read, with its plan and generation config."""
    report = storage.read_json(storage.join(filtered_url, "filter_report.json"))
    plan = report.get("plan") and storage.relocated(filtered_url, report.get("plan_path"), report["plan"])
    return {"synthetic": filtered_url, "plan": plan, "generate_config": report.get("generate_config"),
            "context": context, "name": dataset_name}
