"""The pipeline, declared once: one row per stage, and every runner built from it.

Each ``Stage`` says its name (the one vocabulary: the MLflow run, the timings key, the KFP task
with ``-`` for ``_``), its config section, its folder under the run, what it reads (by name: the
outputs of earlier stages) and what it writes, whether it runs on a GPU, whether it runs once or
in every feedback round, and how it calls its library function (``call``, given a
``StageContext``). The in-process runner (``orchestration.run``) iterates ``STAGES``; the KFP pipeline
(``pipelines/feedback_synth_pipeline.py``) makes one task per row, wiring inputs to the outputs of
the same names, and each KFP component runs its row's ``call``; kfp-local's maps and the GPU
placement (``feedback_synth_kfp.placement``) read the table too.

Input names: an earlier stage's output (``data``, ``baseline``, ``adapted``, ``feedback``,
``generated``, ``filtered``, ``retrained``, ``evaluation``), ``latest`` (the model that gives the
round's feedback: the baseline in round 1, the previous round's retrained model after that) and
``previous_<output>`` (that output of the previous round; absent in round 1).

Adding a stage is one row plus its library function: see docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Union

from feedback_synth import storage
from feedback_synth.config import GenerateConfig, RunConfig
from feedback_synth.stages.result import StageResult

EpochHook = Optional[Callable[[dict[str, Any]], None]]


@dataclass
class StageContext:
    """What one stage's call gets: the run's config (devices resolved), the URLs of its inputs by
    name, its output folder, the round, and the per-epoch hook of training stages."""

    cfg: RunConfig
    inputs: dict[str, Union[str, list[str]]]
    output: str
    round_index: int = 1
    on_epoch: EpochHook = None
    shard_ids: Optional[list[int]] = None  # generate: only these shards (a KFP shard task); None = all

    def url(self, name: str) -> Any:
        return self.inputs[name]

    def optional(self, name: str) -> Any:
        return self.inputs.get(name)

    def model(self, name: str) -> str:
        """The checkpoint folder inside a training stage's output ``name``."""
        return storage.join(self.inputs[name], "model")


def generate_config(cfg: RunConfig, adapted_url: Optional[str]) -> GenerateConfig:
    """The generator hand-off, in one place: generation samples from the folder adapt_generator
    wrote (``<adapted>/generator``) when the generator was adapted, else from ``generate.generator``."""
    if cfg.adapt.method == "none" or not adapted_url:
        return cfg.generate
    return replace(cfg.generate, generator=storage.join(adapted_url, "generator"))


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline."""

    name: str  # the stage's one name
    title: str  # what the KFP UI shows
    section: Optional[str]  # its RunConfig section (its MLflow params), None: none
    folder: str  # its folder under the run's output (per round: rounds/round-<r>/<folder>)
    inputs: tuple[str, ...]  # what it reads, by name (module docstring)
    output: str  # the name of what it writes (its KFP output artifact)
    call: Callable[[StageContext], StageResult] = field(repr=False, compare=False)
    gpu: bool = False  # on Kubeflow: a GPU pod (the GPU image, an accelerator, retries)
    per_round: bool = False  # once per feedback round (else once per run)
    sharded: bool = False  # fans out over the plan's shards on Kubeflow (one task per shard)
    cached: bool = True  # KFP may reuse a cached result (not where files or the registry change under it)
    light: bool = False  # a small pod (tracking and registry calls only)
    component: str = ""  # its KFP component (feedback_synth_kfp.components.<component>); '' = the name
    fan_out_over: str = ""  # sharded: the input whose task returns the shard ids

    @property
    def component_name(self) -> str:
        return self.component or self.name

    def params(self, ctx: StageContext) -> dict[str, Any]:
        """The stage's MLflow params: its config section (the generate config with the generator
        it samples from), and the round for feedback."""
        if self.section is None:
            return {}
        if self.section == "generate":
            return asdict(generate_config(ctx.cfg, ctx.optional("adapted")))
        out = asdict(getattr(ctx.cfg, self.section))
        if self.name == "extract_feedback":
            out["round"] = ctx.round_index
        return out


# ------------------------------------------------------------------ each stage's call of its library function


def _prepare_data(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.prepare_data import prepare_data

    return prepare_data(ctx.cfg.data, ctx.output)


def _train_baseline(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.train_baseline import train_baseline

    return train_baseline(ctx.url("data"), ctx.output, ctx.cfg.train, ctx.cfg.data, on_epoch=ctx.on_epoch)


def _adapt_generator(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.adapt_generator import adapt_generator

    return adapt_generator(ctx.url("data"), ctx.model("baseline"), ctx.output, ctx.cfg.adapt, ctx.cfg.generate)


def _extract_feedback(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.extract_feedback import extract_feedback

    return extract_feedback(ctx.url("data"), ctx.model("latest"), ctx.output, ctx.cfg.feedback, ctx.round_index,
                            ctx.optional("previous_feedback"))


def _generate(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.generate_shard import generate

    return generate(ctx.url("data"), ctx.model("latest"), ctx.url("feedback"), ctx.output,
                    generate_config(ctx.cfg, ctx.optional("adapted")), shard_ids=ctx.shard_ids)


def _filter(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.filter_synthetic import filter_synthetic

    return filter_synthetic(ctx.url("data"), ctx.model("latest"), ctx.url("feedback"), ctx.url("generated"),
                            ctx.output, ctx.cfg.filter, ctx.optional("previous_filtered"))


def _retrain(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.retrain import retrain

    return retrain(ctx.url("data"), ctx.model("baseline"), ctx.url("filtered"), ctx.output, ctx.cfg.retrain,
                   ctx.cfg.data, on_epoch=ctx.on_epoch, previous_retrained_url=ctx.optional("previous_retrained"),
                   round_index=ctx.round_index)


def _evaluate(ctx: StageContext) -> StageResult:
    from feedback_synth.stages.evaluate import evaluate_run

    return evaluate_run(ctx.url("data"), ctx.url("baseline"), ctx.url("retrained"), ctx.url("filtered"),
                        ctx.output, ctx.cfg.data, device=ctx.cfg.device, adapted_url=ctx.optional("adapted"))


def _promote(ctx: StageContext) -> StageResult:  # pragma: no cover - the runners call promote_once themselves
    raise NotImplementedError("promote registers in MLflow: stages.promote.promote_once")


STAGES: tuple[Stage, ...] = (
    Stage("prepare_data", "Prepare data", "data", "data", (), "data", _prepare_data),
    Stage("train_baseline", "Train baseline", "train", "baseline", ("data",), "baseline", _train_baseline, gpu=True),
    Stage("adapt_generator", "Adapt the generator", "adapt", "adapted", ("data", "baseline"), "adapted",
          _adapt_generator, gpu=True),
    Stage("extract_feedback", "Extract feedback and plan", "feedback", "feedback",
          ("data", "latest", "previous_feedback"), "feedback", _extract_feedback, per_round=True),
    Stage("generate", "Generate shard", "generate", "generated", ("data", "latest", "adapted", "feedback"), "generated",
          _generate, gpu=True, per_round=True, sharded=True, cached=False, component="generate_shard",
          fan_out_over="feedback"),
    Stage("filter", "Filter synthetic images", "filter", "filtered",
          ("data", "latest", "feedback", "generated", "previous_filtered"), "filtered", _filter, per_round=True,
          cached=False, component="filter_synthetic"),
    Stage("retrain", "Retrain on real + synthetic", "retrain", "retrained",
          ("data", "baseline", "filtered", "previous_retrained"), "retrained", _retrain, gpu=True, per_round=True),
    Stage("evaluate", "Evaluate", None, "report", ("data", "baseline", "adapted", "retrained", "filtered"), "evaluation",
          _evaluate),
    Stage("promote", "Promote", "promote", "report", ("data", "retrained", "evaluation"), "decision", _promote,
          cached=False, light=True),
)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
ROUND_FOLDERS: tuple[str, ...] = tuple(s.folder for s in STAGES if s.per_round)
# every folder a run writes at the top of its output (a run deletes nothing else)
STAGE_FOLDERS: tuple[str, ...] = tuple(dict.fromkeys([*(s.folder for s in STAGES), "rounds"]))


def stage(name: str) -> Stage:
    return STAGE_BY_NAME[name]


def round_inputs(produced: dict[str, Any], previous_round: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``latest`` and ``previous_<output>`` for a round, from what earlier stages ``produced`` and
    the previous round's outputs (None in round 1). Used alike for URLs (in process) and for
    KFP task outputs (the pipeline)."""
    out = dict(produced)
    out["latest"] = previous_round["retrained"] if previous_round else produced["baseline"]
    for key, value in (previous_round or {}).items():
        out[f"previous_{key}"] = value
    return out


def walk(rows: list[Stage], rounds: int, produced: dict[str, Any],
         run_row: Callable[[Stage, dict[str, Any], int], Any]) -> None:
    """Walk ``rows`` in table order, as both runners do: ``run_row(row, available, round_index)``
    runs (or, for KFP, adds) one stage and returns its output (a URL, a task output). A row that
    runs once gets what is ``produced`` so far; consecutive per-round rows run ``rounds`` times,
    round r reading ``latest`` and the previous round's outputs (``round_inputs``). ``produced`` is
    filled in as rows finish (the last round's outputs at the end)."""
    i = 0
    while i < len(rows):
        if not rows[i].per_round:
            produced[rows[i].output] = run_row(rows[i], produced, 1)
            i += 1
            continue
        group = []
        while i < len(rows) and rows[i].per_round:
            group.append(rows[i])
            i += 1
        previous: Optional[dict[str, Any]] = None
        for r in range(1, rounds + 1):
            this_round: dict[str, Any] = {}
            for row in group:
                this_round[row.output] = run_row(row, {**round_inputs(produced, previous), **this_round}, r)
            previous = this_round
        produced.update(previous or {})


def inputs_of(entry: Stage, available: dict[str, Any]) -> dict[str, Any]:
    """The inputs of ``entry`` that ``available`` has (a ``previous_*`` is absent in round 1)."""
    return {name: available[name] for name in entry.inputs if name in available}
