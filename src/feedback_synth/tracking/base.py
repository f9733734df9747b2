"""The tracker interface the runners log through; NullTracker when tracking is off."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

KFP_RUN_ID_ENV = "KFP_RUN_ID"  # set it (e.g. from dsl.PIPELINE_JOB_ID_PLACEHOLDER) to tag the parent run


class NullTracker:
    """The tracker interface; every method is a no-op."""

    run_id: Optional[str] = None

    def start(self, run_name: str, config: dict[str, Any], tags: Optional[dict[str, str]] = None) -> None:
        """Open the parent run of one pipeline run and log the resolved config."""

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict[str, Any]] = None) -> Iterator["NullTracker"]:
        """A nested run for one stage; metrics and artifacts logged inside go to it."""
        yield self

    def open_stage(self, name: str, params: Optional[dict[str, Any]] = None) -> str:
        """A nested run for one stage, left open for other processes to log under (a KFP fan-out:
        the shard tasks' runs go under the round's generate run); its id ('' when not tracking)."""
        return ""

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None, prefix: str = "") -> None:
        """Log scalar metrics (non-scalars and None are skipped)."""

    def log_artifact_url(self, url: str, artifact_path: Optional[str] = None) -> None:
        """Copy a file (any fsspec URL) into the current run's artifacts."""

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` as an artifact file ``name`` of the current run."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the current run."""

    def log_datasets(self, inputs: list[Any]) -> None:
        """Log MLflow dataset inputs (``mlflow.entities.DatasetInput``) on the current run and the
        parent run (see :mod:`feedback_synth.tracking.datasets`)."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the parent run."""

