"""The feedback-synth pipeline: every stage as a KFP task, generation fanned out over shards.

``feedback_synth_pipeline`` is the pipeline with the default ``PipelineSettings`` (the compiled
``pipelines/feedback_synth_pipeline.yaml``); ``build_pipeline(settings)`` makes one with other
compile-time settings (generation parallelism, resources, GPU type, retries). Everything a user
changes per run is a pipeline parameter.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from kfp import dsl, kubernetes

from feedback_synth.orchestration import stage_table
from feedback_synth_kfp import kfp_patches
from feedback_synth_kfp.components.adapt_generator import adapt_generator
from feedback_synth_kfp.components.evaluate import evaluate
from feedback_synth_kfp.components.extract_feedback import extract_feedback
from feedback_synth_kfp.components.filter_synthetic import filter_synthetic
from feedback_synth_kfp.components.finish_tracking import finish_tracking
from feedback_synth_kfp.components.generate_shard import generate_shard
from feedback_synth_kfp.components.prepare_data import prepare_data
from feedback_synth_kfp.components.promote import promote
from feedback_synth_kfp.components.retrain import retrain
from feedback_synth_kfp.components.start_tracking import start_tracking
from feedback_synth_kfp.components.train_baseline import train_baseline
from feedback_synth_kfp.parameters import named_defaults

kfp_patches.install()  # the task setters without kfp's stack walk; a header the same on every compile

PIPELINE_NAME = "feedback-synth"

# The usual taint of GPU node pools (GKE, the NVIDIA GPU operator): generation pods tolerate it.
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

# the named parameters' defaults: the library's (feedback_synth.config), never hand-written copies;
# a parameter left at its default leaves the dataset's preset in force (feedback_synth_kfp.parameters)
_D = named_defaults()

# each stage table row's KFP component, by name
COMPONENTS = {"prepare_data": prepare_data, "train_baseline": train_baseline, "adapt_generator": adapt_generator,
              "extract_feedback": extract_feedback, "generate_shard": generate_shard,
              "filter_synthetic": filter_synthetic, "retrain": retrain, "evaluate": evaluate, "promote": promote}

# The pipeline's outputs: the tracking context and every stage's main artifact.
PipelineOutputs = NamedTuple("PipelineOutputs", [
    ("tracking", dsl.Artifact), ("data", dsl.Dataset), ("baseline", dsl.Model), ("adapted", dsl.Model),
    ("feedback", dsl.Artifact),
    ("filtered", dsl.Dataset), ("retrained", dsl.Model), ("evaluation", dsl.Artifact), ("decision", dsl.Markdown)])


@dataclass(frozen=True)
class Resources:
    """Kubernetes requests and limits of one kind of task."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


@dataclass(frozen=True)
class PipelineSettings:
    """What is fixed when the pipeline is compiled (KFP takes these as constants)."""

    parallelism: int = 8  # generation shards (GPU pods) running at once
    gpu_type: str = "nvidia.com/gpu"  # the accelerator resource of the GPU tasks (feedback_synth_kfp.placement)
    gpus: int = 1  # per GPU task
    gpu_retries: int = 3  # preemptible GPU nodes: retry a GPU task this many times
    rounds: int = 1  # feedback rounds, unrolled (feedback.rounds must match: extract_feedback checks)
    retry_backoff: str = "60s"  # first wait before a retry (doubles each time)
    small: Resources = field(default_factory=lambda: Resources("250m", "1", "1Gi", "2Gi"))  # tracking, promote
    cpu: Resources = field(default_factory=lambda: Resources("2", "4", "8Gi", "16Gi"))  # data, training, filter
    gpu: Resources = field(default_factory=lambda: Resources("4", "8", "16Gi", "32Gi"))  # generation, retraining
    # Wrap the stages in an exit handler that closes the MLflow runs of a failed run. KFP allows no
    # pipeline outputs from inside one, so without it (the local runner, which reads the outputs)
    # the pipeline returns PipelineOutputs instead.
    exit_handler: bool = True

    def __post_init__(self) -> None:
        if self.parallelism < 1:
            raise ValueError(f"parallelism must be >= 1, got {self.parallelism}")
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.gpus}")
        if self.gpu_retries < 0:
            raise ValueError(f"gpu_retries must be >= 0, got {self.gpu_retries}")
        if not 1 <= self.rounds <= 10:
            raise ValueError(f"rounds must be in [1, 10], got {self.rounds}")


def _sized(task: dsl.PipelineTask, name: str, res: Resources) -> dsl.PipelineTask:
    return (task.set_display_name(name).set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
            .set_memory_request(res.memory_request).set_memory_limit(res.memory_limit))


def _placed(task: dsl.PipelineTask, row: stage_table.Stage, name: str, settings: PipelineSettings, node_selector,
            tolerations) -> dsl.PipelineTask:
    """Size and place the task of a stage table row: a GPU pod where the table says ``gpu`` (the one
    place that decides), a small pod for a ``light`` one, else a CPU pod."""
    if row.gpu:
        return _on_gpu(_sized(task, name, settings.gpu), settings, node_selector, tolerations)
    return _sized(task, name, settings.small if row.light else settings.cpu)


def _on_gpu(task: dsl.PipelineTask, settings: PipelineSettings, node_selector, tolerations) -> dsl.PipelineTask:
    task.set_accelerator_type(settings.gpu_type).set_accelerator_limit(settings.gpus)
    if settings.gpu_retries:
        task.set_retry(num_retries=settings.gpu_retries, backoff_duration=settings.retry_backoff, backoff_factor=2.0)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


def closing_runs(enabled: bool, settings: PipelineSettings, mlflow_tracking_uri, mlflow_experiment, run_id,
                 name: str):
    """An exit handler around the tasks defined inside it: ``finish_tracking`` runs whatever
    happens to them and closes the MLflow runs a failure left open (``enabled`` False: nothing,
    for the local runner, which reads the pipeline's outputs; KFP allows none from inside one)."""
    if not enabled:
        return contextlib.nullcontext()
    finish = _sized(finish_tracking(mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
                                    kfp_run_id=run_id), "Close MLflow runs", settings.small)
    finish.set_caching_options(False)
    return dsl.ExitHandler(finish, name=name)


def build_pipeline(settings: PipelineSettings = PipelineSettings()) -> Callable:
    """The pipeline function, compiled with ``settings``."""

    def feedback_synth_pipeline(
        dataset: str = _D["dataset"],
        classifier_model: str = _D["classifier_model"],
        adapt_method: str = _D["adapt_method"],
        generator: str = _D["generator"],
        criterion: str = _D["criterion"],
        scale: float = _D["scale"],
        guide_every: int = _D["guide_every"],
        budget_fraction: float = _D["budget_fraction"],
        shard_size: int = _D["shard_size"],
        workspace_url: str = "",
        run_folder: str = "",
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = _D["mlflow_experiment"],
        registered_model: str = _D["registered_model"],
        gate_metric: str = _D["gate_metric"],
        min_gain: float = _D["min_gain"],
        max_overall_drop: float = _D["max_overall_drop"],
        device: str = _D["device"],
        gpu_node_selector: dict = {},
        gpu_tolerations: list = DEFAULT_GPU_TOLERATIONS,
        config: str = "{}",
    ):
        """Feedback-guided synthesis for an imbalanced classifier, stage by stage.

        Steps (inside an exit handler, finish_tracking, that closes the MLflow runs a failed run left
        open; see PipelineSettings.exit_handler): start_tracking (the run's config, resolved once;
        the MLflow parent run) -> prepare_data -> train_baseline -> adapt_generator (GPU) ->
        [extract_feedback (plan: shard ids) -> generate_shard x N (ParallelFor, GPU) ->
        filter_synthetic (dsl.Collected shards) -> retrain (GPU)] x PipelineSettings.rounds -> evaluate -> promote.

        Args:
            dataset (str): built-in dataset (digits-lt, digits-groups, digits-gap) or a dataset URL.
            classifier_model (str): timm model name of the classifier.
            adapt_method (str): adapt the generator to the task first: none | full | lora.
            generator (str): 'builtin' or a diffusers model folder URL.
            criterion (str): feedback criterion: loss | entropy | hardness | none.
            scale (float): feedback step size s.
            guide_every (int): guide at every k-th denoising step.
            budget_fraction (float): scale of the reference rule's per-class image counts.
            shard_size (int): images per generation shard (one GPU pod each).
            workspace_url (str): e.g. gs://bucket/feedback-synth: stages write under <workspace_url>/<run id>/
                (a stable place, so retried shard pods resume); '' = into the task's output artifacts.
            run_folder (str): when set, stages write the run's layout under this folder (as the in-process
                runner does), so that a re-run into it resumes; kfp-local sets it to its --output.
            mlflow_tracking_uri (str): MLflow tracking server; '' = no tracking and no promotion.
            mlflow_experiment (str): MLflow experiment name.
            registered_model (str): registered model name in the MLflow registry.
            gate_metric (str): promotion gate: the metric that must improve.
            min_gain (float): promotion gate: minimum gain of the gate metric.
            max_overall_drop (float): promotion gate: largest allowed drop of overall accuracy.
            device (str): the run's device: auto (CUDA where a GPU task's pod has it) | cpu | cuda | cuda:N;
                the GPU tasks (feedback_synth_kfp.placement.GPU_STAGES) resolve it on their own pod, the
                others run on their CPU pod's CPU.
            gpu_node_selector (dict): nodeSelector of the GPU pods, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}.
            gpu_tolerations (list): tolerations of the GPU pods.
            config (str): JSON object of every other config field, by section, e.g.
                {"train": {"loss": "logit_adjusted", "tau": 2.0}, "adapt": {"steps": 400}}; the named
                parameters above apply over it.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        where = dict(workspace_url=workspace_url, run_id=run_id, run_folder=run_folder)

        with closing_runs(settings.exit_handler, settings, mlflow_tracking_uri, mlflow_experiment, run_id, "stages"):
            track = _sized(start_tracking(
                mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
                registered_model=registered_model, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_run_id=run_id,
                dataset=dataset, classifier_model=classifier_model, adapt_method=adapt_method, generator=generator,
                criterion=criterion, scale=scale, guide_every=guide_every, budget_fraction=budget_fraction,
                shard_size=shard_size, gate_metric=gate_metric, min_gain=min_gain, max_overall_drop=max_overall_drop,
                device=device, config=config),
                "Resolve config, start MLflow run", settings.small)
            track.set_caching_options(False)  # opens a new MLflow run every time
            tracking = track.outputs["tracking"]

            # one task per row of the stage table, inputs wired to the outputs of the same names;
            # feedback in rounds is unrolled at compile time (KFP v2 has no dynamic loops): round r
            # takes its feedback from the latest model and carries the previous round's outputs on
            produced: dict = {}
            tasks: dict = {}
            place = (settings, gpu_node_selector, gpu_tolerations)

            def add(row, available: dict, r: int = 1):
                tag = f" (round {r})" if row.per_round and settings.rounds > 1 else ""
                args = {**stage_table.inputs_of(row, available), "tracking": tracking}
                if row.name != "promote":
                    args.update(where)
                if row.per_round:
                    args.update(round_index=r, rounds=settings.rounds)
                component = COMPONENTS[row.component_name]
                if row.sharded:  # one task per shard of the plan that the fan-out input's task returned
                    loop = "generate-shards" if settings.rounds == 1 else f"generate-shards-round-{r}"
                    with dsl.ParallelFor(items=tasks[row.fan_out_over].outputs["Output"],
                                         parallelism=settings.parallelism, name=loop) as shard_id:
                        task = _placed(component(**args, shard_id=shard_id), row, f"{row.title}{tag}", *place)
                    output = dsl.Collected(task.outputs["shard"])
                else:
                    task = _placed(component(**args), row, f"{row.title}{tag}", *place)
                    output = task.outputs[row.output]
                if not row.cached:  # the cache checks neither shard files nor the registry
                    task.set_caching_options(False)
                tasks[row.output] = task
                return output

            stage_table.walk(list(stage_table.STAGES), settings.rounds, produced, add)

        if settings.exit_handler:
            return None
        return PipelineOutputs(tracking=tracking, **{name: produced[name] for name in PipelineOutputs._fields
                                                     if name != "tracking"})

    feedback_synth_pipeline.__annotations__["return"] = None if settings.exit_handler else PipelineOutputs
    return dsl.pipeline(name=PIPELINE_NAME, description="Fix an imbalanced image classifier with feedback-guided "
                                                        "diffusion synthesis: train, generate, filter, retrain, "
                                                        "promote.")(feedback_synth_pipeline)


feedback_synth_pipeline = build_pipeline()


def compile_pipeline(output_path: str, settings: PipelineSettings = PipelineSettings()) -> str:
    """Compile the pipeline (with ``settings``) to a YAML file; returns ``output_path``."""
    from kfp import compiler

    pipeline = feedback_synth_pipeline if settings == PipelineSettings() else build_pipeline(settings)
    compiler.Compiler().compile(pipeline, output_path)
    return output_path
