"""The prepare-data stage's work: load a dataset (built-in or URL), check it, write its splits."""
from __future__ import annotations

import numpy as np

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.digits import make_digits_groups, make_digits_lt
from feedback_synth.data.imageset import DatasetInfo
from feedback_synth.data.sources import load_url_dataset
from feedback_synth.errors import DataError

BUILTIN = {"digits-lt": make_digits_lt, "digits-groups": make_digits_groups}


def prepare_dataset(cfg: DataConfig, output_url: str) -> DatasetInfo:
    """Load (built-in or URL) and check the dataset, then write it to ``output_url``.

    Every check runs before anything is written: a bad dataset leaves no output behind.
    """
    if cfg.dataset in BUILTIN:
        splits = BUILTIN[cfg.dataset](cfg.split_seed)
    elif "://" in cfg.dataset or "/" in cfg.dataset or storage.exists(cfg.dataset):
        splits = load_url_dataset(cfg.dataset, cfg)
    else:
        raise DataError(f"unknown dataset '{cfg.dataset}': not a built-in ({', '.join(BUILTIN)}) "
                        "and not a path or URL")
    train = splits["train"]
    empty = np.flatnonzero(train.class_counts() == 0)
    if len(empty):
        raise DataError(f"dataset {cfg.dataset}: empty class '{train.class_names[empty[0]]}' in the train split")
    for split, data in splits.items():
        data.save(storage.join(output_url, f"{split}.npz"))
    info = DatasetInfo(name=cfg.dataset, class_names=train.class_names, group_names=train.group_names,
                       splits=list(splits), train_class_counts=train.class_counts().tolist(),
                       image_shape=list(train.images.shape[1:]))
    storage.write_json(storage.join(output_url, "info.json"), info.__dict__)
    return info
