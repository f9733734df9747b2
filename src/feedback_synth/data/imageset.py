"""Images with labels, and the prepared dataset folder that holds them.

A prepared dataset is a folder (any fsspec URL) holding one ``.npz`` per split (``train``,
``test``, optionally ``val`` and the generator ``pool``) and an ``info.json``. Every sample
carries a class label and a group label (0 with one group named "all" when there are none).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.errors import DataError

SPLITS = ("train", "val", "test", "pool", "oracle")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)`` with per-sample class and group labels."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    ids: np.ndarray  # where each sample came from (a file path or "digits:<index>")
    class_names: list[str]
    group_names: list[str] = field(default_factory=lambda: ["all"])

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.groups) == len(self.ids) == n):
            raise DataError("images, labels, groups and ids must have the same length")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.groups[index], self.ids[index],
                        list(self.class_names), list(self.group_names))

    def to_tensor(self):
        """Float tensor ``(N, C, H, W)`` in [0, 1]."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)

    def save(self, url: str) -> None:
        storage.write_npz(url, images=self.images, labels=self.labels.astype(np.int64),
                     groups=self.groups.astype(np.int64), ids=self.ids.astype(str),
                     class_names=np.array(self.class_names, dtype=str),
                     group_names=np.array(self.group_names, dtype=str))

    @classmethod
    def load(cls, url: str) -> "ImageSet":
        if not storage.exists(url):
            raise DataError(f"dataset split not found: {url}")
        d = storage.read_npz(url)
        return cls(d["images"], d["labels"], d["groups"], d["ids"], [str(c) for c in d["class_names"]],
                   [str(g) for g in d["group_names"]])

    @classmethod
    def concat(cls, sets: list["ImageSet"]) -> "ImageSet":
        first = sets[0]
        return cls(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]),
                   np.concatenate([s.groups for s in sets]), np.concatenate([s.ids for s in sets]),
                   list(first.class_names), list(first.group_names))


@dataclass
class DatasetInfo:
    name: str
    class_names: list[str]
    group_names: list[str]
    splits: list[str]
    train_class_counts: list[int]
    image_shape: list[int]  # H, W, C
    description: str = ""


def load_split(dataset_url: str, split: str) -> ImageSet:
    return ImageSet.load(storage.join(dataset_url, f"{split}.npz"))


def load_info(dataset_url: str) -> DatasetInfo:
    url = storage.join(dataset_url, "info.json")
    if not storage.exists(url):
        raise DataError(f"not a prepared dataset (no info.json): {dataset_url}")
    return DatasetInfo(**storage.read_json(url))


def shot_groups(train_counts: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Class indices per many / medium / few-shot bucket (thresholds from config)."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts >= cfg.many_threshold),
        "medium": np.flatnonzero((counts > cfg.few_threshold) & (counts < cfg.many_threshold)),
        "few": np.flatnonzero(counts <= cfg.few_threshold),
    }
