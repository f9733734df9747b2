"""One typed config per stage, plus the run config that holds them all.

The CLI, the KFP components and YAML presets all build these same objects. Every value is
checked for type and range when the object is built, so that a typo stops the run before any
long work starts, with a message that names the field.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import ConfigError


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{where}': {msg}")


@dataclass
class DataConfig:
    dataset: str = "digits-lt"  # built-in name (digits-lt, digits-groups) or a dataset URL
    image_size: int = 16  # images of URL datasets are resized to this square size
    channels: int = 0  # 0 = keep the dataset's own (1 for digits, 3 for RGB folders)
    many_threshold: int = 20  # a class with >= this many train images is "many-shot"
    few_threshold: int = 5  # a class with <= this many train images is "few-shot"
    split_seed: int = 0  # the fixed seed of the built-in datasets' one split

    def validate(self, prefix: str = "data") -> None:
        _check(bool(self.dataset), f"{prefix}.dataset", "must not be empty")
        _check(4 <= self.image_size <= 1024, f"{prefix}.image_size", f"must be in [4, 1024], got {self.image_size}")
        _check(self.channels in (0, 1, 3), f"{prefix}.channels", f"must be 0, 1 or 3, got {self.channels}")
        _check(self.few_threshold >= 0, f"{prefix}.few_threshold", "must be >= 0")
        _check(self.many_threshold > self.few_threshold + 1, f"{prefix}.many_threshold",
               f"must exceed few_threshold + 1 (few={self.few_threshold}), got {self.many_threshold}")


@dataclass
class OptimConfig:
    """Hyper-parameters shared by baseline training and retraining."""

    epochs: int = 40  # passes over the (real) training set
    batch_size: int = 64
    lr: float = 0.05  # peak SGD learning rate, cosine-decayed to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # random translation by up to 1/8 of the image size
    seed: int = 0
    device: str = "cpu"

    def validate(self, prefix: str) -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"{prefix}.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")


LOSSES = ("ce", "logit_adjusted", "group_reweighted")


@dataclass
class TrainConfig(OptimConfig):
    model: str = "resnet10t"  # any timm model name (timm.create_model)
    loss: str = "ce"  # ce | logit_adjusted (Menon et al. 2021, tau=1) | group_reweighted
    balanced_sampler: bool = False  # sample classes (or groups) uniformly instead of by frequency

    def validate(self, prefix: str = "train") -> None:
        super().validate(prefix)
        _check(bool(self.model), f"{prefix}.model", "must name a timm model")
        _check(self.loss in LOSSES, f"{prefix}.loss", f"must be one of {LOSSES}, got '{self.loss}'")


@dataclass
class RetrainConfig(OptimConfig):
    synthetic_fraction: float = 0.5  # share of synthetic images in each batch (real:synthetic mix)

    def validate(self, prefix: str = "retrain") -> None:
        super().validate(prefix)
        _check(0.0 <= self.synthetic_fraction < 1.0, f"{prefix}.synthetic_fraction",
               f"must be in [0, 1), got {self.synthetic_fraction}")


@dataclass
class FeedbackConfig:
    target: int = 0  # images per class after generation; 0 = the largest class count (reference rule)
    budget_fraction: float = 1.0  # scale the reference rule's counts (0.5 = half budget)
    shard_size: int = 256  # images per generation shard (one shard = one GPU pod task)
    per_group: bool = False  # plan per (class, group) instead of per class
    shrinkage: float = -1.0  # covariance shrinkage in [0, 1]; -1 = Ledoit-Wolf estimate

    def validate(self, prefix: str = "feedback") -> None:
        _check(self.target >= 0, f"{prefix}.target", f"must be >= 0, got {self.target}")
        _check(0 < self.budget_fraction <= 10, f"{prefix}.budget_fraction", f"must be in (0, 10], got {self.budget_fraction}")
        _check(self.shard_size >= 1, f"{prefix}.shard_size", f"must be >= 1, got {self.shard_size}")
        _check(self.shrinkage == -1.0 or 0.0 <= self.shrinkage <= 1.0, f"{prefix}.shrinkage",
               f"must be -1 (Ledoit-Wolf) or in [0, 1], got {self.shrinkage}")


@dataclass
class GenerateConfig:
    generator: str = "builtin"  # 'builtin' (bundled digits generator) or a diffusers model folder URL
    criterion: str = "entropy"  # loss | entropy | hardness | none (unguided)
    scale: float = 0.02  # feedback step size s (DESIGN: z += s * ||z|| * g / ||g||)
    guide_every: int = 5  # guide at every k-th denoising step ...
    guide_from: float = 0.0  # ... skipping the first fraction of the steps
    grad_through_unet: bool = True  # autograd through the UNet too, as the reference code does
    num_inference_steps: int = 20  # DDIM steps of a full (strength 1) trajectory
    strength: float = 0.8  # SDEdit: noise real images to this level; 1.0 = pure class-conditional
    condition_on_real: bool = True  # start from real training images of the class (support)
    cfg_scale: float = 2.0  # classifier-free guidance weight (1 = off)
    cond_dropout: float = 0.1  # dropout on the conditioning embedding, for diversity
    batch_size: int = 64
    prompt_template: str = "a photo of a {class_name}"  # text-conditioned generators only
    group_prompt_template: str = "a photo of a {class_name} on {group_name}"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # weights of the UNet and text/image encoders: float32 | bfloat16 | float16
    noise_level: int = 0  # unCLIP generators: noise on the CLIP image embedding, 0..999 (more = more varied)
    # GPU performance options (off = float32 on the CPU; see feedback_synth.performance)
    autocast: str = "none"  # none | bfloat16 | float16: mixed precision for the UNet's forward passes
    guidance_dtype: str = "float32"  # float32 | bfloat16: VAE decode + classifier (never float16: overflow)
    compile_unet: bool = False  # torch.compile the UNet; batches are padded to batch_size (fixed shapes)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    pad_last_batch: bool = False  # pad a shard's last batch to batch_size (implied by compile_unet)
    gradient_checkpointing: bool = False  # recompute UNet/VAE activations in the guided backward (memory)
    guidance_chunk_size: int = 0  # decode + classify the guided batch this many at a time (0: all; memory)

    def validate(self, prefix: str = "generate") -> None:
        from .criteria import CRITERIA  # late import: criteria imports torch

        names = tuple(CRITERIA) + ("none",)
        _check(self.criterion in names, f"{prefix}.criterion", f"unknown criterion '{self.criterion}'; known: {', '.join(names)}")
        _check(0 <= self.scale <= 1, f"{prefix}.scale", f"must be in [0, 1], got {self.scale}")
        _check(self.guide_every >= 1, f"{prefix}.guide_every", f"must be >= 1, got {self.guide_every}")
        _check(0 <= self.guide_from < 1, f"{prefix}.guide_from", f"must be in [0, 1), got {self.guide_from}")
        _check(1 <= self.num_inference_steps <= 1000, f"{prefix}.num_inference_steps", "must be in [1, 1000]")
        _check(0 < self.strength <= 1, f"{prefix}.strength", f"must be in (0, 1], got {self.strength}")
        _check(self.cfg_scale >= 0, f"{prefix}.cfg_scale", "must be >= 0")
        _check(0 <= self.cond_dropout < 1, f"{prefix}.cond_dropout", f"must be in [0, 1), got {self.cond_dropout}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"{prefix}.dtype", f"unknown dtype '{self.dtype}'")
        _check(0 <= self.noise_level <= 999, f"{prefix}.noise_level", f"must be in [0, 999], got {self.noise_level}")
        _check(self.autocast in ("none", "bfloat16", "float16"), f"{prefix}.autocast",
               f"must be none, bfloat16 or float16, got '{self.autocast}'")
        _check(self.guidance_dtype in ("float32", "bfloat16"), f"{prefix}.guidance_dtype",
               f"must be float32 or bfloat16 (float16 VAE decodes overflow to NaN), got '{self.guidance_dtype}'")
        _check(self.guidance_chunk_size >= 0, f"{prefix}.guidance_chunk_size",
               f"must be >= 0 (0: the whole batch), got {self.guidance_chunk_size}")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        _check(self.compile_mode in modes, f"{prefix}.compile_mode", f"must be one of {modes}, got '{self.compile_mode}'")


@dataclass
class FilterConfig:
    filters: list[str] = field(default_factory=lambda: ["degenerate", "near_duplicate", "off_support"])
    dark_threshold: float = 0.02  # degenerate: mean intensity below this is "near-black"
    flat_threshold: float = 1e-3  # degenerate: pixel std below this is "constant"
    duplicate_cosine: float = 0.995  # near_duplicate: feature cosine above this is a duplicate
    support_quantile: float = 0.99  # off_support: drop if farther than this quantile of real distances
    support_margin: float = 1.5  # off_support: ... times this margin

    def validate(self, prefix: str = "filter") -> None:
        from .filtering import FILTERS

        for name in self.filters:
            _check(name in FILTERS, f"{prefix}.filters", f"unknown filter '{name}'; known: {', '.join(FILTERS)}")
        _check(0 < self.duplicate_cosine <= 1, f"{prefix}.duplicate_cosine", "must be in (0, 1]")
        _check(0 < self.support_quantile <= 1, f"{prefix}.support_quantile", "must be in (0, 1]")
        _check(self.support_margin > 0, f"{prefix}.support_margin", "must be > 0")


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # '' = $MLFLOW_TRACKING_URI, else a SQLite store in the run's output folder
    experiment: str = "feedback-synth"
    registered_model: str = "feedback-synth-classifier"
    enabled: bool = True
    retries: int = 3  # bounded retries before a tracking call fails the run
    request_timeout_s: float = 30.0  # per HTTP request to the tracking server (a hung server fails fast)

    def validate(self, prefix: str = "tracking") -> None:
        _check(bool(self.experiment), f"{prefix}.experiment", "must not be empty")
        _check(bool(self.registered_model), f"{prefix}.registered_model", "must not be empty")
        _check(self.retries >= 0, f"{prefix}.retries", "must be >= 0")
        _check(self.request_timeout_s > 0, f"{prefix}.request_timeout_s", "must be > 0")


GATE_METRICS = ("few", "worst_class", "worst_group", "overall", "medium", "many", "average_group")


@dataclass
class PromoteConfig:
    gate_metric: str = "few"  # the metric that must improve
    min_gain: float = 0.0  # delta: gate metric up by at least this (strictly more than 0 when 0)
    max_overall_drop: float = 0.01  # epsilon: overall accuracy down by at most this
    lock_timeout_s: float = 60.0  # how long to wait for the promotion lock
    # the lock that serialises promotions across pods: '' = a file lock beside a local store,
    # 'postgresql://...' = an advisory lock on that database, 'k8s-lease://NAMESPACE/NAME' = a Lease
    lock_uri: str = ""

    def validate(self, prefix: str = "promote") -> None:
        _check(self.gate_metric in GATE_METRICS, f"{prefix}.gate_metric", f"must be one of {GATE_METRICS}, got '{self.gate_metric}'")
        _check(self.min_gain >= 0, f"{prefix}.min_gain", "must be >= 0")
        _check(self.max_overall_drop >= 0, f"{prefix}.max_overall_drop", "must be >= 0")
        _check(self.lock_timeout_s > 0, f"{prefix}.lock_timeout_s", "must be > 0")
        lock_schemes = ("postgresql://", "postgresql+psycopg2://", "postgres://", "k8s-lease://", "file://")
        _check(self.lock_uri == "" or self.lock_uri.startswith(lock_schemes), f"{prefix}.lock_uri",
               f"must be '' or start with one of {', '.join(lock_schemes)}; got '{self.lock_uri}'")
        if self.lock_uri.startswith("k8s-lease://"):
            parts = [p for p in self.lock_uri[len("k8s-lease://"):].split("/") if p]
            _check(len(parts) == 2, f"{prefix}.lock_uri", f"expected k8s-lease://NAMESPACE/NAME, got '{self.lock_uri}'")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)


# ---------------------------------------------------------------- building configs from dicts


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check ``value`` against the annotated type ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{where}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{where}': expected true/false, got {type(value).__name__} {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{where}': expected an integer, got {type(value).__name__} {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config field '{where}': expected a number, got {type(value).__name__} {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field '{where}': expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"config field '{where}': unsupported type {typ}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a (nested) dict, checking every key and type."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config field '{where}'; known: {', '.join(sorted(names))}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config field '{where}': expected a mapping, got {type(value).__name__}")
            kwargs[key] = from_dict(typ, value, where)
        else:
            kwargs[key] = _coerce(value, typ, where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["generate.scale=0.01", "train.epochs=5"]`` into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}': {exc}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
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


def load_run_config(file_url: Optional[str] = None, overrides: Optional[list[str]] = None,
                    base: Optional[dict[str, Any]] = None) -> RunConfig:
    """Defaults < ``base`` (a preset) < YAML file < ``--set`` overrides; validated."""
    from . import io

    data: dict[str, Any] = dict(base or {})
    if file_url:
        try:
            loaded = io.read_yaml(file_url) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {file_url}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file_url} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file_url}: expected a mapping of sections, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
    data = deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


PRESETS = {"digits-lt": "digits-lt.yaml", "digits-groups": "digits-groups.yaml"}


def preset(dataset: Optional[str]) -> dict[str, Any]:
    """The preset of a built-in dataset (package data: ``presets/<name>.yaml``); {} for a dataset URL.

    ``None`` is the default dataset, digits-lt.
    """
    from importlib import resources

    name = PRESETS.get(dataset or "digits-lt")
    if name is None:
        return {}
    path = resources.files("feedback_synth") / "presets" / name
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def resolve_run_config(dataset: Optional[str] = None, file_url: Optional[str] = None,
                       overrides: Optional[list[str]] = None) -> RunConfig:
    """The run configuration the command line means: the dataset's preset < the YAML file <
    ``--set`` overrides, with ``dataset`` (if given) as ``data.dataset``. Without ``dataset`` the
    preset follows the file's ``data.dataset``."""
    from . import io

    sets = list(overrides or [])
    if dataset:
        sets.insert(0, f"data.dataset={dataset}")
    preset_name = dataset
    if not preset_name and file_url:
        try:
            preset_name = ((io.read_yaml(file_url) or {}).get("data") or {}).get("dataset")
        except (FileNotFoundError, AttributeError, yaml.YAMLError):
            preset_name = None  # load_run_config reports the file's problem
    return load_run_config(file_url, sets, base=preset(preset_name))


def stage_config(cls: type, data: dict[str, Any] | str | None, prefix: str) -> Any:
    """Build and validate one stage's config from a dict or a JSON/YAML string (KFP inputs)."""
    if isinstance(data, str):
        data = yaml.safe_load(data) if data.strip() else {}
    cfg = from_dict(cls, data, prefix)
    cfg.validate(prefix)
    return cfg
