"""prepare_data: load and check the dataset, write its splits (feedback_synth.stages.prepare_data)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from . import image_for


@dsl.component(base_image=image_for("prepare_data"), install_kfp_package=False)
def prepare_data(data: Output[Dataset], tracking: Input[Artifact], workspace_url: str = "", run_id: str = "",
                 run_folder: str = ""):
    """Load and check the dataset (built-in or URL) and write its splits.

    Args:
        data (Output[Dataset]): the prepared splits (``train/val/test/pool/oracle.npz``, ``info.json``).
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/data`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
    """
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import run_table_stage

    url = artifacts.stage_output_url(data, workspace_url, run_id, "data", run_folder)
    result = run_table_stage(tracking, "prepare_data", {}, url)
    info = result.summary
    artifacts.publish(data, url, seconds=result.seconds, dataset=info["name"], num_classes=len(info["class_names"]),
                      train_images=sum(info["train_class_counts"]))
