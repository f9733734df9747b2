"""One typed config per stage, plus the run config that holds them all.

Each is a pydantic dataclass: types are strict (a string is not a number; an integer is a number),
ranges are ``Field(ge=..., le=...)``, choices are ``Literal``, unknown keys are refused, and every
value is checked when the object is built or a field is set, so that a typo stops the run before
any long work. A refusal is a :class:`~feedback_synth.errors.ConfigError` of one line that names
the field: ``config field 'train.epochs': input should be greater than or equal to 1, got 0``.

Names that plugins define (criteria, losses, filters) are checked against their registries by the
stages and the pre-flight check (``orchestration.preflight``), with messages of the same form: this
module imports none of them.

The CLI, the KFP components and the YAML presets all build these same objects:
defaults < the dataset's preset (``presets/<dataset>.yaml``) < ``--config FILE`` < ``--set k=v``.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic import StrictBool as Bool
from pydantic import StrictFloat as Float
from pydantic import StrictInt as Int
from pydantic import StrictStr as Str
from pydantic.dataclasses import dataclass as pydantic_dataclass

from feedback_synth.errors import ConfigError

# The report and gate metrics, in table order (the one home of these names).
METRICS = ("overall", "many", "medium", "few", "worst_class", "average_group", "worst_group")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
POSTGRES_SCHEMES = ("postgresql://", "postgresql+psycopg2://", "postgres://")
LOCK_SCHEMES = (*POSTGRES_SCHEMES, "file://")

_SECTION = ConfigDict(extra="forbid", validate_assignment=True)
_DEVICE_NAME = re.compile(r"(auto|cpu|mps|cuda(:[0-9]+)?)?")


def _device_name(value: str) -> str:
    """A device name's form (whether this machine has it: ``devices.resolve_device``, at pre-flight)."""
    if not _DEVICE_NAME.fullmatch(value):
        raise ValueError(f"'{value}' is not a device: auto, cpu, cuda, cuda:N or mps ('' in a section: the run's device)")
    return value


Device = Annotated[Str, AfterValidator(_device_name)]
# numpy's legacy seeding (the built-in splits) takes 0 .. 2**32 - 1; the pilot adds the fold number
Seed = Annotated[Int, Field(ge=0, le=2**31 - 1)]


def _message(error: dict[str, Any], where: str) -> str:
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown config field '{where}'"
    msg = error["msg"].removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    if error["type"] == "value_error" or "input" not in error:
        return f"config field '{where}': {msg}"
    return f"config field '{where}': {msg}, got {error['input']!r}"


def _field_class(cls: type, name: str) -> Optional[type]:
    """The config class of field ``name`` of ``cls`` (annotations are strings here), else None."""
    annotation = next((f.type for f in dataclasses.fields(cls) if f.name == name), None)
    return _SECTIONS.get(annotation) if isinstance(annotation, str) else annotation


def _known(cls: type, loc: tuple) -> str:
    """The field names at ``loc`` (all but its last part) below the config class ``cls``."""
    for part in loc[:-1]:
        cls = _field_class(cls, part) or cls
    return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))


def _config_error(cls: type, exc: ValidationError) -> ConfigError:
    error = exc.errors()[0]
    loc = tuple(str(p) for p in error["loc"])
    where = ".".join((cls.section,) + loc if cls.section else loc)
    msg = _message(error, where)
    if msg.startswith("unknown"):
        msg += f"; known: {_known(cls, loc)}"
    extra = len(exc.errors()) - 1
    return ConfigError(msg + (f" (and {extra} more)" if extra else ""))


_SECTIONS: dict[str, type] = {}


def section(name: str):
    """Make a config class: a pydantic dataclass whose refusals are one-line ConfigErrors naming
    ``<name>.<field>`` (``name`` '' for the run config itself)."""

    def wrap(cls: type) -> type:
        cls.section = name
        cls = pydantic_dataclass(cls, config=_SECTION)
        init, setattr_ = cls.__init__, cls.__setattr__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise _config_error(cls, exc) from None

        def __setattr__(self, key, value):
            try:
                setattr_(self, key, value)
            except ValidationError as exc:
                raise _config_error(cls, exc) from None

        cls.__init__, cls.__setattr__ = __init__, __setattr__
        _SECTIONS[cls.__name__] = cls
        return cls

    return wrap


def _comma_list(value: Any) -> Any:
    """``"a, b"`` (from ``--set filter.filters=a,b``) is the list ``["a", "b"]``."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


@section("data")
class DataConfig:
    section: ClassVar[str]
    dataset: Str = Field("digits-lt", min_length=1)  # built-in name (digits-lt, digits-groups) or a dataset URL
    image_size: Int = Field(16, ge=4, le=1024)  # images of URL datasets are resized to this square size
    channels: Literal[0, 1, 3] = 0  # 0 = decided from the whole train split (1 if every image is grey, else 3)
    few_threshold: Int = Field(5, ge=0)  # a class with <= this many train images is "few-shot"
    many_threshold: Int = 20  # a class with >= this many train images is "many-shot"
    split_seed: Seed = 0  # the seed of the built-in datasets' split (and of NICO++-style folders)

    @field_validator("many_threshold")
    @classmethod
    def _above_few(cls, v: int, info: ValidationInfo) -> int:
        few = info.data.get("few_threshold", 5)
        if v <= few + 1:
            raise ValueError(f"must exceed few_threshold + 1 (few={few}), got {v}")
        return v


@section("")
class OptimConfig:
    """Hyper-parameters shared by baseline training and retraining."""

    section: ClassVar[str]
    epochs: Int = Field(40, ge=1)  # passes over the (real) training set
    batch_size: Int = Field(64, ge=1)
    lr: Float = Field(0.05, gt=0, allow_inf_nan=False)  # peak SGD learning rate, cosine-decayed to 0
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(5e-4, ge=0)
    augment: Bool = True  # random translation by up to 1/8 of the image size
    seed: Seed = 0
    device: Device = ""  # '' = the run's device (``device``); else auto, cpu, cuda, cuda:1, mps
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)


@section("train")
class TrainConfig(OptimConfig):
    model: Str = Field("resnet10t", min_length=1)  # any timm model name (timm.create_model)
    # ce | logit_adjusted (Menon et al. 2021) | balanced_softmax (Ren et al. 2020) | group_reweighted;
    # logit adjustment (tau 2) by default: every benchmark here chose it on validation over cross-entropy
    loss: Str = "logit_adjusted"
    tau: Float = Field(2.0, gt=0, allow_inf_nan=False)  # logit_adjusted's temperature (balanced_softmax is tau 1)
    balanced_sampler: Bool = False  # sample classes (or groups) uniformly instead of by frequency


@section("retrain")
class RetrainConfig(OptimConfig):
    synthetic_fraction: Float = Field(0.5, ge=0, lt=1)  # share of synthetic images in each batch
    loss: Str = ""  # '' = the baseline's loss (train.loss): the run's delta is then the gain of synthesis alone
    tau: Optional[Float] = Field(None, gt=0, allow_inf_nan=False)  # None = the baseline's (train.tau)
    balanced_sampler: Optional[Bool] = None  # None = the baseline's (train.balanced_sampler)
    # the class prior of logit_adjusted / balanced_softmax once synthetic images are in the batch:
    # 'real' = the real training counts; 'batch' = the expected class mix of a batch, real + synthetic
    prior: Literal["real", "batch"] = "real"
    # no class group loses (docs/method.md): after training on real + synthetic, re-fit the last layer
    # on the real images alone, the representation frozen, for this many epochs (decoupled training:
    # the head then sees the real prior its loss assumes; 0 = off). From evidence:
    # benchmarks/results/retrain_variants.md
    head_epochs: Int = Field(20, ge=0)
    # no class group loses: knowledge distillation from the no-synthesis reference (Hinton et al. 2015)
    # on each batch's real images, weight x T^2 x KL(reference || retrained) at distill_temperature
    # (0 = off): the retrained model keeps what the real-only model knows, the synthetic images add
    # the rest; 'real_share' weighs each real image by its class's share of real images among its real
    # and synthetic ones (full where synthesis adds nothing). 0.25 by default: your data is most likely
    # in another style than the generator's pool, as digits-gap is, where it is the one variant of
    # fourteen that kept every class group on validation; the digits-lt and digits-groups presets turn
    # it off, as their validation chose. From evidence: retrain_variants_10_seeds.md
    distill_weight: Float = Field(0.25, ge=0, allow_inf_nan=False)
    distill_temperature: Float = Field(2.0, gt=0, allow_inf_nan=False)
    distill_classes: Literal["all", "real_share"] = "all"
    # the no-synthesis reference that the report, the gate and the pilot compare with: 'same' trains
    # it on the real images with the optimiser steps of the retraining (a half-synthetic batch takes
    # half the real images, so an epoch over the real ones takes twice the steps); 'epochs' gives it
    # the retraining's epochs (the baseline serves when its recipe is the same), which credits
    # synthesis with what the extra steps alone bring. 'same', from evidence: on digits-groups the
    # extra steps alone gave worst-group +0.206 of synthesis' +0.237 (benchmarks/results/same_steps.md)
    reference_steps: Literal["same", "epochs"] = "same"
    # add lambda x the offset from this prior to the batch prior to the logits, lambda in [0, 1] chosen
    # on the validation split so that no class group (many / medium / few, average group) is below the
    # no-synthesis reference, then the best calibration_metric. Off by default: it trades what few-shot
    # gain there is for many-shot margin (digits-lt: many +0.012, CI from +0.003, few +0.102 instead of
    # +0.113). Item 1's rule read on validation chose it for digits-gap on 20 seeds (round 13) and
    # dropped it on 30 (round 17: few-shot +0.021 on validation without it, CI above zero), so no preset
    # turns it on (benchmarks/results/retrain_variants_round13.md, own_data_default_round17.md)
    calibration: Literal["no_group_loses", "none"] = "none"
    calibration_metric: Literal[("",) + METRICS] = ""  # '' = few, or worst_group for group data without shot buckets


@section("adapt")
class AdaptConfig:
    """Fine-tune the generator on the task's real training images before generating
    (docs/method.md: Adapting the generator to the task)."""

    section: ClassVar[str]
    method: Literal["none", "full", "lora"] = "none"  # none | full (all UNet weights) | lora (peft adapters)
    # optimiser steps. 1200, by a rule fixed before a confirmation run on fresh split seeds (digits-gap,
    # seeds 10-19, the preset's retraining): a setting qualifies when its validation many-shot change
    # against no synthesis has a CI from -0.005 up; 1200 did (CI from -0.003), 600 did not (-0.009).
    # Paired with 600 on test there: overall +0.004, medium +0.019 (CI +0.002..+0.038), few -0.010
    # (CI -0.046..+0.025) (benchmarks/results/adapt_steps_round16.md; 600 beat 200: adapt_steps_round14.md).
    # More steps draw more near-copies, which the near_copy filter drops: none kept at 1200 (copies_1200.md)
    steps: Int = Field(1200, ge=1)
    lr: Float = Field(3e-4, gt=0, allow_inf_nan=False)  # AdamW learning rate (LoRA takes a larger one)
    batch_size: Int = Field(32, ge=1)
    rank: Int = Field(8, ge=1)  # LoRA rank (lora_alpha = rank)
    # which layers LoRA adapts: attention projections only, or their resnet convolutions too
    layers: Literal["attention", "attention_conv"] = "attention_conv"
    # how the class condition is used while adapting: 'keep' trains each image with its class;
    # 'drop' trains on the null condition only (the style from every class, each class's content
    # from the prior); 'mixed' drops it for half of the batch. 'keep', from evidence: on digits-gap
    # (5 seeds) few-shot +0.141 over 'drop' (CI +0.117..+0.160) with no near-copies at 200 steps:
    # under classifier-free guidance the conditional branch must learn the style too
    class_condition: Literal["drop", "keep", "mixed"] = "keep"
    class_balanced: Bool = True  # sample classes uniformly (else by frequency)
    augment: Bool = True  # random translation by up to 1/8 of the image size
    seed: Seed = 0
    device: Device = ""  # '' = the run's device
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)
    samples_per_class: Int = Field(8, ge=1, le=64)  # before/after sample grid, per class
    # the guard against memorising the rarest classes (docs/method.md: Copies): every copy_check_every
    # steps, sample copy_check_samples images of each class with at most copy_check_max_images train
    # images, as generation does; at the first check where a class's near-copy share (synthesis.copies)
    # exceeds copy_share, stop and go back to the last checkpoint that passed (0 = off). Off by default,
    # from evidence: on digits-rare (3 seeds) the near_copy filter alone kept no copy, and the guard
    # beside it did not pay off (overall -0.023, CI -0.046..+0.002) and costs sampling; 50 is the measured setting
    copy_check_every: Int = Field(0, ge=0)
    copy_check_samples: Int = Field(20, ge=1, le=256)
    copy_check_max_images: Int = Field(20, ge=1)
    copy_share: Float = Field(0.05, ge=0, le=1)


@section("feedback")
class FeedbackConfig:
    section: ClassVar[str]
    target: Int = Field(0, ge=0)  # images per class after generation; 0 = the largest class count (reference rule)
    budget_fraction: Float = Field(1.0, gt=0, le=10)  # scale the reference rule's counts (0.5 = half budget)
    shard_size: Int = Field(256, ge=1)  # images per generation shard (one shard = one GPU pod task)
    per_group: Bool = False  # plan per (class, group) instead of per class
    shrinkage: Float = -1.0  # covariance shrinkage in [0, 1]; -1 = Ledoit-Wolf estimate
    rounds: Int = Field(1, ge=1, le=10)  # feedback rounds: 1 = the paper's one-shot feedback from the baseline
    round_split: Literal["equal", "front_loaded"] = "equal"  # how the budget is shared across rounds
    device: Device = ""  # where the frozen classifier's features are computed; '' = the run's device
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)

    @field_validator("shrinkage")
    @classmethod
    def _shrinkage(cls, v: float) -> float:
        if v != -1.0 and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be -1 (Ledoit-Wolf) or in [0, 1], got {v}")
        return v


@section("generate")
class GenerateConfig:
    section: ClassVar[str]
    generator: Str = "builtin"  # 'builtin' (bundled digits generator) or a diffusers model folder URL
    criterion: Str = "entropy"  # loss | entropy | hardness | none (unguided)
    scale: Float = Field(0.02, ge=0, le=1)  # feedback step size s (docs/method.md: z += s * ||z|| * g / ||g||)
    guide_every: Int = Field(5, ge=1)  # guide at every k-th denoising step ...
    guide_from: Float = Field(0.0, ge=0, lt=1)  # ... skipping the first fraction of the steps
    grad_through_unet: Bool = True  # autograd through the UNet too, as the reference code does
    num_inference_steps: Int = Field(20, ge=1, le=1000)  # DDIM steps of a full (strength 1) trajectory
    strength: Float = Field(0.8, gt=0, le=1)  # SDEdit: noise real images to this level; 1.0 = pure class-conditional
    condition_on_real: Bool = True  # start from real training images of the class (support)
    cfg_scale: Float = Field(2.0, ge=0)  # classifier-free guidance weight (1 = off)
    cond_dropout: Float = Field(0.1, ge=0, lt=1)  # dropout on the conditioning embedding, for diversity
    batch_size: Int = Field(64, ge=1)
    # task class -> generator class where their names differ (a class-conditional generator is
    # matched by class name, never by position): e.g. {"three": "3"}
    class_map: dict[Str, Str] = Field(default_factory=dict)
    prompt_template: Str = "a photo of a {class_name}"  # text-conditioned generators only
    group_prompt_template: Str = "a photo of a {class_name} on {group_name}"
    seed: Seed = 0
    device: Device = ""  # '' = the run's device
    # settings that change how fast (or in how much memory) images are made, not which images:
    # recorded, but not part of a fingerprint, so a run may resume on other hardware
    runtime_fields: ClassVar[tuple[str, ...]] = ("device", "batch_size", "compile_unet", "compile_mode",
                                                 "pad_last_batch", "gradient_checkpointing", "guidance_chunk_size")
    dtype: Literal[DTYPE_NAMES] = "float32"  # weights of the UNet and text/image encoders
    noise_level: Int = Field(0, ge=0, le=999)  # unCLIP generators: noise on the CLIP image embedding (more = more varied)
    # GPU performance options (off = float32 on the CPU; see feedback_synth.generation.performance)
    autocast: Literal["none", "bfloat16", "float16"] = "none"  # mixed precision for the UNet's forward passes
    # VAE decode + classifier; never float16 (its VAE decodes overflow to NaN)
    guidance_dtype: Literal["float32", "bfloat16"] = "float32"
    compile_unet: Bool = False  # torch.compile the UNet; batches are padded to batch_size (fixed shapes)
    compile_mode: Literal[COMPILE_MODES] = "default"
    pad_last_batch: Bool = False  # pad a shard's last batch to batch_size (implied by compile_unet)
    gradient_checkpointing: Bool = False  # recompute UNet/VAE activations in the guided backward (memory)
    guidance_chunk_size: Int = Field(0, ge=0)  # decode + classify the guided batch this many at a time (0: all)

    @field_validator("guidance_dtype", mode="before")
    @classmethod
    def _no_float16_gradients(cls, v: Any) -> Any:
        if v == "float16":
            raise ValueError("float16 VAE decodes overflow to NaN in the gradient path; use float32 or bfloat16")
        return v


@section("filter")
class FilterConfig:
    section: ClassVar[str]
    filters: list[Str] = Field(default_factory=lambda: ["degenerate", "near_copy", "near_duplicate", "off_support"])
    dark_threshold: Float = 0.02  # degenerate: mean intensity below this is "near-black"
    flat_threshold: Float = 1e-3  # degenerate: pixel std below this is "constant"
    duplicate_cosine: Float = Field(0.995, gt=0, le=1)  # near_duplicate: feature cosine above this is a duplicate
    # a class whose kept synthetic images are still more than this share near-copies of its training
    # images (synthesis.copies) is named in a warning and in the report (docs/method.md: Copies)
    copy_share: Float = Field(0.05, ge=0, le=1)
    support_quantile: Float = Field(0.99, gt=0, le=1)  # off_support: drop if farther than this quantile of real ...
    support_margin: Float = Field(1.5, gt=0)  # off_support: ... distances times this margin
    # a class that keeps less than this share of its generated images is "starved": its dropped images
    # come back, closest to passing first, up to this share (docs/method.md: Starved classes); 0 = off
    min_kept_fraction: Float = Field(0.25, ge=0, le=1)
    # the early gap warning: a class whose off_support filter drops more than this share of its
    # generated images is off the task's support; 'warn' names those classes and goes on
    # (re-admission then applies), 'stop' ends the run there, before the retraining is spent
    gap_share: Float = Field(0.5, ge=0, le=1)
    on_gap: Literal["warn", "stop"] = "warn"
    device: Device = ""  # where the classifier's features and the gap measures are computed; '' = the run's device
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, v: Any) -> Any:
        return _comma_list(v)


@section("tracking")
class TrackingConfig:
    section: ClassVar[str]
    tracking_uri: Str = ""  # '' = $MLFLOW_TRACKING_URI, else a SQLite store in the run's output folder
    experiment: Str = Field("feedback-synth", min_length=1)
    registered_model: Str = Field("feedback-synth-classifier", min_length=1)
    enabled: Bool = True
    # MLflow's HTTP retries (with backoff) before a tracking call fails the run; at most 10 (a dead server
    # would otherwise hold the run for hours)
    retries: Int = Field(3, ge=0, le=10)
    # per HTTP request to the tracking server (a hung server fails fast); finite, at most an hour
    request_timeout_s: Float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)


@section("promote")
class PromoteConfig:
    section: ClassVar[str]
    gate_metric: Literal[METRICS] = "few"  # the metric that must improve
    min_gain: Float = Field(0.0, ge=0)  # delta: gate metric up by at least this (strictly more than 0 when 0)
    max_overall_drop: Float = Field(0.01, ge=0)  # epsilon: overall accuracy down by at most this
    lock_timeout_s: Float = Field(60.0, gt=0)  # how long to wait for the promotion lock
    # the lock that serialises promotions across pods: '' = a file lock beside a local store,
    # 'postgresql://...' = an advisory lock on that database, 'file:///PATH' = a file lock there
    lock_uri: Str = ""

    @field_validator("lock_uri")
    @classmethod
    def _lock_uri(cls, v: str) -> str:
        if v and not v.startswith(LOCK_SCHEMES):
            raise ValueError(f"must be '' or start with one of {', '.join(LOCK_SCHEMES)}; got '{v}'")
        return v


@section("")
class RunConfig:
    section: ClassVar[str]
    # the one device setting: auto (CUDA where present, else the CPU) | cpu | cuda | cuda:N | mps;
    # every stage, the fidelity oracle and the pilot run there unless their section sets its own
    device: Device = "auto"
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)


# ---------------------------------------------------------------- building configs from dicts


def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build the config class ``cls`` from a (nested) dict, checking every key and value."""
    data = dict(data or {})
    if cls is RunConfig:  # each section through its own class, so that messages name it
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in data.items():
            if key not in names:
                raise ConfigError(f"unknown config field '{key}'; known: {', '.join(names)}")
            if _field_class(cls, key) is None:  # a run-wide value (device), not a section
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config field '{key}': expected a mapping of '{key}' fields, got "
                                  f"{type(value).__name__}")
            data[key] = _field_class(cls, key)(**value)
    return cls(**data)


SECTION_DEVICES = ("train", "retrain", "adapt", "feedback", "generate", "filter")


def resolve_devices(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with the run's device and every stage section's device made concrete on
    this machine (``devices.resolve_device``: auto -> cuda or cpu; '' -> the run's), each checked:
    the one place where the device setting is resolved (once per process: a KFP task on its pod)."""
    from feedback_synth.devices import resolve_device

    run_device = resolve_device(cfg.device, "device")
    sections = {}
    for name in SECTION_DEVICES:
        sec = getattr(cfg, name)
        sections[name] = dataclasses.replace(sec, device=resolve_device(sec.device, f"{name}.device", run_device))
    return dataclasses.replace(cfg, device=run_device, **sections)


def strip_runtime(data: Any, cls: type) -> Any:
    """``data`` (the plain dict of a config of class ``cls``) without the settings that do not
    change results (each class's ``runtime_fields``: the device, inference batch sizes, compile,
    chunking, checkpointing), recursively: what a fingerprint and a resume compare."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    skip = set(getattr(cls, "runtime_fields", ()))
    return {k: strip_runtime(v, _field_class(cls, k) or object) for k, v in data.items() if k not in skip}


def result_settings(cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg`` (any config object) that change its stage's results, as plain data."""
    return strip_runtime(dataclasses.asdict(cfg), type(cfg))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["generate.scale=0.01", "train.epochs=5"]`` into a nested dict (values parsed as YAML)."""
    from feedback_synth import storage

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:  # storage.load_yaml: 1e-3 is a float, as in a config file
            value = storage.load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            if isinstance(exc, storage.DuplicateKeyError):
                raise ConfigError(f"--set {key}: duplicate key '{exc.key}' in value '{raw}'") from None
            raise ConfigError(f"--set {key}: cannot parse value '{raw}': {' '.join(str(exc).split())}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(file_url: str) -> dict[str, Any]:
    """A YAML config file (any fsspec URL): a mapping of sections."""
    from feedback_synth import storage

    try:
        loaded = storage.read_yaml(file_url) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file_url}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {file_url} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {file_url} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start}); save it as UTF-8 YAML") from None
    except storage.DuplicateKeyError as exc:
        raise ConfigError(f"config file {file_url}: duplicate key '{exc.key}' on line {exc.line} (first on line "
                          f"{exc.first_line}); give each key once") from None
    except yaml.YAMLError as exc:  # one line: where (line, column, 1-based), what, and where it started
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        if mark is None or not problem:
            what = str(exc)
        else:
            what = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
            context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context:
                what += f" ({context}" + (f" from line {start.line + 1}, column {start.column + 1})" if start else ")")
        raise ConfigError(f"config file {file_url} is not valid YAML: {' '.join(what.split())}") from None
    except OSError as exc:  # a special file, a permission, a store error: one line naming the file
        raise ConfigError(f"config file {file_url}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {file_url}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_run_config(file_url: Optional[str] = None, overrides: Optional[list[str]] = None,
                    base: Optional[dict[str, Any]] = None) -> RunConfig:
    """Defaults < ``base`` (a preset) < YAML file < ``--set`` overrides; checked."""
    data: dict[str, Any] = dict(base or {})
    if file_url:
        data = deep_merge(data, read_config_file(file_url))
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(RunConfig, data)


PRESETS = {"digits-lt": "digits-lt.yaml", "digits-gap": "digits-gap.yaml", "digits-groups": "digits-groups.yaml"}


def preset(dataset: Optional[str]) -> dict[str, Any]:
    """The preset of a built-in dataset (package data: ``presets/<name>.yaml``); {} for a dataset URL.

    ``None`` is the default dataset, digits-lt.
    """
    from importlib import resources

    name = PRESETS.get(dataset or "digits-lt")
    if name is None:
        return {}
    path = resources.files("feedback_synth") / "presets" / name
    from feedback_synth import storage

    return storage.load_yaml(path.read_text()) if path.is_file() else {}


def resolve_run_config(dataset: Optional[str] = None, file_url: Optional[str] = None,
                       overrides: Optional[list[str]] = None) -> RunConfig:
    """The run configuration the command line means: the dataset's preset < the YAML file <
    ``--set`` overrides, with ``dataset`` (if given) as ``data.dataset``. Without ``dataset`` the
    preset follows the file's ``data.dataset``."""
    sets = list(overrides or [])
    if dataset:
        sets.insert(0, f"data.dataset={dataset}")
    preset_name = dataset
    if not preset_name and file_url:
        preset_name = ((read_config_file(file_url).get("data") or {}) or {}).get("dataset")
    if not preset_name:
        preset_name = (parse_overrides(sets).get("data") or {}).get("dataset")
    return load_run_config(file_url, sets, base=preset(preset_name))
