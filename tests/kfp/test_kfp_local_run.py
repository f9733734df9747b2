"""The whole pipeline through the KFP local runner, on digits-lt at reduced size: every task runs
as its component in its own process, with MLflow tracking on a SQLite store, and every task's
outputs are checked."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from feedback_synth.config import load_run_config, preset


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> str:
    """The bundled generator when it exists, else a random-weight one of the same architecture."""
    from feedback_synth.generation.loading import builtin_generator_path

    if os.path.isdir(os.path.join(builtin_generator_path("digits-lt"), "unet")):
        return "builtin"
    from builders import build_tiny_pixel_generator

    return build_tiny_pixel_generator(str(tmp_path_factory.mktemp("generator")))


def _outputs(root: Path) -> dict[str, dict]:
    """task path (e.g. 'train-baseline', 'for-loop-1-iteration-0/generate-shard') -> executor output."""
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return {str(f.parent.relative_to(run_dir)): json.loads(f.read_text()) for f in run_dir.rglob("executor_output.json")}


def _artifact(out: dict, name: str) -> dict:
    (art,) = out["artifacts"][name]["artifacts"]
    return art


@pytest.mark.slow
def test_pipeline_through_the_kfp_local_runner(tmp_path, generator):
    from feedback_synth.reporting.tables import format_summary
    from feedback_synth_kfp.local_runner import run_kfp_local

    cfg = load_run_config(None, [
        "train.model=test_resnet", "train.epochs=2", "retrain.epochs=2", "feedback.budget_fraction=0.1",
        "feedback.shard_size=24", "generate.num_inference_steps=4", f"generate.generator={generator}",
        "filter.filters=[degenerate]", "promote.min_gain=0.0"], base=preset("digits-lt"))
    output = tmp_path / "run"
    report = run_kfp_local(cfg, str(output), parallelism=2)

    # the in-process runner's report keys
    for key in ("baseline", "retrained", "delta", "generated", "kept", "fidelity", "per_class", "timings",
                "generation", "outputs", "promotion", "mlflow_run_id"):
        assert key in report, key
    assert report["generated"] == 47 and report["generation"]["num_images"] == 47
    assert report["generation"]["shards"] == 2 and report["generation"]["skipped"] == 0
    assert set(report["timings"]) == {"prepare_data", "train_baseline", "extract_feedback", "generate", "filter",
                                      "retrain", "evaluate", "promote"}
    urls = report["outputs"]
    assert os.path.isfile(os.path.join(urls["baseline"], "model", "config.json"))
    assert os.path.isfile(os.path.join(urls["retrained"], "model", "config.json"))
    for url, name in ((urls["filtered"], "samples.png"), (urls["report"], "per_class_accuracy.png"),
                      (urls["report"], "report.md"), (urls["report"], "run_summary.json")):
        assert os.path.isfile(os.path.join(url, name)), name
    assert report["mlflow_run_id"] and report["promotion"]["model_name"] == "feedback-synth-classifier"
    assert "MLflow run" in format_summary(report)
    assert (output / "config.yaml").is_file() and (output / "mlflow" / "mlflow.db").is_file()

    # every task ran and wrote every output it declares
    outs = _outputs(Path(urls["kfp_pipeline_root"]))
    assert set(outs) == {"start-tracking", "prepare-data", "train-baseline", "extract-feedback",
                         "for-loop-1-iteration-0/generate-shard", "for-loop-1-iteration-1/generate-shard",
                         "filter-synthetic", "retrain", "evaluate", "promote"}
    for task, out in outs.items():
        for name, arts in out.get("artifacts", {}).items():
            for art in arts["artifacts"]:
                path = Path(art["uri"])
                assert path.exists() and (path.is_file() or any(path.iterdir())) or art.get("metadata"), \
                    f"{task}: output {name} is empty"
    assert json.loads(_artifact(outs["start-tracking"], "tracking")["metadata"]["context"])["parent_run_id"] == \
        report["mlflow_run_id"]
    assert {"train.npz", "test.npz", "info.json"} <= {p.name for p in Path(urls["data"]).iterdir()}
    for task in ("train-baseline", "retrain"):
        metrics = _artifact(outs[task], "metrics")["metadata"]
        assert 0 <= metrics["test_overall"] <= 1, task
        confusion = _artifact(outs[task], "confusion")["metadata"]["confusionMatrix"]
        assert len(confusion["rows"]) == 10 and len(confusion["annotationSpecs"]) == 10, task
    assert outs["extract-feedback"]["parameterValues"]["Output"] == [0, 1]
    assert (Path(urls["feedback"]) / "plan.json").is_file()
    for i in (0, 1):
        shard = _artifact(outs[f"for-loop-1-iteration-{i}/generate-shard"], "shard")
        assert shard["metadata"]["shard_id"] == i and shard["metadata"]["skipped"] is False
        assert (Path(shard["uri"]) / "shards" / f"shard-{i:05d}" / "_SUCCESS").is_file()
    samples = Path(_artifact(outs["filter-synthetic"], "samples")["uri"]).read_text()
    assert "data:image/png;base64," in samples
    assert _artifact(outs["filter-synthetic"], "metrics")["metadata"]["generated"] == 47
    md = Path(_artifact(outs["evaluate"], "report")["uri"]).read_text()
    assert md == (Path(urls["report"]) / "report.md").read_text() and "| no synthesis (logit_adjusted) |" in md
    assert "delta_overall" in _artifact(outs["evaluate"], "metrics")["metadata"]
    assert "data:image/png;base64," in Path(_artifact(outs["evaluate"], "per_class")["uri"]).read_text()
    decision = Path(_artifact(outs["promote"], "decision")["uri"]).read_text()
    assert "feedback-synth-classifier" in decision
