"""The pilot's folds: repeated splits of train + val, the test split never read.

Fold ``k`` pools the prepared dataset's train and val images and draws, in every (class, group)
cell, as many validation images as the prepared val split has in that cell; the rest is the
fold's train. Every fold keeps the prepared data's shape (the same counts per class and group),
so a setting is judged on data like the run's. Fold 0 is the prepared split itself.

A fold is a prepared dataset (``info.json``, ``train.npz``, ``val.npz``) whose ``test.npz`` is its
validation part: the stages that measure on ``test`` (training's metrics, retraining's
no-synthesis reference) then measure the fold's held-out images, and the real test split is never
read.
"""
from __future__ import annotations

import numpy as np

from feedback_synth import storage
from feedback_synth.data.imageset import DatasetInfo, ImageSet, load_info, load_split
from feedback_synth.errors import DataError


def fold_split(train: ImageSet, val: ImageSet, fold: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(train, val)`` of fold ``fold`` (0: the given split); per (class, group) cell the sizes of
    the given split, the images drawn from the pooled cell with ``(seed, fold)``."""
    if fold == 0:
        return train, val
    pool = ImageSet.concat([train, val])
    rng = np.random.default_rng([seed, fold])
    train_index, val_index = [], []
    for c in range(pool.num_classes):
        for g in range(pool.num_groups):
            cell = np.flatnonzero((pool.labels == c) & (pool.groups == g))
            n_val = int(((val.labels == c) & (val.groups == g)).sum())
            drawn = rng.permutation(cell)
            val_index.append(drawn[:n_val])
            train_index.append(drawn[n_val:])
    return pool.subset(np.sort(np.concatenate(train_index))), pool.subset(np.sort(np.concatenate(val_index)))


def write_fold(prepared_url: str, fold_url: str, fold: int, seed: int) -> DatasetInfo:
    """Write fold ``fold`` of the prepared dataset at ``prepared_url`` to ``fold_url`` (module
    docstring); ``info.json`` last, so a half-written fold is not a dataset."""
    info = load_info(prepared_url)
    if "val" not in info.splits:
        raise DataError(f"{prepared_url} has no validation split: the pilot's folds are drawn from train + val")
    train, val = fold_split(load_split(prepared_url, "train"), load_split(prepared_url, "val"), fold, seed)
    train.save(storage.join(fold_url, "train.npz"))
    val.save(storage.join(fold_url, "val.npz"))
    val.save(storage.join(fold_url, "test.npz"))  # the fold's held-out part: the real test split is never read
    fold_info = DatasetInfo(name=info.name, class_names=info.class_names, group_names=info.group_names,
                            splits=["train", "val", "test"], train_class_counts=train.class_counts().tolist(),
                            image_shape=info.image_shape,
                            description=f"pilot fold {fold} of train + val (seed {seed}); test = this fold's val")
    storage.write_json(storage.join(fold_url, "info.json"), fold_info.__dict__)
    return fold_info
