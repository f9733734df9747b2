"""filter_synthetic: drop degenerate, duplicate and off-support synthetic images
(feedback_synth.stages.filter_synthetic)."""
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def filter_synthetic(data: Input[Dataset], baseline: Input[Model], feedback: Input[Artifact],
                     shards: Input[List[Dataset]], filter_overrides: str, filtered: Output[Dataset],
                     samples: Output[HTML], metrics: Output[Metrics], tracking: Input[Artifact],
                     workspace_url: str = "", run_id: str = ""):
    """Join the generated shards and filter them; every shard of the plan must be committed.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): the baseline classifier (features of the filters).
        feedback (Input[Artifact]): extract_feedback's output (plan, class statistics).
        shards (Input[List[Dataset]]): the outputs of all generate_shard tasks (dsl.Collected).
        filter_overrides (str): JSON object of FilterConfig fields (filters, thresholds), applied last.
        filtered (Output[Dataset]): ``synthetic.npz`` (kept images), ``filter_report.json``, ``samples.png``.
        samples (Output[HTML]): grid of real and kept synthetic images per class.
        metrics (Output[Metrics]): generated, kept, mean criterion value.
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/filtered`` instead.
        run_id (str): the KFP run id.
    """
    from dataclasses import asdict

    from feedback_synth import io
    from feedback_synth import kfp_support as k
    from feedback_synth import stages
    from feedback_synth.config import FilterConfig, stage_config

    cfg = stage_config(FilterConfig, k.stage_params(filter_overrides), "filter")
    url = k.stage_output_url(filtered, workspace_url, run_id, "filtered")
    generated = k.unique([k.artifact_url(s) for s in shards])
    with k.stage_run(tracking, "filter", asdict(cfg), url) as run:
        report = stages.filter_synthetic(k.artifact_url(data), stages.model_url(k.artifact_url(baseline)),
                                         k.artifact_url(feedback), generated, url, cfg)
        run.log_metrics({"generated": report["generated"], "kept": report["kept"],
                         "mean_criterion_value": report.get("mean_criterion_value")})
        run.log.log_artifact_url(io.join(url, "filter_report.json"))
        run.log.log_artifact_url(io.join(url, "samples.png"))
    generation = k.generation_summary([dict(s.metadata) for s in shards])
    k.publish(filtered, url, started=run.t0, seconds=run.seconds, generated=report["generated"],
              kept=report["kept"], generation=generation)
    k.log_kfp_metrics(metrics, {"generated": report["generated"], "kept": report["kept"],
                                "mean_criterion_value": report.get("mean_criterion_value")})
    with open(samples.path, "w") as f:
        f.write(k.png_html(io.read_bytes(io.join(url, "samples.png")), "Real and kept synthetic images",
                           f"{report['kept']} of {report['generated']} generated images kept"))
