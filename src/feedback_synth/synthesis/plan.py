"""The generation plan: how many images per class (or group), cut into shards."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from feedback_synth import storage
from feedback_synth.config import FeedbackConfig
from feedback_synth.data.imageset import ImageSet


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
        storage.write_json(url, self.to_dict())

    @classmethod
    def load(cls, url: str) -> "GenerationPlan":
        return cls.from_dict(storage.read_json(url))


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
