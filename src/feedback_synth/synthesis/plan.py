"""The generation plan: how many images per class (or (class, group) cell), cut into shards.

One-shot feedback (``feedback.rounds`` 1, the paper's): per cell the reference rule
n_gen(c) = ceil(max(target - n_real(c), 1) * budget_fraction), target = the largest cell count.

Feedback in rounds (``feedback.rounds`` R > 1, after the authors' follow-up, "deliberate
practice"): the one-shot total B is the budget of all rounds together, shared by
``feedback.round_split`` (``equal``: B/R each; ``front_loaded``: R, R-1, ..., 1 parts). Round r
spends its share B_r in proportion to a weight per cell:

    round 1:   w(c) = n_gen(c)                      (the reference rule, from the baseline)
    round r>1: w(c) = n_gen(c) * e(c)               e(c) = (errors(c) + 1) / (n_val(c) + 2)

where errors(c) / n_val(c) are the validation mistakes of the latest retrained model on cell c
(Laplace-smoothed, so that a cell with no validation image or no mistake keeps a small share).
Without a validation split every round uses the reference weights. Shares are rounded to whole
images by largest remainders. Image indices continue across rounds (a round's entries start where
the cell's earlier rounds stopped), so an image's seed never repeats.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

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
    counts: dict[str, int]  # "class" or "class/group" -> images to generate in this round
    shards: list[Shard] = field(default_factory=list)
    round: int = 1  # this plan's round (1-based) ...
    rounds: int = 1  # ... of this many
    weights: dict[str, float] = field(default_factory=dict)  # the round's weight per cell (see the module doc)
    # where each cell's image indices start ("class" or "class/group" -> index): after earlier rounds
    offsets: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def next_offsets(self) -> dict[str, int]:
        """Where the next round's image indices start, per cell."""
        return {key: self.offsets.get(key, 0) + n for key, n in self.counts.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationPlan":
        shards = [Shard(s["shard_id"], [PlanEntry(**e) for e in s["entries"]]) for s in d["shards"]]
        return cls(d["target"], d["budget_fraction"], d["per_group"], d["counts"], shards, d.get("round", 1),
                   d.get("rounds", 1), d.get("weights", {}), d.get("offsets", {}))

    def save(self, url: str) -> None:
        storage.write_json(url, self.to_dict())

    @classmethod
    def load(cls, url: str) -> "GenerationPlan":
        return cls.from_dict(storage.read_json(url))


def images_to_generate(n_real: int, target: int, budget_fraction: float) -> int:
    """Reference rule n_gen = max(target - n_real, 1), scaled by the budget (at least 1)."""
    return max(1, int(math.ceil(max(target - n_real, 1) * budget_fraction)))


@dataclass
class Cell:
    class_index: int
    group_index: int
    n_real: int
    key: str  # "class" or "class/group"


def plan_cells(train: ImageSet, per_group: bool) -> list[Cell]:
    """The plan's cells: classes, or (class, group) pairs, with their real training counts."""
    if per_group:
        return [Cell(c, g, int(((train.labels == c) & (train.groups == g)).sum()),
                     f"{train.class_names[c]}/{train.group_names[g]}")
                for c in range(train.num_classes) for g in range(train.num_groups)]
    return [Cell(c, 0, int(n), train.class_names[c]) for c, n in enumerate(train.class_counts())]


def round_budgets(total: int, rounds: int, split: str) -> list[int]:
    """The whole budget ``total`` shared by ``rounds`` rounds (whole images, summing to ``total``)."""
    parts = [1.0] * rounds if split == "equal" else [float(rounds - r) for r in range(rounds)]
    return allocate(total, parts)


def allocate(total: int, weights: list[float]) -> list[int]:
    """``total`` whole items in proportion to ``weights``, by largest remainders (ties: first)."""
    w = np.asarray(weights, np.float64)
    if total <= 0 or w.sum() <= 0:
        return [0] * len(w)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - out), kind="stable")[:total - int(out.sum())]:
        out[i] += 1
    return out.tolist()


def smoothed_errors(errors: dict[str, tuple[int, int]], keys: list[str]) -> dict[str, float]:
    """e(c) = (mistakes + 1) / (n + 2) per cell from ``{key: (mistakes, n)}`` (missing cells: 1/2)."""
    return {k: (errors.get(k, (0, 0))[0] + 1) / (errors.get(k, (0, 0))[1] + 2) for k in keys}


def make_plan(train: ImageSet, cfg: FeedbackConfig, round_index: int = 1,
              val_errors: Optional[dict[str, tuple[int, int]]] = None,
              offsets: Optional[dict[str, int]] = None) -> GenerationPlan:
    """The plan of one round (see the module docstring), split into shards of ``cfg.shard_size``.

    Args:
        train: the real training images.
        cfg: the feedback settings (target, budget, rounds, split, shard size).
        round_index: which round (1-based); with ``cfg.rounds`` 1 the plan is the reference rule's.
        val_errors: ``{cell key: (validation mistakes, validation images)}`` of the latest model
            (rounds after the first); None: the reference weights.
        offsets: where each cell's image indices start (after the earlier rounds).
    """
    if not 1 <= round_index <= cfg.rounds:
        raise ValueError(f"round {round_index} is not one of the {cfg.rounds} rounds")
    cells = plan_cells(train, cfg.per_group)
    target = cfg.target or max(c.n_real for c in cells)
    reference = {c.key: images_to_generate(c.n_real, target, cfg.budget_fraction) for c in cells}
    if cfg.rounds == 1:
        counts, weights = reference, {k: float(v) for k, v in reference.items()}
    else:
        budget = round_budgets(sum(reference.values()), cfg.rounds, cfg.round_split)[round_index - 1]
        steer = smoothed_errors(val_errors, list(reference)) if round_index > 1 and val_errors is not None else None
        weights = {k: float(n) * (steer[k] if steer else 1.0) for k, n in reference.items()}
        counts = dict(zip(weights, allocate(budget, list(weights.values()))))
    offsets = {c.key: int((offsets or {}).get(c.key, 0)) for c in cells}
    shards: list[Shard] = []
    current: list[PlanEntry] = []
    room = cfg.shard_size
    for cell in cells:
        start, end = offsets[cell.key], offsets[cell.key] + counts[cell.key]
        while start < end:
            take = min(room, end - start)
            current.append(PlanEntry(cell.class_index, cell.group_index, start, take))
            start += take
            room -= take
            if room == 0:
                shards.append(Shard(len(shards), current))
                current, room = [], cfg.shard_size
    if current:
        shards.append(Shard(len(shards), current))
    return GenerationPlan(target, cfg.budget_fraction, cfg.per_group, counts, shards, round_index, cfg.rounds,
                          weights, offsets)


def image_seed(run_seed: int, class_index: int, group_index: int, index: int) -> int:
    """Seeds derive from (run, class, group, index): a re-run reproduces the same images."""
    return int(np.random.SeedSequence([run_seed, class_index, group_index, index]).generate_state(1)[0])
