"""promote: register the retrained model and move `champion` if it passes the gate
(feedback_synth.registry.register.register_and_promote, through feedback_synth_kfp.tracking.promote)."""
from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def promote(retrained: Input[Model], evaluation: Input[Artifact], gate_metric: str, min_gain: float,
            max_overall_drop: float, promote_overrides: str, tracking: Input[Artifact],
            decision: Output[Markdown]):
    """Register the retrained model as a new version (alias ``challenger``); move ``champion`` to it
    only if the gate passes. Closes the MLflow parent run. Does nothing when tracking is off.

    Args:
        retrained (Input[Model]): retrain's output.
        evaluation (Input[Artifact]): evaluate's output (``report.json``).
        gate_metric (str): the metric that must improve (few, worst_class, worst_group, ...).
        min_gain (float): the gate metric must rise by at least this (more than 0 when 0).
        max_overall_drop (float): overall accuracy may fall by at most this.
        promote_overrides (str): JSON object of further PromoteConfig fields (lock_uri, ...), applied last.
        tracking (Input[Artifact]): start_tracking's output (off: no registry, nothing to promote).
        decision (Output[Markdown]): what was registered and why it was or was not promoted.
    """
    import json
    import time

    from feedback_synth import storage
    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import promote as promote_in_registry

    cfg = section_config("promote", promote_overrides, gate_metric=gate_metric, min_gain=min_gain,
                         max_overall_drop=max_overall_drop)
    evaluation_url = artifacts.artifact_url(evaluation)
    t0 = time.time()
    result = promote_in_registry(tracking, stages.model_url(artifacts.artifact_url(retrained)),
                                 storage.read_json(storage.join(evaluation_url, "report.json")), cfg, evaluation_url)
    artifacts.publish(decision, decision.path, started=t0, seconds=round(time.time() - t0, 2),
                      promotion=json.dumps(result, default=str))
    with open(decision.path, "w") as f:
        f.write(artifacts.promotion_markdown(result))
