"""The prepare-data stage's work: load a dataset (built-in or URL), check it, write its splits.

:func:`scan_dataset` is the same load without the images, for the pre-flight check.
"""
from __future__ import annotations

import logging

import numpy as np

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.digits import make_digits_gap, make_digits_groups, make_digits_lt
from feedback_synth.data.imageset import DatasetInfo, ImageSet
from feedback_synth.data.sources import (
    REACH_TIMEOUT_S,
    check_classes,
    check_scan,
    inspect_images,
    load_url_dataset,
    scan_url,
)
from feedback_synth.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN = {"digits-lt": make_digits_lt, "digits-gap": make_digits_gap, "digits-groups": make_digits_groups}


def _is_url(dataset: str) -> bool:
    """True for a dataset URL or path, False for a built-in name; an unknown name is a DataError."""
    if dataset in BUILTIN:
        return False
    if "://" in dataset or "/" in dataset or storage.exists(dataset):
        return True
    raise DataError(f"unknown dataset '{dataset}': not a built-in ({', '.join(BUILTIN)}) and not a path or URL")


def scan_dataset(url: str, cfg: DataConfig, timeout_s: float = REACH_TIMEOUT_S, images: bool = False) -> dict:
    """Check a dataset's structure (and, with ``images``, its images), for the pre-flight check.

    Runs the layout scan and every check that needs no pixels (a missing test split, unknown
    labels, empty classes, fewer than 2 classes, paths leaving the dataset root, unreadable split
    or metadata files, an unreachable store) and raises the same DataError that
    :func:`prepare_dataset` would. With ``images``, it also opens and decodes every image of a
    dataset URL (``sources.inspect_images``: a missing, corrupt, truncated or oversized image, or a
    broken compressed stream, is refused) and decides the channels as prepare will. A built-in
    dataset is simply built (it takes a second).

    Args:
        url: a built-in name or a dataset URL (usually ``cfg.dataset``).
        cfg: the data config (split seed; channels and image size with ``images``).
        timeout_s: how long the first request to a dataset URL may take.
        images: open every image and decide the channels (reads every file once).

    Returns:
        ``{"dataset", "layout", "splits", "num_classes", "class_names", "images": {split: count}, "groups"}``, plus
        ``"channels"`` and ``"image_size"`` for a built-in dataset or with ``images``.
    """
    if _is_url(url):
        checked = check_scan(scan_url(url, cfg, timeout_s))
        return {**checked.summary(), **(inspect_images(checked, cfg) if images else {})}
    splits = BUILTIN[url](cfg.split_seed)
    train = splits["train"]
    return {"dataset": url, "layout": "built-in", "splits": list(splits), "num_classes": train.num_classes,
            "class_names": list(train.class_names), "images": {s: len(d) for s, d in splits.items()},
            "groups": list(train.group_names),
            "channels": int(train.images.shape[3]), "image_size": int(train.images.shape[1])}


def prepare_dataset(cfg: DataConfig, output_url: str) -> DatasetInfo:
    """Load (built-in or URL) and check the dataset, then write it to ``output_url``.

    Every check runs before anything is written: a bad dataset leaves no output behind.
    """
    if _is_url(cfg.dataset):
        splits = load_url_dataset(cfg.dataset, cfg)
    else:
        splits = BUILTIN[cfg.dataset](cfg.split_seed)
    train: ImageSet = splits["train"]
    check_classes(cfg.dataset, train.class_names, train.class_counts(), "the train split")
    _warn_missing_test_classes(cfg.dataset, splits["test"])
    for split, data in splits.items():
        data.save(storage.join(output_url, f"{split}.npz"))
    info = DatasetInfo(name=cfg.dataset, class_names=train.class_names, group_names=train.group_names,
                       splits=list(splits), train_class_counts=train.class_counts().tolist(),
                       image_shape=list(train.images.shape[1:]))
    storage.write_json(storage.join(output_url, "info.json"), info.__dict__)
    return info


def _warn_missing_test_classes(dataset: str, test: ImageSet) -> None:
    """One warning when the test split lacks a class: its accuracy cannot be measured."""
    missing = [test.class_names[c] for c in np.flatnonzero(test.class_counts() == 0)]
    if missing:
        shown = ", ".join(f"'{c}'" for c in missing[:20]) + (", ..." if len(missing) > 20 else "")
        logger.warning("dataset %s: the test split has no images of %d class%s (%s); their accuracy is not "
                       "measured (worst_class and the shot groups leave them out)", dataset, len(missing),
                       "" if len(missing) == 1 else "es", shown)
