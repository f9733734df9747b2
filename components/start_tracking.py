"""start_tracking: open the MLflow parent run of this pipeline run (feedback_synth.kfp_support.start_tracking)."""
from kfp import dsl
from kfp.dsl import Artifact, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(mlflow_tracking_uri: str, mlflow_experiment: str, registered_model: str, run_name: str,
                   kfp_run_id: str, parameters: str, tracking: Output[Artifact]):
    """Open the MLflow parent run that every stage task logs a nested run under.

    Args:
        mlflow_tracking_uri (str): MLflow tracking server URI; '' = no tracking.
        mlflow_experiment (str): MLflow experiment name.
        registered_model (str): name of the registered model that promotion versions.
        run_name (str): the parent run's name (the KFP run name).
        kfp_run_id (str): the KFP run id, tagged on the parent run as ``kfp_run_id``.
        parameters (str): JSON object of the pipeline parameters, logged as the run's config.
        tracking (Output[Artifact]): the tracking context (metadata ``context``: JSON with
            ``parent_run_id``, '' when tracking is off) that every stage task takes.
    """
    import json

    from feedback_synth import kfp_support as k

    try:
        config = json.loads(parameters or "{}")
    except json.JSONDecodeError:  # a parameter value that breaks the JSON: log it as it came
        config = {"parameters": parameters}
    context = k.start_tracking(mlflow_tracking_uri, mlflow_experiment, registered_model, run_name, kfp_run_id, config)
    tracking.metadata[k.TRACKING_KEY] = context
    tracking.metadata["enabled"] = bool(context)
    with open(tracking.path, "w") as f:
        f.write(context or "{}")
