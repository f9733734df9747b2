"""What every stage returns, and the one function that logs it.

The in-process runner (``orchestration.run``), the stage verbs of the CLI and the KFP components all call
a stage function, get a ``StageResult`` back and hand it to ``log_stage_result``: per-stage logging
is written once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from feedback_synth import storage


@dataclass
class StageResult:
    """One stage's outcome.

    Attributes:
        stage: the stage's name (``train_baseline``, ``generate``, ...), also its MLflow run's name.
        summary: JSON-able facts for the caller (what the CLI prints, what later stages read).
        metrics: scalar metrics for the stage's MLflow run and the KFP UI.
        artifacts: URLs of files worth seeing in MLflow (plots, reports), logged as run artifacts.
        datasets: the datasets the stage read, logged as MLflow datasets of its run (and of the
            parent run): ``{"splits": [...], "url": prepared dataset}`` for real splits,
            ``{"synthetic": filter output URL, "plan": plan URL, "generate_config": {...},
            "context": ..., "name": dataset name}`` for the kept synthetic set.
        seconds: the stage's wall time: its work's, as its marker records it (``stages.resume.run_stage``),
            then the runner's, logging included (``orchestration.shared.run_logged_stage``).
    """

    stage: str
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, folder: Optional[str] = None) -> dict[str, Any]:
        """As plain data; with ``folder`` (the stage's output, where its marker is written) the URLs of
        its artifacts and datasets also relative to it (``relative``), so that a run folder that was
        moved (or synced to another bucket) still logs what its resumed stages read and wrote."""
        d = asdict(self)
        if folder is not None:
            d["relative"] = {"artifacts": [storage.relative(u, folder) for u in self.artifacts],
                             "datasets": [{k: storage.relative(v, folder) for k, v in entry.items()
                                           if k in _DATASET_URLS and v} for entry in self.datasets]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: Optional[str] = None) -> "StageResult":
        """The inverse of ``to_dict`` (``folder``: where the marker was read)."""
        artifacts, datasets = list(d.get("artifacts") or []), [dict(x) for x in d.get("datasets") or []]
        relative = d.get("relative") if folder is not None else None
        if relative:
            artifacts = [storage.relocated(folder, r, u) for r, u in zip(relative["artifacts"], artifacts)]
            for entry, rel in zip(datasets, relative["datasets"]):
                entry.update({k: storage.relocated(folder, rel.get(k), v) for k, v in entry.items()
                              if k in _DATASET_URLS and v})
        return cls(d["stage"], dict(d.get("summary") or {}), dict(d.get("metrics") or {}), artifacts, datasets,
                   float(d.get("seconds") or 0.0))


_DATASET_URLS = ("url", "synthetic", "plan")  # the fields of a datasets entry that are URLs


def scalar_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``values`` (None, bools, strings, lists and dicts dropped)."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_stage_result(log: Any, result: StageResult) -> None:
    """Log a stage's metrics, artifacts and datasets to its run (``log``: the tracker interface of a
    stage run; with tracking off every call is a no-op)."""
    from feedback_synth.tracking.datasets import log_split_datasets, log_synthetic_dataset

    if result.metrics:
        log.log_metrics(result.metrics)
    for url in result.artifacts:
        log.log_artifact_url(url)
    for d in result.datasets:
        if "splits" in d:
            log_split_datasets(log, d["url"], d["splits"], d.get("context"))
        else:
            log_synthetic_dataset(log, d["synthetic"], d.get("plan"), d.get("generate_config"),
                                  context=d.get("context", "training"), dataset_name=d.get("name"))
