"""start_tracking: resolve the run's configuration once and open the MLflow parent run of this
pipeline run (feedback_synth_kfp.tracking.start_tracking)."""
from kfp import dsl
from kfp.dsl import Artifact, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(mlflow_tracking_uri: str, mlflow_experiment: str, registered_model: str, run_name: str,
                   kfp_run_id: str, dataset: str, classifier_model: str, adapt_method: str, generator: str,
                   criterion: str, scale: float, guide_every: int, budget_fraction: float, shard_size: int,
                   gate_metric: str, min_gain: float, max_overall_drop: float, device: str, config: str,
                   tracking: Output[Artifact]):
    """Resolve the run configuration that the pipeline parameters stand for (the dataset's preset,
    ``config``, the named parameters that differ from their defaults), checked like a config file,
    run pre-flight on it (the dataset, the generator, the model, the tracking server), and open the
    MLflow parent run that
    every stage task logs a nested run under. Every task reads the configuration from this
    task's artifact: one value, resolved once.

    A malformed ``config`` parameter or a bad value stops the pipeline here, naming the field.

    Args:
        mlflow_tracking_uri (str): MLflow tracking server URI; '' = no tracking.
        mlflow_experiment (str): MLflow experiment name.
        registered_model (str): name of the registered model that promotion versions.
        run_name (str): the parent run's name (the KFP run name).
        kfp_run_id (str): the KFP run id, tagged on the parent run as ``kfp.run_id``.
        dataset (str): data.dataset.
        classifier_model (str): train.model.
        adapt_method (str): adapt.method.
        generator (str): generate.generator.
        criterion (str): generate.criterion.
        scale (float): generate.scale.
        guide_every (int): generate.guide_every.
        budget_fraction (float): feedback.budget_fraction.
        shard_size (int): feedback.shard_size.
        gate_metric (str): promote.gate_metric.
        min_gain (float): promote.min_gain.
        max_overall_drop (float): promote.max_overall_drop.
        device (str): the run's device: auto (CUDA where a task's pod has it) | cpu | cuda | cuda:N;
            each task resolves it on its own pod, and a GPU task's pod without CUDA stops there.
        config (str): JSON object of the other config fields, by section.
        tracking (Output[Artifact]): metadata ``config`` (the resolved RunConfig) and ``context``
            (JSON with ``parent_run_id``; '' when tracking is off).
    """
    params = {k: v for k, v in locals().items() if k not in ("tracking", "run_name", "kfp_run_id")}  # first: the inputs only
    import json
    from dataclasses import asdict

    from feedback_synth.orchestration.preflight import preflight
    from feedback_synth_kfp.parameters import run_config_from_parameters
    from feedback_synth_kfp.tracking import CONFIG_KEY, TRACKING_KEY, reported_errors
    from feedback_synth_kfp.tracking import start_tracking as open_parent_run

    with reported_errors("start_tracking"):
        run_cfg = run_config_from_parameters(params)
        # pre-flight, as a local run makes it, before any work; the devices' form only: each GPU
        # pod checks that it has the device (feedback_synth_kfp.tracking.run_config)
        preflight(run_cfg, check_devices=False)
    cfg = asdict(run_cfg)
    context = open_parent_run(mlflow_tracking_uri, mlflow_experiment, registered_model, run_name, kfp_run_id, cfg)
    tracking.metadata[TRACKING_KEY] = context
    tracking.metadata[CONFIG_KEY] = json.dumps(cfg)
    tracking.metadata["enabled"] = bool(context)
    with open(tracking.path, "w") as f:
        f.write(context or "{}")
