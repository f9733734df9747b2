"""Experiment tracking interface used by the runners.

``NullTracker`` does nothing (tracking disabled). ``MLflowTracker`` (below, issue: MLflow tracking)
logs one parent run per pipeline run and one nested run per stage.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

# A local KFP run (``run --runner kfp-local``) sets this in the environment of its task processes;
# start_tracking tags the parent run with it, so that the runner finds the run if the pipeline fails.
LAUNCH_ENV, LAUNCH_TAG = "FEEDBACK_SYNTH_LAUNCH_ID", "feedback_synth.launch_id"


class NullTracker:
    """The tracker interface; every method is a no-op."""

    run_id: Optional[str] = None

    def start(self, run_name: str, config: dict[str, Any], tags: Optional[dict[str, str]] = None) -> None:
        """Open the parent run of one pipeline run and log the resolved config."""

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict[str, Any]] = None) -> Iterator["NullTracker"]:
        """A nested run for one stage; metrics and artifacts logged inside go to it."""
        yield self

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None, prefix: str = "") -> None:
        """Log scalar metrics (non-scalars and None are skipped)."""

    def log_artifact_url(self, url: str, artifact_path: Optional[str] = None) -> None:
        """Copy a file (any fsspec URL) into the current run's artifacts."""

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` as an artifact file ``name`` of the current run."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the current run."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the parent run."""


def make_tracker(cfg, output_url: str):
    """The tracker for a run: MLflow when enabled, else the null tracker."""
    if not cfg.enabled:
        return NullTracker()
    try:
        from .mlflow_tracking import MLflowTracker
    except ImportError:  # the MLflow tracker is not built yet
        return NullTracker()
    return MLflowTracker(cfg, output_url)
