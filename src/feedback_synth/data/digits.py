"""The built-in datasets: long-tailed digits (digits-lt), the same in a style far from the
generator's pool (digits-gap), and group-imbalanced digits (digits-groups); and a benchmark-only
variant, digits-rare (digits-gap whose few-shot classes are drawn in a style of their own)."""
from __future__ import annotations

import math

import numpy as np

from feedback_synth.data.imageset import ImageSet

DIGITS_TEST_PER_CLASS = 50
DIGITS_POOL_PER_CLASS = 60
# validation: up to 30 per class from what is left after test, pool and train (class 0, whose 60
# train images leave 8, has 8): big enough to tell tuning settings apart on the few-shot classes
DIGITS_VAL_PER_CLASS = 30
# The generator pool is drawn with this seed whatever data.split_seed is: the bundled generator
# was pretrained on it, so it must never overlap another split's train, val or test images.
POOL_SEED = 0


def digits_lt_counts(num_classes: int = 10, n_max: int = 60, ratio: float = 1 / 30) -> list[int]:
    """n(c) = floor(n_max * ratio^(c / (C - 1))): 60, 41, 28, 19, 13, 9, 6, 4, 2, 2."""
    # round before floor so that 60 * (1/30)^1 = 1.9999999 is not floored to 1
    return [int(math.floor(round(n_max * ratio ** (c / (num_classes - 1)), 9))) for c in range(num_classes)]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [0, 1] -> uint8, the same bytes on every machine.

    The styles' bilinear weights (multiples of 0.025) put many pixels exactly half-way between two
    levels, where the last bit of a float sum decides the rounding, and that bit depends on the
    CPU's vector kernels: the built-in data differed between machines, so the shipped oracle did not
    serve and seeded benchmarks did not repeat. The transforms run in float64 and the value is
    rounded to 6 decimals first, which returns every such pixel to its exact half; then half to even.
    """
    return np.round(np.round(np.asarray(x, np.float64) * 255, 6)).astype(np.uint8)


def task_style(images: np.ndarray) -> np.ndarray:
    """The built-in task's fixed style, which the generator pool lacks (docs/method.md: the domain gap).

    Exact transform (our choice) on float images in [0, 1], shape (N, H, W):
      1. thicker strokes: x <- max(x, 0.8 * maxpool_3x3(x)) (a soft grey dilation);
      2. italic shear: x'(u, v) = x(u + 0.35 * v_c, v) where v_c is the row's offset from the
         centre (top rows move right, bottom rows left), bilinear, zero padding.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).double().unsqueeze(1)
    x = torch.maximum(x, 0.8 * F.max_pool2d(x, 3, stride=1, padding=1))
    n = x.shape[0]
    theta = torch.tensor([[1.0, 0.35, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x.squeeze(1).clamp(0, 1).numpy()


def gap_style(images: np.ndarray) -> np.ndarray:
    """digits-gap's task style: far from the generator pool's, as a second source of digits would be
    (docs/method.md: Adapting the generator to the task). On float images in [0, 1], (N, H, W):
      1. hard contrast: x <- clip((x - 0.3) / 0.25, 0, 1) (crisp strokes on a clean background, where
         the pool's upsampled digits are soft and grey);
      2. thin strokes: x <- x - 0.6 * (maxpool_3x3(x) - x) clipped (an outline-thinning pass);
      3. a smaller glyph with wide margins and the opposite slant: the inverse map
         x'(u, v) = x((u - 0.3 * v) / 0.62, v / 0.62) about the centre (scale 0.62, backslant),
         bilinear, zero padding;
      4. inverted contrast: dark ink on a light page, x <- 1 - x (the pool has light strokes on black).
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).double().unsqueeze(1)
    x = ((x - 0.3) / 0.25).clamp(0, 1)
    x = (x - 0.6 * (F.max_pool2d(x, 3, stride=1, padding=1) - x)).clamp(0, 1)
    n = x.shape[0]
    theta = torch.tensor([[1 / 0.62, -0.3 / 0.62, 0.0], [0.0, 1 / 0.62, 0.0]], dtype=torch.float64).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return 1.0 - x.squeeze(1).clamp(0, 1).numpy()


def _upsample_digits(images_8x8: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images_8x8 / 16.0).double().unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x.squeeze(1).clamp(0, 1).numpy()


def _pool_and_rest(labels: np.ndarray, n_test: int, n_pool: int, split_seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class: (its generator pool, the rest in split order).

    The pool is fixed by ``POOL_SEED`` (positions ``n_test .. n_test + n_pool`` of the seed-0
    permutation, as the original split placed it); the rest is shuffled by ``split_seed``
    (``split_seed`` 0 keeps the seed-0 order, so the seed-0 split is unchanged).
    """
    rng = np.random.RandomState(POOL_SEED)
    out = []
    for c in range(int(labels.max()) + 1):
        perm = rng.permutation(np.flatnonzero(labels == c))
        rest = np.concatenate([perm[:n_test], perm[n_test + n_pool:]])
        if split_seed != POOL_SEED:
            rest = np.random.RandomState([split_seed, c]).permutation(rest)
        out.append((perm[n_test:n_test + n_pool], rest))
    return out


def make_digits_gap(split_seed: int = 0) -> dict[str, ImageSet]:
    """digits-lt's splits, counts and generator pool, with the task images drawn in ``gap_style``:
    crisp, thin, small, back-slanted digits that the bundled generator (soft, large, upright digits)
    has never seen. The benchmark of adapting the generator (benchmarks/digits_gap.py)."""
    return make_digits_lt(split_seed, style=gap_style)


RARE_MAX_IMAGES = 5  # digits-rare: classes with at most this many train images (4, 2, 2) get their own style


def make_digits_rare(split_seed: int = 0) -> dict[str, ImageSet]:
    """Benchmark-only (benchmarks/copies.py; not a ``data.dataset`` name): digits-gap, except that
    its few-shot classes (at most ``RARE_MAX_IMAGES`` train images: 7, 8, 9 with 4, 2, 2) are drawn
    in a style of their own, in every split: digits-lt's ``task_style`` (thick, italic, light ink
    on black), which neither the generator's pool nor any other class of the task has. Adapting
    the generator with the class condition kept can learn that style only from those 2-4 images:
    the case where adaptation copies the rarest classes (docs/method.md: Copies)."""
    counts = digits_lt_counts()
    rare = {c for c, n in enumerate(counts) if n <= RARE_MAX_IMAGES}
    own = make_digits_lt(split_seed, style=task_style)
    out = make_digits_gap(split_seed)
    for split, data in out.items():
        if split == "pool":
            continue
        mine = np.isin(data.labels, sorted(rare))
        data.images[mine] = own[split].images[np.isin(own[split].labels, sorted(rare))]
    return out


def make_digits_lt(split_seed: int = 0, style=task_style) -> dict[str, ImageSet]:
    """The built-in long-tailed digits dataset (docs/method.md: Datasets).

    scikit-learn's 1,797 8x8 digits, upsampled to 16x16. Per class: a balanced generator pool
    (60/class, the same for every ``split_seed``: the bundled generator's pretraining data), then,
    from the rest, shuffled by ``split_seed``, a balanced test set (50/class), a long-tailed train
    set (60, 41, ..., 2) and a validation set (up to 30/class). Train, val and test carry the task
    style; the pool does not. ``oracle`` is the pool with the task style: balanced real task data
    for the oracle that measures fidelity (never for training the classifier under test).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _upsample_digits(digits.images)
    labels = digits.target.astype(np.int64)
    counts = digits_lt_counts()
    parts: dict[str, list[np.ndarray]] = {s: [] for s in ("train", "val", "test", "pool")}
    for c, (pool, rest) in enumerate(_pool_and_rest(labels, DIGITS_TEST_PER_CLASS, DIGITS_POOL_PER_CLASS, split_seed)):
        t, n = DIGITS_TEST_PER_CLASS, counts[c]
        parts["pool"].append(pool)
        parts["test"].append(rest[:t])
        parts["train"].append(rest[t:t + n])
        parts["val"].append(rest[t + n:t + n + DIGITS_VAL_PER_CLASS])
    class_names = [str(c) for c in range(10)]
    out = {}
    for split, chunks in parts.items():
        idx = np.concatenate(chunks)
        x = images[idx]
        if split != "pool":
            x = style(x)
        out[split] = ImageSet(
            images=to_uint8(x)[..., None],
            labels=labels[idx], groups=np.zeros(len(idx), dtype=np.int64),
            ids=np.array([f"digits:{i}" for i in idx]), class_names=class_names)
    pool = out["pool"]
    styled = to_uint8(style(pool.images[..., 0] / 255.0))[..., None]
    out["oracle"] = ImageSet(styled, pool.labels, pool.groups, pool.ids, class_names)
    return out


GROUP_COLOURS = {"red": (1.0, 0.25, 0.2), "green": (0.25, 1.0, 0.3), "blue": (0.3, 0.45, 1.0)}

GROUPS_TEST_PER_CELL = 16  # test: 16 per (class, colour) = 48 per class, balanced


GROUPS_POOL_PER_CELL = 20  # generator pool: 20 per (class, colour), balanced, unstyled

GROUPS_VAL_PER_CELL = 6  # validation: 6 per (class, colour), balanced (what the smallest class has left)


GROUPS_TRAIN_MAJORITY = 36  # train: per class 36 in its majority colour ...

GROUPS_TRAIN_MINORITY = 2  # ... and 2 in each of the two rare colours


def colourise(grey: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Grey images in [0, 1] (N, H, W) -> RGB (N, H, W, 3): strokes in the group's colour on black."""
    colours = np.array(list(GROUP_COLOURS.values()))[groups]  # (N, 3)
    return grey[..., None] * colours[:, None, None, :]


def make_digits_groups(split_seed: int = 0) -> dict[str, ImageSet]:
    """The built-in group-imbalanced digits (NICO++ in miniature): the group is the stroke colour.

    scikit-learn's digits, 16x16. Per class, the generator pool (20 per (class, colour)) is the same
    for every ``split_seed``; the rest is shuffled by ``split_seed``. Train: each class c has a
    majority colour (colour c mod 3: 36 images) and two rare colours (2 images each), so colour is
    a spurious cue of the class. Test (16 per (class, colour)), validation (6 per cell) and the
    generator pool (20 per cell) are balanced over (class, colour). As in digits-lt, train, val and
    test carry the task style (shear, thicker strokes); the pool does not. ``oracle`` is the pool
    with the task style: group-balanced real task data.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _upsample_digits(digits.images)
    labels = digits.target.astype(np.int64)
    names = list(GROUP_COLOURS)
    parts: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test", "pool")}
    n_test, n_pool = 3 * GROUPS_TEST_PER_CELL, 3 * GROUPS_POOL_PER_CELL
    for c, (pool, rest) in enumerate(_pool_and_rest(labels, n_test, n_pool, split_seed)):
        major = c % 3
        sizes = {"test": [GROUPS_TEST_PER_CELL] * 3,
                 "train": [GROUPS_TRAIN_MAJORITY if g == major else GROUPS_TRAIN_MINORITY for g in range(3)],
                 "val": [GROUPS_VAL_PER_CELL] * 3}
        for g in range(3):  # the pool: 20 per colour, in the order the original split drew them
            parts["pool"][0].extend(pool[g * GROUPS_POOL_PER_CELL:(g + 1) * GROUPS_POOL_PER_CELL])
            parts["pool"][1].extend([g] * GROUPS_POOL_PER_CELL)
        idx = list(rest)
        for split in ("test", "train", "val"):
            for g, n in enumerate(sizes[split]):
                parts[split][0].extend(idx[:n])
                parts[split][1].extend([g] * n)
                idx = idx[n:]
    out = {}
    for split, (idx, groups) in parts.items():
        idx, groups = np.array(idx), np.array(groups)
        x = images[idx]
        if split != "pool":
            x = task_style(x)
        out[split] = ImageSet(to_uint8(colourise(x, groups)), labels[idx], groups,
                              np.array([f"digits:{i}" for i in idx]), [str(c) for c in range(10)], names)
    pool = out["pool"]
    grey = images[np.array([int(i.split(":")[1]) for i in pool.ids])]
    out["oracle"] = ImageSet(to_uint8(colourise(task_style(grey), pool.groups)), pool.labels,
                             pool.groups, pool.ids, pool.class_names, names)
    return out
