"""finish_tracking: the pipeline's exit handler; closes the MLflow runs a KFP run left open
(feedback_synth_kfp.tracking.finish_tracking)."""
from kfp import dsl

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_tracking(mlflow_tracking_uri: str, mlflow_experiment: str, kfp_run_id: str,
                    status: dsl.PipelineTaskFinalStatus) -> str:
    """Runs after the pipeline, whether it succeeded or not: a failed run's MLflow parent run ends
    FAILED (tagged with the error) instead of RUNNING forever; stage runs of pods that died
    without closing them end KILLED.

    It finds the runs by their ``kfp.run_id`` tag: an exit task cannot take an upstream task's
    output (kfp 2.17's compiler), so not start_tracking's artifact.

    Args:
        mlflow_tracking_uri (str): MLflow tracking server URI; '' = no tracking (nothing to do).
        mlflow_experiment (str): MLflow experiment name.
        kfp_run_id (str): the KFP run id (the ``kfp.run_id`` tag of the runs).
        status (dsl.PipelineTaskFinalStatus): KFP's final status of the pipeline's tasks.

    Returns:
        str: JSON of what was closed ('null' when tracking is off).
    """
    import json

    from feedback_synth_kfp.tracking import finish_tracking as close_runs

    closed = close_runs(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, status.state,
                               status.error_message or "")
    print(f"pipeline {status.state}; closed: {json.dumps(closed)}")
    return json.dumps(closed)
