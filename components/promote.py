"""promote: register the retrained model and move `champion` if it passes the gate
(feedback_synth.stages.promote.promote_once, through feedback_synth_kfp.tracking.promote)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from . import image_for


@dsl.component(base_image=image_for("promote"), install_kfp_package=False)
def promote(data: Input[Dataset], retrained: Input[Model], evaluation: Input[Artifact], tracking: Input[Artifact],
            decision: Output[Markdown]):
    """Register the retrained model as a new version (alias ``challenger``); move ``champion`` to it
    only if the gate passes; once per evaluation (a retried task reports the decision made). Closes
    the MLflow parent run. Does nothing when tracking is off.

    Args:
        data (Input[Dataset]): the prepared dataset (its test split is the model's evaluation dataset).
        retrained (Input[Model]): the retrained model (the candidate).
        evaluation (Input[Artifact]): evaluate's output (``report.json``).
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        decision (Output[Markdown]): the gate's decision and reason.
    """
    import json
    import time

    from feedback_synth import storage
    from feedback_synth.stages.outputs import model_url
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import promote as promote_in_registry
    from feedback_synth_kfp.tracking import run_config

    t0 = time.time()
    evaluation_url = artifacts.artifact_url(evaluation)
    result = promote_in_registry(tracking, model_url(artifacts.artifact_url(retrained)), evaluation_url,
                                 storage.read_json(storage.join(evaluation_url, "report.json")), run_config(tracking, "promote"),
                                 artifacts.artifact_url(data))
    artifacts.publish(decision, decision.path, seconds=round(time.time() - t0, 2),
                      promotion=json.dumps(result, default=str))
    with open(decision.path, "w") as f:
        f.write(artifacts.promotion_markdown(result))
