"""start_tracking: open the MLflow parent run of this pipeline run (feedback_synth_kfp.tracking.start_tracking)."""
from kfp import dsl
from kfp.dsl import Artifact, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(mlflow_tracking_uri: str, mlflow_experiment: str, registered_model: str, run_name: str,
                   kfp_run_id: str, dataset: str, classifier_model: str, generator: str, criterion: str, scale: float,
                   guide_every: int, budget_fraction: float, shard_size: int, gate_metric: str, min_gain: float,
                   max_overall_drop: float, gpu_device: str, data_overrides: str, train_overrides: str,
                   feedback_overrides: str, generate_overrides: str, filter_overrides: str,
                   retrain_overrides: str, promote_overrides: str, tracking: Output[Artifact]):
    """Open the MLflow parent run that every stage task logs a nested run under; its params are the
    run configuration that the pipeline parameters stand for (as an in-process run logs it).

    A malformed ``*_overrides`` parameter stops the pipeline here, naming the parameter.

    Args:
        mlflow_tracking_uri (str): MLflow tracking server URI; '' = no tracking.
        mlflow_experiment (str): MLflow experiment name.
        registered_model (str): name of the registered model that promotion versions.
        run_name (str): the parent run's name (the KFP run name).
        kfp_run_id (str): the KFP run id, tagged on the parent run as ``kfp.run_id``.
        dataset (str): the pipeline's ``dataset`` parameter.
        classifier_model (str): the pipeline's ``classifier_model`` parameter.
        generator (str): the pipeline's ``generator`` parameter.
        criterion (str): the pipeline's ``criterion`` parameter.
        scale (float): the pipeline's ``scale`` parameter.
        guide_every (int): the pipeline's ``guide_every`` parameter.
        budget_fraction (float): the pipeline's ``budget_fraction`` parameter.
        shard_size (int): the pipeline's ``shard_size`` parameter.
        gate_metric (str): the pipeline's ``gate_metric`` parameter.
        min_gain (float): the pipeline's ``min_gain`` parameter.
        max_overall_drop (float): the pipeline's ``max_overall_drop`` parameter.
        gpu_device (str): the pipeline's ``gpu_device`` parameter.
        data_overrides (str): the pipeline's ``data_overrides`` parameter.
        train_overrides (str): the pipeline's ``train_overrides`` parameter.
        feedback_overrides (str): the pipeline's ``feedback_overrides`` parameter.
        generate_overrides (str): the pipeline's ``generate_overrides`` parameter.
        filter_overrides (str): the pipeline's ``filter_overrides`` parameter.
        retrain_overrides (str): the pipeline's ``retrain_overrides`` parameter.
        promote_overrides (str): the pipeline's ``promote_overrides`` parameter.
        tracking (Output[Artifact]): the tracking context (metadata ``context``: JSON with
            ``parent_run_id``, '' when tracking is off) that every stage task takes.
    """
    params = {k: v for k, v in locals().items() if k not in ("tracking", "run_name", "kfp_run_id")}  # first: the inputs only
    from dataclasses import asdict

    from feedback_synth_kfp.parameters import run_config_from_parameters
    from feedback_synth_kfp.tracking import TRACKING_KEY
    from feedback_synth_kfp.tracking import start_tracking as open_parent_run

    config = asdict(run_config_from_parameters(params))
    context = open_parent_run(mlflow_tracking_uri, mlflow_experiment, registered_model, run_name, kfp_run_id, config)
    tracking.metadata[TRACKING_KEY] = context
    tracking.metadata["enabled"] = bool(context)
    with open(tracking.path, "w") as f:
        f.write(context or "{}")
