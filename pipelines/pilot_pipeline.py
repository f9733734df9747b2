"""The pilot as a Kubeflow pipeline: the in-process pilot (``feedback-synth tune``) fanned out.

    start_tracking (the config, resolved once; pre-flight; the MLflow parent run)
    -> pilot_prepare (the folds of train + val)
    -> pilot_fold per fold (ParallelFor, GPU pods: its baseline, then the adaptations the grid asks for)
    -> pilot_cells (waits for every baseline)
    -> pilot_cell per (setting, fold) (ParallelFor, GPU pods; each a nested MLflow run)
    -> pilot_choose (the table, go / no-go, ``chosen.yaml``; closes the parent run)

The chosen config is the run's: ``feedback-synth submit --config <output>/chosen.yaml`` (the
``chosen`` artifact holds the same file). A Katib Experiment would fit a search over a
continuous space with early stopping; the pilot's grid is a handful of discrete settings judged
by paired folds, which a ParallelFor expresses directly.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

from kfp import dsl

from feedback_synth.orchestration import DEFAULT_FOLDS
from feedback_synth_kfp.components.pilot import (
    pilot_cell,
    pilot_cells,
    pilot_choose,
    pilot_config,
    pilot_fold,
    pilot_prepare,
)
from feedback_synth_kfp.components.start_tracking import start_tracking
from feedback_synth_kfp.parameters import named_defaults
from feedback_synth_kfp.pipelines.feedback_synth_pipeline import (
    DEFAULT_GPU_TOLERATIONS,
    PipelineSettings,
    _on_gpu,
    _sized,
    closing_runs,
)

PILOT_NAME = "feedback-synth-pilot"
_D = named_defaults()

PilotOutputs = NamedTuple("PilotOutputs", [("tracking", dsl.Artifact), ("verdict", dsl.Markdown),
                                           ("chosen", dsl.Artifact), ("go", bool)])


@dataclass(frozen=True)
class PilotSettings:
    """What is fixed when the pilot is compiled: the pods (as the run's pipeline sizes them), how
    many cells run at once, and the exit handler (off for the local runner, which reads outputs)."""

    pipeline: PipelineSettings = PipelineSettings()
    parallelism: int = 8  # pilot cells (GPU pods) at once
    exit_handler: bool = True


def _pilot_tasks(settings: PilotSettings, output, dataset, grid, folds, epochs, mlflow_tracking_uri, mlflow_experiment,
                 device, gpu_node_selector, gpu_tolerations, config):
    """Add the pilot's tasks to the pipeline being defined; (start_tracking's artifact, the
    verdict task)."""
    place = settings.pipeline
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    track = _sized(start_tracking(
        mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
        registered_model=_D["registered_model"], run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_run_id=run_id,
        dataset=dataset, classifier_model=_D["classifier_model"], adapt_method=_D["adapt_method"],
        generator=_D["generator"], criterion=_D["criterion"], scale=_D["scale"], guide_every=_D["guide_every"],
        budget_fraction=_D["budget_fraction"], shard_size=_D["shard_size"], gate_metric=_D["gate_metric"],
        min_gain=_D["min_gain"], max_overall_drop=_D["max_overall_drop"], device=device, config=config),
        "Resolve config, start MLflow run", place.small)
    track.set_caching_options(False)
    tracking = track.outputs["tracking"]
    prep = _sized(pilot_prepare(tracking=tracking, output=output, grid=grid, folds=folds, epochs=epochs),
                  "Prepare the folds", place.cpu)
    gpu = (place, gpu_node_selector, gpu_tolerations)
    with dsl.ParallelFor(items=prep.output, parallelism=settings.parallelism,
                         name="fold-baselines") as fold:
        base = _on_gpu(_sized(pilot_fold(tracking=tracking, output=output, fold=fold, grid=grid, epochs=epochs),
                              "Fold baseline and adaptations", place.gpu), *gpu)
    ready = _sized(pilot_cells(grid=grid, baselines=dsl.Collected(base.output)),
                   "Every fold ready", place.small)
    with dsl.ParallelFor(items=ready.output, parallelism=settings.parallelism, name="cells") as item:
        cell = _on_gpu(_sized(pilot_cell(tracking=tracking, output=output, cell=item, epochs=epochs),
                              "Setting x fold", place.gpu), *gpu)
        cell.set_caching_options(False)  # the cache checks no file under output
    verdict = _sized(pilot_choose(tracking=tracking, output=output, grid=grid, folds=folds, epochs=epochs,
                                  scores=dsl.Collected(cell.output)), "Choose: go / no-go", place.small)
    verdict.set_caching_options(False)
    return tracking, verdict


def build_pilot_pipeline(settings: PilotSettings = PilotSettings()) -> Callable:
    """The pilot pipeline function, compiled with ``settings``."""
    place = settings.pipeline

    def feedback_synth_pilot(
        output: str,
        dataset: str = _D["dataset"],
        grid: str = "",
        folds: int = DEFAULT_FOLDS,
        epochs: int = 0,
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = _D["mlflow_experiment"],
        device: str = _D["device"],
        gpu_node_selector: dict = {},
        gpu_tolerations: list = DEFAULT_GPU_TOLERATIONS,
        config: str = "{}",
    ):
        """The pilot: judge a small grid of synthesis settings on folds of train + val before the
        run spends its budget; go only when a setting's gain over no synthesis has a 95% CI above
        zero.

        Args:
            output (str): where the pilot writes, a URL every pod reaches (gs://bucket/pilots/p1).
            dataset (str): built-in dataset (digits-lt, digits-groups, digits-gap) or a dataset URL.
            grid (str): JSON object {"section.field": [values]}; '' = adapt.method x criterion x strength.
            folds (int): repeated validation splits of train + val (the test split is never read).
            epochs (int): epochs of the pilot's baselines and retrainings; 0 = the run's.
            mlflow_tracking_uri (str): MLflow tracking server; '' = no tracking.
            mlflow_experiment (str): MLflow experiment name.
            device (str): auto | cpu | cuda | cuda:N, resolved on each GPU pod.
            gpu_node_selector (dict): nodeSelector of the GPU pods.
            gpu_tolerations (list): tolerations of the GPU pods.
            config (str): JSON object of the run's other config fields, by section (as the run pipeline's).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        with closing_runs(settings.exit_handler, place, mlflow_tracking_uri, mlflow_experiment, run_id, "pilot"):
            tracking, verdict = _pilot_tasks(settings, output, dataset, grid, folds, epochs, mlflow_tracking_uri,
                                             mlflow_experiment, device, gpu_node_selector, gpu_tolerations, config)
        if settings.exit_handler:
            return None
        return PilotOutputs(tracking=tracking, verdict=verdict.outputs["verdict"], chosen=verdict.outputs["chosen"],
                            go=verdict.outputs["Output"])

    feedback_synth_pilot.__annotations__["return"] = None if settings.exit_handler else PilotOutputs
    return dsl.pipeline(name=PILOT_NAME, description="The feedback-synth pilot: synthesis settings judged on folds "
                                                     "of train + val, go only when the gain's CI excludes zero.")(
        feedback_synth_pilot)


feedback_synth_pilot = build_pilot_pipeline()


def build_piloted_pipeline(settings: PilotSettings = PilotSettings()) -> Callable:
    """The pilot, then the run with its choice when it says go: the pilot's tasks, then the run
    pipeline as a nested pipeline under ``dsl.If(go)``; one exit handler around both closes the
    MLflow runs a failure left open."""
    from dataclasses import replace

    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import build_pipeline

    run = build_pipeline(replace(settings.pipeline, exit_handler=False))
    place = settings.pipeline

    def feedback_synth_piloted(
        pilot_output: str,
        dataset: str = _D["dataset"],
        grid: str = "",
        folds: int = DEFAULT_FOLDS,
        epochs: int = 0,
        workspace_url: str = "",
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = _D["mlflow_experiment"],
        registered_model: str = _D["registered_model"],
        device: str = _D["device"],
        gpu_node_selector: dict = {},
        gpu_tolerations: list = DEFAULT_GPU_TOLERATIONS,
        config: str = "{}",
    ):
        """The pilot on folds of train + val, then, on go, the whole run with the pilot's chosen
        config (its gate, registration and promotion as the run pipeline's defaults and ``config``
        say); on no-go nothing more runs.

        Args:
            pilot_output (str): where the pilot writes, a URL every pod reaches.
            dataset (str): built-in dataset or a dataset URL.
            grid (str): the pilot's grid, JSON {"section.field": [values]}; '' = the default grid.
            folds (int): the pilot's folds of train + val.
            epochs (int): epochs of the pilot's trainings; 0 = the run's.
            workspace_url (str): where the run's stages write (<workspace_url>/<run id>/).
            mlflow_tracking_uri (str): MLflow tracking server; '' = no tracking and no promotion.
            mlflow_experiment (str): MLflow experiment name.
            registered_model (str): registered model name in the MLflow registry.
            device (str): auto | cpu | cuda | cuda:N, resolved on each GPU pod.
            gpu_node_selector (dict): nodeSelector of the GPU pods.
            gpu_tolerations (list): tolerations of the GPU pods.
            config (str): JSON object of the other config fields, by section; the pilot's choice
                applies over it for the run.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        with closing_runs(settings.exit_handler, place, mlflow_tracking_uri, mlflow_experiment, run_id,
                          "pilot-then-run"):
            _, chosen = _pilot_tasks(settings, pilot_output, dataset, grid, folds, epochs, mlflow_tracking_uri,
                                     mlflow_experiment, device, gpu_node_selector, gpu_tolerations, config)
            with dsl.If(chosen.outputs["Output"] == True, name="go"):  # noqa: E712 - a KFP condition, not Python's
                config_of = _sized(pilot_config(chosen=chosen.outputs["chosen"]), "The chosen config", place.small)
                run(dataset=dataset, workspace_url=workspace_url, mlflow_tracking_uri=mlflow_tracking_uri,
                    mlflow_experiment=mlflow_experiment, registered_model=registered_model, device=device,
                    gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations,
                    config=config_of.output).set_display_name("Run with the pilot's choice")

    return dsl.pipeline(name="feedback-synth-piloted", description="The feedback-synth pilot, then the run with its "
                                                                   "choice when it says go.")(feedback_synth_piloted)


def compile_pilot(output_path: str, settings: PilotSettings = PilotSettings(), then_run: bool = False) -> str:
    """Compile the pilot pipeline (``then_run``: the pilot, then the run with its choice) to a YAML
    file; returns ``output_path``."""
    from kfp import compiler

    if then_run:
        pipeline = build_piloted_pipeline(settings)
    else:
        pipeline = feedback_synth_pilot if settings == PilotSettings() else build_pilot_pipeline(settings)
    compiler.Compiler().compile(pipeline, output_path)
    return output_path
