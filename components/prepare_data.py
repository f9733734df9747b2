"""prepare_data: load and check the dataset, write its splits (feedback_synth.pipeline.stages.prepare_data)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(dataset: str, data_overrides: str, data: Output[Dataset], tracking: Input[Artifact],
                 workspace_url: str = "", run_id: str = ""):
    """Load and check the dataset (built-in or URL) and write its splits.

    Args:
        dataset (str): built-in name (digits-lt, digits-groups) or a dataset URL.
        data_overrides (str): JSON object of further DataConfig fields, applied last.
        data (Output[Dataset]): the prepared dataset (``<split>.npz``, ``info.json``).
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/data`` instead.
        run_id (str): the KFP run id (names the run's workspace folder).
    """
    from dataclasses import asdict

    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    cfg = section_config("data", data_overrides, dataset=dataset)
    url = artifacts.stage_output_url(data, workspace_url, run_id, "data")
    with stage_run(tracking, "prepare_data", asdict(cfg), url) as run:
        result = stages.prepare_data(cfg, url)
        run.log_result(result)
    info = result.summary
    artifacts.publish(data, url, started=run.t0, seconds=run.seconds, dataset=info["name"],
                      num_classes=len(info["class_names"]), train_images=sum(info["train_class_counts"]))
