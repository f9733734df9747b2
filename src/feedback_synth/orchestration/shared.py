"""The orchestration that both runners share: where a stage writes, what its MLflow run is called,
how a stage is run and logged, how the run is promoted once, and the run's summary.

The in-process runner (``orchestration.run``) and the KFP components (``feedback_synth_kfp``) both call
these, so that a run looks the same in its folder and in the MLflow UI whichever ran it:

- ``RunLayout``: one folder per stage under the run's output (``data``, ``baseline``,
  ``adapted``, ``feedback``, ``generated``, ``filtered``, ``retrained``, ``report``; with feedback
  in rounds ``rounds/round-<r>/<stage>``) and one MLflow run name per stage (``<stage>``, or
  ``round_<r>/<stage>`` in rounds), every stage run nested directly under the parent run.
- ``run_logged_stage``: the one per-stage wrapper (a nested run with the stage's config as params,
  per-epoch metrics, the result's metrics/artifacts/datasets, the ``resumed`` tag, ``seconds``).
- ``write_run_summary``: the summary both runners return and write (``report/run_summary.json``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.orchestration.stage_table import ROUND_FOLDERS, STAGE_FOLDERS
from feedback_synth.stages.result import StageResult, log_stage_result

if TYPE_CHECKING:
    from feedback_synth.reporting.tables import EvaluationReport

RESUMED_TAG = "feedback_synth.resumed"
ROUND_STAGES = ROUND_FOLDERS  # the folders repeated per round (from the stage table)
__all__ = ["STAGE_FOLDERS", "ROUND_STAGES", "RunLayout", "run_logged_stage", "log_run_epilogue",
           "write_run_summary"]

EpochHook = Optional[Callable[[dict[str, Any]], None]]


@dataclass
class RoundUrls:
    feedback: str
    generated: str
    filtered: str
    retrained: str


@dataclass
class RunLayout:
    """Where a run's stages write under ``output`` and what their MLflow runs are called."""

    output: str
    rounds: int = 1

    @staticmethod
    def folder(stage: str, round_index: int = 1, rounds: int = 1) -> str:
        """A stage's folder, relative to the run's output: ``<stage>``, or ``rounds/round-<r>/<stage>``."""
        if stage in ROUND_STAGES and rounds > 1:
            return f"rounds/round-{round_index}/{stage}"
        return stage

    @staticmethod
    def run_name(stage: str, round_index: int = 1, rounds: int = 1) -> str:
        """A stage's MLflow run name: ``<stage>``, or ``round_<r>/<stage>`` in rounds."""
        return stage if rounds == 1 else f"round_{round_index}/{stage}"

    def stage(self, name: str) -> str:
        return storage.join(self.output, name)

    def round(self, r: int) -> RoundUrls:
        return RoundUrls(*(storage.join(self.output, self.folder(n, r, self.rounds)) for n in ROUND_STAGES))

    def outputs(self) -> dict[str, str]:
        """The run's main outputs: data, baseline, adapted, the last round's feedback .. retrained, report."""
        last = self.round(self.rounds)
        return {"data": self.stage("data"), "baseline": self.stage("baseline"), "adapted": self.stage("adapted"),
                "feedback": last.feedback, "generated": last.generated, "filtered": last.filtered,
                "retrained": last.retrained, "report": self.stage("report")}


def run_logged_stage(parent: Any, name: str, params: dict[str, Any], work: Callable[[EpochHook], StageResult]
                     ) -> StageResult:
    """Run one stage in its own MLflow run nested under ``parent`` (a tracker; the null tracker
    when tracking is off) and log its result: ``work(on_epoch)`` does the stage's work, where
    ``on_epoch`` logs a training stage's per-epoch metrics. A resumed stage logs the result it
    finished with, tagged ``feedback_synth.resumed``. The wall time is ``result.seconds``."""
    t0 = time.time()
    with parent.stage(name, params) as log:
        result = work(lambda record: log.log_metrics(record, step=record.get("epoch")))
        log_stage_result(log, result)
        if result.summary.get("resumed"):
            log.set_tags({RESUMED_TAG: "true"})
        result.seconds = round(time.time() - t0, 2)
        log.log_metrics({"seconds": result.seconds})
    return result


def log_run_epilogue(parent: Any, evaluation: StageResult) -> None:
    """What the MLflow parent run gets at the end, whichever runner ran (both call this): the
    evaluation's metrics (no synthesis, with synthesis, difference, fidelity, gap), ``report.md``,
    and each round's gate metrics per step."""
    from feedback_synth.reporting.tables import format_report

    report = evaluation.summary
    parent.log_metrics(evaluation.metrics)
    parent.log_text(format_report(report), "report.md")
    for r in report["rounds"]:
        parent.log_metrics({f"round_{k}": r[k] for k in ("few", "worst_class", "worst_group", "overall") if k in r},
                           step=r["round"])


def write_run_summary(report_url: str, report: "EvaluationReport", *, timings: dict[str, float],
                      generation: dict[str, Any], outputs: dict[str, str], promotion: Optional[dict[str, Any]],
                      mlflow_run_id: Optional[str], **extra: Any) -> dict[str, Any]:
    """The run's summary, as both runners return it: the evaluation report plus the timings, the
    generation summary, the outputs, the promotion and the MLflow parent run; written (without the
    per-class lists) to ``<report_url>/run_summary.json``."""
    summary = {**report, "timings": timings, "generation": generation, "outputs": outputs, "promotion": promotion,
               "mlflow_run_id": mlflow_run_id, **extra}
    storage.write_json(storage.join(report_url, "run_summary.json"),
                       {k: v for k, v in summary.items() if k != "per_class"})
    return summary
