"""Close the MLflow runs that a dead process left RUNNING (SIGKILL, a lost node, a tracking server
that went away mid-run), found by the output folder they wrote to."""
from __future__ import annotations

from typing import Iterable, Optional

OUTPUT_TAG = "feedback_synth.output"  # every run of a pipeline run carries its output folder


def running_runs(client, experiment_id: str, tag: str, value: str) -> list:
    """The RUNNING runs of an experiment that carry ``tag`` = ``value`` (a pipeline run's parent, its
    stages, its rounds: every run of one pipeline run carries its output folder and, on KFP, its
    ``kfp.run_id``). ``client``: an ``MlflowClient``. The one search both runners close runs with."""
    quoted = value.replace("'", "\\'")
    return client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"tags.`{tag}` = '{quoted}' and attributes.status = 'RUNNING'")


def close_runs_of_output(tracking_uri: str, experiment: str, output_url: str, status: str = "KILLED",
                         exclude: Iterable[Optional[str]] = ()) -> list[str]:
    """Set every RUNNING run tagged with ``output_url`` (the parent, its stages, its rounds), except
    those in ``exclude`` (the new process's own), to ``status``; returns their ids."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed, skip = [], set(exclude)
    for run in running_runs(client, exp.experiment_id, OUTPUT_TAG, output_url):
        if run.info.run_id in skip:
            continue
        client.set_tag(run.info.run_id, "feedback_synth.closed_by", "a re-run into the same output")
        client.set_terminated(run.info.run_id, status)
        closed.append(run.info.run_id)
    return closed
