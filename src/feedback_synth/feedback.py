"""Feedback extraction: the frozen classifier's class statistics and the generation plan."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sklearn.covariance import LedoitWolf, ShrunkCovariance

from . import io
from .classifier import Classifier
from .config import FeedbackConfig
from .criteria import ClassStats
from .data import ImageSet


@torch.no_grad()
def extract_features(clf: Classifier, data: ImageSet, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Penultimate features of ``data`` (the embedding of ``hardness`` and the filters)."""
    clf.eval()
    x = data.to_tensor()
    out = [clf.features_and_logits(x[i:i + batch_size].to(device))[0].float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 1))


def fit_class_stats(feats: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = -1.0,
                    reference: tuple[np.ndarray, np.ndarray] | None = None) -> ClassStats:
    """Per-class means and a shared covariance with shrinkage (Ledoit-Wolf unless given).

    The covariance is fitted on class-centred features, so it is shared by all classes.
    ``real_distances`` (the yardstick of the ``off_support`` filter) are measured on ``reference``
    (features, labels) of held-out real images when given: the classifier has memorised its own
    training images, whose distances are several times smaller than those of unseen real images.
    """
    means = np.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    centred = feats - means[labels]
    est = LedoitWolf(assume_centered=True) if shrinkage < 0 else ShrunkCovariance(shrinkage=shrinkage, assume_centered=True)
    est.fit(centred)
    used = float(est.shrinkage_) if shrinkage < 0 else float(shrinkage)
    precision = torch.from_numpy(est.precision_).float()
    stats = ClassStats(torch.from_numpy(means).float(), precision, used, {})
    ref_feats, ref_labels = reference if reference is not None else (feats, labels)
    d = stats.mahalanobis_sq(torch.from_numpy(ref_feats).float(), torch.from_numpy(ref_labels)).numpy()
    stats.real_distances = {c: np.sort(d[ref_labels == c]) for c in range(num_classes)}
    return stats


def save_class_stats(stats: ClassStats, url: str) -> None:
    io.write_bytes(io.join(url, "class_stats.safetensors"), st_save({"means": stats.means.contiguous(),
                                                                      "precision": stats.precision.contiguous()}))
    io.write_json(io.join(url, "class_stats.json"), {"shrinkage": stats.shrinkage,
                                                      "real_distances": {str(c): v.tolist() for c, v in stats.real_distances.items()}})


def load_class_stats(url: str) -> ClassStats:
    tensors = st_load(io.read_bytes(io.join(url, "class_stats.safetensors")))
    meta = io.read_json(io.join(url, "class_stats.json"))
    return ClassStats(tensors["means"], tensors["precision"], meta["shrinkage"],
                      {int(c): np.array(v) for c, v in meta["real_distances"].items()})


# ------------------------------------------------------------------------------ the plan


@dataclass
class PlanEntry:
    """``count`` images of (class, group), image indices ``start .. start + count - 1``."""

    class_index: int
    group_index: int
    start: int
    count: int


@dataclass
class Shard:
    shard_id: int
    entries: list[PlanEntry]

    @property
    def num_images(self) -> int:
        return sum(e.count for e in self.entries)


@dataclass
class GenerationPlan:
    target: int
    budget_fraction: float
    per_group: bool
    counts: dict[str, int]  # "class" or "class/group" -> images to generate
    shards: list[Shard] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationPlan":
        shards = [Shard(s["shard_id"], [PlanEntry(**e) for e in s["entries"]]) for s in d["shards"]]
        return cls(d["target"], d["budget_fraction"], d["per_group"], d["counts"], shards)

    def save(self, url: str) -> None:
        io.write_json(url, self.to_dict())

    @classmethod
    def load(cls, url: str) -> "GenerationPlan":
        return cls.from_dict(io.read_json(url))


def images_to_generate(n_real: int, target: int, budget_fraction: float) -> int:
    """Reference rule n_gen = max(target - n_real, 1), scaled by the budget (at least 1)."""
    return max(1, int(math.ceil(max(target - n_real, 1) * budget_fraction)))


def make_plan(train: ImageSet, cfg: FeedbackConfig) -> GenerationPlan:
    """Per class (or per (class, group)), how many images, split into shards of ``cfg.shard_size``."""
    cells: list[tuple[int, int, int]] = []  # (class, group, n_real)
    if cfg.per_group:
        for c in range(train.num_classes):
            for g in range(train.num_groups):
                cells.append((c, g, int(((train.labels == c) & (train.groups == g)).sum())))
    else:
        cells = [(c, 0, int(n)) for c, n in enumerate(train.class_counts())]
    target = cfg.target or max(n for _, _, n in cells)
    counts, flat = {}, []
    for c, g, n in cells:
        k = images_to_generate(n, target, cfg.budget_fraction)
        key = f"{train.class_names[c]}/{train.group_names[g]}" if cfg.per_group else train.class_names[c]
        counts[key] = k
        flat.append((c, g, k))
    shards: list[Shard] = []
    current: list[PlanEntry] = []
    room = cfg.shard_size
    for c, g, k in flat:
        start = 0
        while start < k:
            take = min(room, k - start)
            current.append(PlanEntry(c, g, start, take))
            start += take
            room -= take
            if room == 0:
                shards.append(Shard(len(shards), current))
                current, room = [], cfg.shard_size
    if current:
        shards.append(Shard(len(shards), current))
    return GenerationPlan(target, cfg.budget_fraction, cfg.per_group, counts, shards)


def image_seed(run_seed: int, class_index: int, group_index: int, index: int) -> int:
    """Seeds derive from (run, class, group, index): a re-run reproduces the same images."""
    return int(np.random.SeedSequence([run_seed, class_index, group_index, index]).generate_state(1)[0])
