"""The compiled pipeline's exit handler against a real MLflow server: a run that fails mid-way does
not leave its MLflow parent run RUNNING forever."""
from __future__ import annotations

import pytest

from feedback_synth.tracking.mlflow_tracker import PIPELINE_ERROR_TAG, PIPELINE_STATE_TAG, STAGE_TAG
from feedback_synth_kfp import tracking as kfp_tracking


def _runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_failed_pipeline_run_closes_its_mlflow_runs(mlflow_server, tmp_path, kfp_workspace):
    import kfp.local
    from mlflow import MlflowClient

    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings, build_pipeline

    pipeline = build_pipeline(PipelineSettings(gpu_retries=0))  # the compiled one: with the exit handler
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
                   workspace_root=kfp_workspace,
                   raise_on_error=True)
    with pytest.raises(RuntimeError, match="exit-handler"):
        # a learning rate that turns the loss inf: train_baseline fails, after start_tracking (whose
        # pre-flight cannot know it) and prepare_data
        pipeline(classifier_model="test_resnet", mlflow_tracking_uri=mlflow_server.url,
                 mlflow_experiment="exit-handler", device="cpu",
                 config='{"train": {"epochs": 1, "lr": 1.0e+30}}')
    client = MlflowClient(mlflow_server.url)
    runs = _runs(client, "exit-handler")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"
    assert parent.data.tags[PIPELINE_STATE_TAG] == "FAILED" and parent.data.tags[PIPELINE_ERROR_TAG]
    stages = {r.data.tags[STAGE_TAG]: r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert stages["prepare_data"] == "FINISHED"
    assert all(status != "RUNNING" for status in stages.values()), stages
    assert "evaluate" not in stages and "promote" not in stages


def test_finish_tracking_kills_stage_runs_of_dead_pods(mlflow_server):
    """A pod killed mid-stage (OOM, preemption) never closes its nested run; the exit handler does."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    exp_id = client.create_experiment("dead-pods")
    tags = {"kfp.run_id": "run-dead-pod"}
    parent = client.create_run(exp_id, run_name="pipeline", tags=tags)
    done = client.create_run(exp_id, run_name="prepare_data",
                             tags={**tags, "mlflow.parentRunId": parent.info.run_id, STAGE_TAG: "prepare_data"})
    client.set_terminated(done.info.run_id, "FINISHED")
    client.create_run(exp_id, run_name="generate_shard_3",
                      tags={**tags, "mlflow.parentRunId": parent.info.run_id, STAGE_TAG: "generate_shard_3"})
    other = client.create_run(exp_id, run_name="another pipeline run", tags={"kfp.run_id": "run-other"})

    closed = kfp_tracking.finish_tracking(mlflow_server.url, "dead-pods", "run-dead-pod", "SUCCEEDED")
    assert closed == {"parent": {"run_id": parent.info.run_id, "status": "FINISHED"},
                      "killed_stages": ["generate_shard_3"]}
    status = {r.info.run_name: r.info.status for r in _runs(client, "dead-pods")}
    assert status == {"pipeline": "FINISHED", "prepare_data": "FINISHED", "generate_shard_3": "KILLED",
                      "another pipeline run": "RUNNING"}  # another KFP run's runs are not touched
    assert client.get_run(parent.info.run_id).data.tags[PIPELINE_STATE_TAG] == "SUCCEEDED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"
    # tracking off: nothing to do
    assert kfp_tracking.finish_tracking("", "dead-pods", "run-dead-pod", "FAILED") is None


@pytest.mark.slow
def test_failed_local_kfp_run_closes_its_mlflow_runs(mlflow_server, tmp_path, tiny_generator, capsys, monkeypatch):
    """`run --runner kfp-local` compiles the pipeline without the exit handler (it reads the
    pipeline outputs), so the runner itself closes a failed run's MLflow runs; and a task that
    fails with a one-line error (here the baseline's loss turns inf) ends the run with that line,
    as in process, not KFP's 'Inner task failed'; the file that carried the line is gone."""
    import os
    import tempfile

    from mlflow import MlflowClient

    from feedback_synth.cli.main import main
    from feedback_synth_kfp.local_runner import SCRATCH_OWNER, SCRATCH_PREFIX
    from feedback_synth_kfp.tracking import LAUNCH_ENV, LAUNCH_TAG

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # the scratch folder of a launch killed earlier (a process that is gone): this launch removes it
    killed = temp / f"{SCRATCH_PREFIX}killed"
    (killed / "workspace").mkdir(parents=True)
    (killed / SCRATCH_OWNER).write_text("999999999:0.000")
    # passes the pre-flight check, fails in train_baseline (the loss turns inf at this learning rate)
    args = ["run", "--runner", "kfp-local", "--output", str(tmp_path / "run")]
    for s in ("train.model=test_resnet", "train.epochs=1", "train.lr=1.0e+30", f"generate.generator={tiny_generator}",
              f"tracking.tracking_uri={mlflow_server.url}", "tracking.experiment=local-failure"):
        args += ["--set", s]
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("feedback-synth: error: train_baseline: ") and "lr" in last, last  # the task's own line
    assert "Inner task failed" not in last and "\x1b[" not in last
    runs = _runs(MlflowClient(mlflow_server.url), "local-failure")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED" and LAUNCH_TAG in parent.data.tags
    assert parent.data.tags[PIPELINE_ERROR_TAG].startswith("train_baseline: ")
    assert all(r.info.status != "RUNNING" for r in runs)
    assert LAUNCH_ENV not in os.environ  # restored
    assert os.listdir(temp) == []  # the launch's scratch folder (the task's line, KFP's workspace) is gone, and the killed one's
