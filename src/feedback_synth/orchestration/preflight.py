"""The checks a run makes before any work: a bad value stops it at once, with a one-line error,
and nothing is written.

What is checked: the names that plugins define (criteria, filters, losses); the dataset's layout,
labels and paths, and every image of a dataset URL opened and decoded (missing, corrupt,
truncated, a broken compressed stream, a decompression bomb), its channels decided as prepare
decides them; the timm model; the torch devices; the generator folder (a loadable diffusers
model: each component's config and weight files) against the data (number of classes or
conditions, channels, image size), from its configs only; the dataset's class names among the
generator's (its ``generator.json``) and ``generate.class_map``; the output folder (writable).
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.config import RunConfig, resolve_devices
from feedback_synth.devices import check_device  # noqa: F401  (re-exported: the pre-flight checks)
from feedback_synth.errors import ConfigError, DataError

WEIGHT_FILES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def check_names(cfg: RunConfig) -> None:
    """Names that plugins define (criteria, filters, losses) are known to their registries."""
    from feedback_synth.guidance.criteria import CRITERIA
    from feedback_synth.synthesis.filtering import FILTERS
    from feedback_synth.training.losses import LOSSES

    CRITERIA.check(cfg.generate.criterion, "generate.criterion")
    for name in cfg.filter.filters:
        FILTERS.check(name, "filter.filters")
    LOSSES.check(cfg.train.loss, "train.loss")
    if cfg.retrain.loss:
        LOSSES.check(cfg.retrain.loss, "retrain.loss")


def check_output_writable(output_url: str) -> None:
    """Write and remove a probe file, so that a read-only ``--output`` fails now, not after training."""
    probe = storage.join(output_url, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except (PermissionError, OSError) as exc:
        raise DataError(f"cannot write to the output folder {output_url}: {exc.strerror or exc}") from None


def check_generator_folder(spec: str, dataset_name: str) -> dict[str, Any]:
    """A generator folder is a loadable diffusers model of a kind this project knows, with each
    component's config and weights present; returns its UNet config (read from configs only)."""
    from feedback_synth.generation.adapters import GENERATOR_ADAPTERS, adapter_for_folder
    from feedback_synth.generation.loading import generator_meta, generator_path, local_folder

    folder = generator_path(spec, dataset_name)
    if not storage.exists(folder):
        raise DataError(f"generator model folder not found: {spec}")
    with local_folder(folder, weights=False) as local:  # configs only: what tells the kind apart
        adapter = adapter_for_folder(local)
    if adapter is None:
        raise DataError(f"generator model folder {spec} is not a diffusers model of a kind this project knows "
                        f"(expected unet/ and scheduler/; vae/ for a latent model; image_encoder/ for unCLIP; "
                        f"kinds: {', '.join(GENERATOR_ADAPTERS)})")
    fs, root = storage.fs_and_path(folder)
    files = {os.path.relpath(f, root.rstrip("/")) for f in fs.find(root)}
    for part in adapter.weighted_parts:
        if f"{part}/config.json" not in files:
            raise DataError(f"generator model folder {spec}: {part}/config.json is missing")
        if not any(f.startswith(f"{part}/") and f.endswith(WEIGHT_FILES) for f in files):
            raise DataError(f"generator model folder {spec}: {part}/ has no weight file "
                            f"({', '.join('*' + s for s in WEIGHT_FILES)})")
    return {"kind": adapter.name, **storage.read_json(storage.join(folder, "unet", "config.json")),
            "class_names": generator_meta(folder).get("class_names")}  # None: the generator names none


def check_generator_against_data(unet: dict[str, Any], num_classes: int, num_groups: int,
                                 channels: Optional[int], spec: str, image_size: Optional[int] = None,
                                 origin: str = "data.channels", class_names: Optional[list[str]] = None) -> None:
    """A pixel class-conditional generator must have one embedding per class (or per (class, group)
    cell) plus the null class, the data's channels and its image size (it makes images of its sample
    size only); latent generators take any classes and sizes.

    Args:
        channels: the data's channels (None: not known).
        image_size: the data's square image size (None: not known).
        origin: where the data's channels and size come from: ``data.channels`` (set in the config),
            ``decided`` (from the train split, data.channels 0) or ``built-in`` (a built-in dataset).
        class_names: the dataset's classes, named when their count does not match the generator's.

    A generator that names its classes (``generator.json``, one condition per class) takes a
    dataset of some of them: classes are matched by name (``generation.loading.class_index``, which
    pre-flight runs too).
    """
    if unet.get("kind") != "pixel":
        return
    conditions = (unet.get("num_class_embeds") or 1) - 1
    named = unet.get("class_names") or []
    subset = len(named) == conditions and num_classes <= conditions and num_groups == 1
    if conditions not in (num_classes, num_classes * num_groups) and not subset:
        raise DataError(f"generator {spec} is conditioned on {conditions} classes; the dataset has {num_classes} "
                        f"classes" + (f" and {num_classes * num_groups} (class, group) cells" if num_groups > 1 else "")
                        + _class_difference(class_names, unet.get("class_names")))
    made = unet.get("in_channels")
    if channels and made != channels:
        fix = "use another generator" if origin == "built-in" else \
            f"set data.channels={made}, or use another generator"
        have = {"built-in": f"the built-in dataset has {channels} channel{'s' if channels > 1 else ''}",
                "decided": f"the dataset has {channels} channel{'s' if channels > 1 else ''}, decided from its train "
                           "split with data.channels 0 (" + ("some train images are in colour" if channels == 3
                                                             else "every train image is grey") + ")",
                }.get(origin, f"data.channels is {channels}")
        raise DataError(f"generator {spec} makes {made}-channel images; {have} ({fix})")
    sample = unet.get("sample_size")
    sample = sample[0] if isinstance(sample, (list, tuple)) and len(set(sample)) == 1 else sample
    if image_size and isinstance(sample, int) and sample != image_size:
        if origin == "built-in":
            raise DataError(f"generator {spec} makes {sample}x{sample} images; the built-in dataset's images are "
                            f"{image_size}x{image_size} (use another generator)")
        raise DataError(f"generator {spec} makes {sample}x{sample} images; data.image_size is {image_size} "
                        f"(set data.image_size={sample}, or use another generator)")


def _class_difference(data_classes: Optional[list[str]], generator_classes: Optional[list[str]]) -> str:
    """`` (the dataset's classes not among the generator's: 'x'; ...)``: which classes make the counts
    differ (by name when the generator names its classes, else the dataset's class list); '' if unknown."""
    def shown(names: list[str]) -> str:
        return ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")

    if not data_classes:
        return ""
    if not generator_classes:
        return f" ({shown(list(data_classes))})"
    extra = [c for c in data_classes if c not in set(generator_classes)]
    missing = [c for c in generator_classes if c not in set(data_classes)]
    parts = ([f"the dataset's classes not among the generator's: {shown(extra)}"] if extra else []) + \
            ([f"the generator's classes not in the dataset: {shown(missing)}"] if missing else [])
    return f" ({'; '.join(parts)})" if parts else ""


def preflight(cfg: RunConfig, output_url: Optional[str] = None, check_devices: bool = True) -> None:
    """Every check that needs no long work (see the module docstring), before anything is written.
    ``check_devices=False``: the device names' form only, not whether this machine has them (the
    first task of a Kubeflow run, on a CPU pod: each GPU pod checks its own)."""
    import timm

    from feedback_synth.data.prepare import BUILTIN, scan_dataset
    from feedback_synth.generation.loading import BUILTIN_GENERATOR, builtin_generator_path

    check_names(cfg)
    builtin = cfg.data.dataset in BUILTIN
    # layout, labels, paths; every image opened and decoded and the channels decided; bounded wait
    scan = scan_dataset(cfg.data.dataset, cfg.data, images=True)
    if not timm.is_model(cfg.train.model):
        raise ConfigError(f"config field 'train.model': unknown timm model '{cfg.train.model}'")
    if check_devices:
        resolve_devices(cfg)  # the run's device and every stage's override: a device this machine lacks stops here
    if cfg.generate.generator == BUILTIN_GENERATOR:
        if not builtin:
            raise ConfigError("config field 'generate.generator': the bundled generator only knows the built-in "
                              f"datasets; dataset '{cfg.data.dataset}' needs a diffusers model folder URL")
        if not os.path.isdir(builtin_generator_path(cfg.data.dataset)):
            raise ConfigError(f"config field 'generate.generator': no bundled generator for '{cfg.data.dataset}'")
    if cfg.feedback.per_group and (scan.get("groups") or ["all"]) == ["all"]:
        raise ConfigError(f"config field 'feedback.per_group': dataset {cfg.data.dataset} has no groups")
    unet = check_generator_folder(cfg.generate.generator, cfg.data.dataset)
    origin = "built-in" if builtin else "data.channels" if cfg.data.channels else "decided"
    check_generator_against_data(unet, scan["num_classes"], len(scan.get("groups") or ["all"]),
                                 scan.get("channels") or cfg.data.channels or None, cfg.generate.generator,
                                 scan.get("image_size"), origin, scan.get("class_names"))
    from feedback_synth.generation.loading import class_index, generator_path

    # the dataset's classes by name among the generator's (and generate.class_map's keys among the dataset's)
    class_index(generator_path(cfg.generate.generator, cfg.data.dataset), scan["class_names"], cfg.generate.class_map)
    if cfg.adapt.method != "none":
        if cfg.adapt.method == "full" and os.path.isdir(os.path.join(
                builtin_generator_path(cfg.data.dataset) if cfg.generate.generator == BUILTIN_GENERATOR else
                (storage.local_path(cfg.generate.generator) or ""), "vae")):
            raise ConfigError("config field 'adapt.method': 'full' is for the small pixel generators; adapt a latent "
                              "model (it has a vae/) with 'lora'")
    if output_url is not None:
        check_output_writable(output_url)
    if cfg.tracking.enabled:  # an unreachable tracking server stops the run here, before any work
        from feedback_synth.tracking.client import check_local_store, check_reachable, resolve_tracking_uri

        check_local_store(cfg.tracking, output_url or "")
        uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith(("http://", "https://")):
            check_reachable(resolve_tracking_uri(cfg.tracking, output_url or "")[0], cfg.tracking.retries,
                            cfg.tracking.request_timeout_s)
