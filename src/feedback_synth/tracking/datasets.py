"""The datasets a stage read, as MLflow datasets (``mlflow.data``) logged as the inputs of its run.

A split of a prepared dataset (``<dataset_url>/<split>.npz``, read by
:func:`feedback_synth.data.imageset.load_split`) is an MLflow NumPy dataset named
``<dataset name>/<split>`` (``digits-lt/train``): features the uint8 images ``(N, H, W, C)``,
targets the class labels, source the split file's URL, digest the SHA-256 of its images, labels,
groups and names (MLflow's own NumPy digest hashes only the first 10,000 values, a few images).
The kept synthetic images (``<filtered_url>/synthetic.npz``) are ``<dataset name>/synthetic``, whose
source (an MLflow ``code`` source) names the generation plan, its digest and the generation config.

Each is logged with its context (``mlflow.data.context``: ``training``, ``validation``,
``testing``...) as an input of the stage's run and of the parent run, which MLflow's UI lists under
"Datasets"; MLflow keeps one dataset per name and digest, and one input per dataset and run.
With tracking off (``NullTracker``) nothing is read or logged.

Where the runners call these (on the logger of the stage's run; what each stage reads):

    prepare_data      log_split_datasets(log, data_url, ["train", "val", "test"])   (what it wrote)
    train_baseline    log_split_datasets(log, data_url, ["train", "val", "test"])
    extract_feedback  log_split_datasets(log, data_url, ["train", "val"])
    generate          log_split_datasets(log, data_url, ["train"])
    filter            log_split_datasets(log, data_url, ["train"])
    retrain           log_split_datasets(log, data_url, ["train", "val", "test"])
                      log_synthetic_dataset(log, filtered_url, plan_url, generate_config, dataset_name=...)
    evaluate          log_split_datasets(log, data_url, ["oracle"])
                      log_synthetic_dataset(log, filtered_url, plan_url, generate_config, context="evaluation", ...)

The promote stage then finds the ``test`` split on the parent run for the model's metrics
(``registry.register``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from typing import Any, Optional

import numpy as np

from feedback_synth import storage
from feedback_synth.data.imageset import ImageSet, load_info, load_split

SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "testing", "pool": "generation",
                 "oracle": "evaluation"}

SPLIT_TAG = "feedback_synth.split"  # input tag: which split (or "synthetic") a dataset is

SYNTHETIC = "synthetic"


def content_digest(data: ImageSet) -> str:
    """SHA-256 (16 hex digits) of the images, labels, groups and class/group names."""
    h = hashlib.sha256()
    for array in (data.images, data.labels, data.groups):
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    h.update(json.dumps([list(data.class_names), list(data.group_names)]).encode())
    return h.hexdigest()[:16]


def _target(log):
    """The logger to log on, or None when tracking is off (NullTracker, or no run yet). A KFP
    ``StageRun`` is unwrapped to its logger."""
    if not hasattr(log, "log_datasets") and hasattr(log, "log"):
        log = log.log
    if getattr(log, "run_id", None) is None or not hasattr(log, "log_datasets"):
        return None
    return log


def _file_source(url: str):
    """MLflow's dataset source for a file URL (local, gs://, s3://, http...), else a code source naming it."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
        warnings.simplefilter("ignore")
        try:
            return resolve_dataset_source(url)
        except MlflowException:
            return CodeDatasetSource({"uri": url})


def _numpy_dataset(data: ImageSet, name: str, source):
    import mlflow.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_numpy(data.images, source=source, targets=data.labels.astype(np.int64), name=name,
                                      digest=content_digest(data))


def dataset_input(dataset, context: str, split: str):
    """An MLflow ``DatasetInput`` of ``dataset`` (an ``mlflow.data`` dataset) with its context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    d = dataset.to_dict()
    entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                     schema=d.get("schema"), profile=d.get("profile"))
    return DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag(SPLIT_TAG, split)])


def short_name(info_name: str) -> str:
    """A dataset's short name: a built-in's name, or the last part of a dataset URL."""
    return info_name.rstrip("/").rsplit("/", 1)[-1] or info_name


def split_dataset(dataset_url: str, split: str, name: Optional[str] = None):
    """The MLflow dataset of one split of a prepared dataset (``digits-lt/test``)."""
    name = short_name(name or load_info(dataset_url).name)
    data = load_split(dataset_url, split)
    return _numpy_dataset(data, f"{name}/{split}", _file_source(storage.join(dataset_url, f"{split}.npz")))


def _file_stamp(url: str) -> str:
    """What the store says about a file (size, modification time or checksum): changes with it."""
    fs, path = storage.fs_and_path(url)
    info = fs.info(path)
    return json.dumps({k: info.get(k) for k in ("size", "mtime", "created", "etag", "md5Hash", "crc32c")
                       if info.get(k) is not None}, default=str)


@functools.lru_cache(maxsize=64)
def _split_input(dataset_url: str, split: str, name: str, context: str, stamp: str):
    # one read and digest per split file and process: the in-process runner logs the train split
    # in five stages (``stamp`` makes a rewritten file a new entry)
    return dataset_input(split_dataset(dataset_url, split, name), context, split)


def _summary(inp) -> dict[str, str]:
    tags = {t.key: t.value for t in inp.tags}
    return {"name": inp.dataset.name, "digest": inp.dataset.digest, "context": tags.get("mlflow.data.context", ""),
            "split": tags.get(SPLIT_TAG, "")}


def log_split_datasets(log, dataset_url: str, splits: list[str], context: Optional[str] = None) -> list[dict[str, str]]:
    """Log the ``splits`` of the prepared dataset at ``dataset_url`` that it has (``val`` is
    optional) as inputs of ``log``'s run and of the parent run; ``context`` (default: per split,
    ``train`` -> ``training``, ``val`` -> ``validation``, ``test`` -> ``testing``). Returns what
    was logged (name, digest, context, split); nothing with tracking off."""
    log = _target(log)
    if log is None:
        return []
    info = load_info(dataset_url)
    inputs = [_split_input(dataset_url, split, info.name, context or SPLIT_CONTEXT.get(split, split),
                           _file_stamp(storage.join(dataset_url, f"{split}.npz")))
              for split in dict.fromkeys(splits) if split in info.splits]
    log.log_datasets(inputs)
    return [_summary(i) for i in inputs]


def synthetic_dataset(filtered_url: str, plan_url: Optional[str], generate_config: Optional[dict[str, Any]],
                      name: Optional[str] = None):
    """The MLflow dataset of the kept synthetic images, its source the plan and the generation config."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    data = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    plan_digest = (hashlib.sha256(storage.read_bytes(plan_url)).hexdigest()[:16]
                   if plan_url and storage.exists(plan_url) else "")
    config = json.loads(json.dumps(generate_config or {}, default=str))
    source = CodeDatasetSource({"mlflow.source.name": "feedback_synth: generate + filter_synthetic",
                                "uri": storage.join(filtered_url, "synthetic.npz"), "plan": plan_url,
                                "plan_digest": plan_digest, "generate_config": config})
    return _numpy_dataset(data, f"{short_name(name)}/{SYNTHETIC}" if name else SYNTHETIC, source)


def log_synthetic_dataset(log, filtered_url: str, plan_url: Optional[str], generate_config: Optional[dict[str, Any]],
                          context: str = "training", dataset_name: Optional[str] = None) -> list[dict[str, str]]:
    """Log the kept synthetic set ``<filtered_url>/synthetic.npz`` (named ``<dataset_name>/synthetic``,
    else ``synthetic``) with the plan at ``plan_url`` and ``generate_config`` as its source, as an
    input of ``log``'s run and of the parent run. Returns what was logged; nothing with tracking off."""
    log = _target(log)
    if log is None:
        return []
    inputs = [dataset_input(synthetic_dataset(filtered_url, plan_url, generate_config, dataset_name), context,
                            SYNTHETIC)]
    log.log_datasets(inputs)
    return [_summary(i) for i in inputs]


def logged_split(client, run_ids: list[str], split: str = "test"):
    """The ``mlflow.entities.Dataset`` logged as ``split`` on the first of ``run_ids`` that has one."""
    for run_id in run_ids:
        if not run_id:
            continue
        inputs = client.get_run(run_id).inputs
        for inp in (inputs.dataset_inputs if inputs else []) or []:
            if any(t.key == SPLIT_TAG and t.value == split for t in inp.tags):
                return inp.dataset
    return None
