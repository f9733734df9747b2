"""Datasets: the built-in ``digits-lt`` and image datasets from any fsspec URL.

A prepared dataset is a folder (any fsspec URL) holding one ``.npz`` per split (``train``,
``test``, optionally ``val`` and the generator ``pool``) and an ``info.json``. Every sample
carries a class label and a group label (0 with one group named "all" when there are none).
"""
from __future__ import annotations

import io as _io
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import io
from .config import DataConfig
from .errors import DataError

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
        io.write_npz(url, images=self.images, labels=self.labels.astype(np.int64),
                     groups=self.groups.astype(np.int64), ids=self.ids.astype(str),
                     class_names=np.array(self.class_names, dtype=str),
                     group_names=np.array(self.group_names, dtype=str))

    @classmethod
    def load(cls, url: str) -> "ImageSet":
        if not io.exists(url):
            raise DataError(f"dataset split not found: {url}")
        d = io.read_npz(url)
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
    return ImageSet.load(io.join(dataset_url, f"{split}.npz"))


def load_info(dataset_url: str) -> DatasetInfo:
    url = io.join(dataset_url, "info.json")
    if not io.exists(url):
        raise DataError(f"not a prepared dataset (no info.json): {dataset_url}")
    return DatasetInfo(**io.read_json(url))


def shot_groups(train_counts: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Class indices per many / medium / few-shot bucket (thresholds from config)."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts >= cfg.many_threshold),
        "medium": np.flatnonzero((counts > cfg.few_threshold) & (counts < cfg.many_threshold)),
        "few": np.flatnonzero(counts <= cfg.few_threshold),
    }


# ------------------------------------------------------------------------------ digits-lt

DIGITS_TEST_PER_CLASS = 50
DIGITS_POOL_PER_CLASS = 60
DIGITS_VAL_PER_CLASS = 8  # what is left of the smallest class after test, pool and train


def digits_lt_counts(num_classes: int = 10, n_max: int = 60, ratio: float = 1 / 30) -> list[int]:
    """n(c) = floor(n_max * ratio^(c / (C - 1))): 60, 41, 28, 19, 13, 9, 6, 4, 2, 2."""
    # round before floor so that 60 * (1/30)^1 = 1.9999999 is not floored to 1
    return [int(math.floor(round(n_max * ratio ** (c / (num_classes - 1)), 9))) for c in range(num_classes)]


def task_style(images: np.ndarray) -> np.ndarray:
    """The built-in task's fixed style, which the generator pool lacks (DESIGN: the domain gap).

    Exact transform (our choice) on float images in [0, 1], shape (N, H, W):
      1. thicker strokes: x <- max(x, 0.8 * maxpool_3x3(x)) (a soft grey dilation);
      2. italic shear: x'(u, v) = x(u + 0.35 * v_c, v) where v_c is the row's offset from the
         centre (top rows move right, bottom rows left), bilinear, zero padding.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float().unsqueeze(1)
    x = torch.maximum(x, 0.8 * F.max_pool2d(x, 3, stride=1, padding=1))
    n = x.shape[0]
    theta = torch.tensor([[1.0, 0.35, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x.squeeze(1).clamp(0, 1).numpy()


def _upsample_digits(images_8x8: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images_8x8 / 16.0).float().unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x.squeeze(1).clamp(0, 1).numpy()


def make_digits_lt(split_seed: int = 0) -> dict[str, ImageSet]:
    """The built-in long-tailed digits dataset (DESIGN: Datasets).

    scikit-learn's 1,797 8x8 digits, upsampled to 16x16, split once per class with ``split_seed``
    into a balanced test set (50/class), a disjoint balanced generator pool (60/class), a
    long-tailed train set (60, 41, ..., 2) and a balanced validation set (8/class) from the rest.
    Train, val and test carry the task style; the pool does not. ``oracle`` is the pool with the
    task style: balanced real task data for the oracle that measures fidelity (never for training
    the classifier under test).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _upsample_digits(digits.images)
    labels = digits.target.astype(np.int64)
    rng = np.random.RandomState(split_seed)
    counts = digits_lt_counts()
    parts: dict[str, list[np.ndarray]] = {s: [] for s in ("train", "val", "test", "pool")}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        t, p, n = DIGITS_TEST_PER_CLASS, DIGITS_POOL_PER_CLASS, counts[c]
        parts["test"].append(idx[:t])
        parts["pool"].append(idx[t:t + p])
        parts["train"].append(idx[t + p:t + p + n])
        parts["val"].append(idx[t + p + n:t + p + n + DIGITS_VAL_PER_CLASS])
    class_names = [str(c) for c in range(10)]
    out = {}
    for split, chunks in parts.items():
        idx = np.concatenate(chunks)
        x = images[idx]
        if split != "pool":
            x = task_style(x)
        out[split] = ImageSet(
            images=np.round(x * 255).astype(np.uint8)[..., None],
            labels=labels[idx], groups=np.zeros(len(idx), dtype=np.int64),
            ids=np.array([f"digits:{i}" for i in idx]), class_names=class_names)
    pool = out["pool"]
    styled = np.round(task_style(pool.images[..., 0] / 255.0) * 255).astype(np.uint8)[..., None]
    out["oracle"] = ImageSet(styled, pool.labels, pool.groups, pool.ids, class_names)
    return out


# ------------------------------------------------------------------------------ digits-groups

GROUP_COLOURS = {"red": (1.0, 0.25, 0.2), "green": (0.25, 1.0, 0.3), "blue": (0.3, 0.45, 1.0)}
GROUPS_TEST_PER_CELL = 16  # test: 16 per (class, colour) = 48 per class, balanced
GROUPS_POOL_PER_CELL = 20  # generator pool: 20 per (class, colour), balanced, unstyled
GROUPS_VAL_PER_CELL = 4  # validation: 4 per (class, colour), balanced
GROUPS_TRAIN_MAJORITY = 36  # train: per class 36 in its majority colour ...
GROUPS_TRAIN_MINORITY = 2  # ... and 2 in each of the two rare colours


def colourise(grey: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Grey images in [0, 1] (N, H, W) -> RGB (N, H, W, 3): strokes in the group's colour on black."""
    colours = np.array(list(GROUP_COLOURS.values()))[groups]  # (N, 3)
    return grey[..., None] * colours[:, None, None, :]


def make_digits_groups(split_seed: int = 0) -> dict[str, ImageSet]:
    """The built-in group-imbalanced digits (NICO++ in miniature): the group is the stroke colour.

    scikit-learn's digits, 16x16, split per class with ``split_seed``. Train: each class c has a
    majority colour (colour c mod 3: 36 images) and two rare colours (2 images each), so colour is
    a spurious cue of the class. Test (16 per (class, colour)), validation (4 per cell) and the
    generator pool (20 per cell) are balanced over (class, colour). As in digits-lt, train, val and
    test carry the task style (shear, thicker strokes); the pool does not. ``oracle`` is the pool
    with the task style: group-balanced real task data.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _upsample_digits(digits.images)
    labels = digits.target.astype(np.int64)
    rng = np.random.RandomState(split_seed)
    names = list(GROUP_COLOURS)
    parts: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test", "pool")}
    for c in range(10):
        idx = list(rng.permutation(np.flatnonzero(labels == c)))
        major = c % 3
        sizes = {"test": [GROUPS_TEST_PER_CELL] * 3, "pool": [GROUPS_POOL_PER_CELL] * 3,
                 "train": [GROUPS_TRAIN_MAJORITY if g == major else GROUPS_TRAIN_MINORITY for g in range(3)],
                 "val": [GROUPS_VAL_PER_CELL] * 3}
        for split in ("test", "pool", "train", "val"):
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
        out[split] = ImageSet(np.round(colourise(x, groups) * 255).astype(np.uint8), labels[idx], groups,
                              np.array([f"digits:{i}" for i in idx]), [str(c) for c in range(10)], names)
    pool = out["pool"]
    grey = images[np.array([int(i.split(":")[1]) for i in pool.ids])]
    out["oracle"] = ImageSet(np.round(colourise(task_style(grey), pool.groups) * 255).astype(np.uint8), pool.labels,
                             pool.groups, pool.ids, pool.class_names, names)
    return out


# ------------------------------------------------------------------------------ URL datasets


def _decode_image(data: bytes, where: str, size: int, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_io.BytesIO(data)) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"corrupt or unreadable image: {where} ({exc})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _read_images(urls: list[str], size: int, channels: int) -> np.ndarray:
    from tqdm.auto import tqdm

    out = []
    for url in tqdm(urls, desc="reading images", unit="img", leave=False, disable=len(urls) < 200):
        try:
            data = io.read_bytes(url)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"image not found or unreadable: {url} ({exc})") from None
        out.append(_decode_image(data, url, size, channels))
    return np.stack(out) if out else np.zeros((0, size, size, channels), np.uint8)


def _guess_channels(url: str) -> int:
    from PIL import Image

    with Image.open(_io.BytesIO(io.read_bytes(url))) as img:
        return 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3


def _scan_folder_split(root: str, split: str) -> tuple[list[str], list[str]]:
    """``root/split/<class>/<image>`` -> (file URLs, class names)."""
    fs, path = io.fs_and_path(root)
    split_path = f"{path.rstrip('/')}/{split}"
    files, classes = [], []
    for entry in sorted(fs.ls(split_path, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        cls = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        images = sorted(f for f in fs.find(entry["name"]) if f.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise DataError(f"empty class '{cls}': no images in {io.join(root, split, cls)}")
        for f in images:
            files.append(fs.unstrip_protocol(f))
            classes.append(cls)
    return files, classes


def _parse_split_file(root: str, split: str) -> tuple[list[str], list[int], list[str]]:
    """ImageNet-LT style ``relative/path label [group]`` lines -> (URLs, labels, groups)."""
    url = io.join(root, f"{split}.txt")
    files, labels, groups = [], [], []
    for lineno, line in enumerate(io.read_text(url).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            raise DataError(f"{url}:{lineno}: expected 'relative/path label [group]', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{url}:{lineno}: label '{parts[1]}' is not an integer") from None
        files.append(io.join(root, parts[0]))
        labels.append(label)
        groups.append(parts[2] if len(parts) == 3 else "all")
    return files, labels, groups


def load_url_dataset(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    """Read a dataset from any fsspec URL, checking everything before returning.

    Layouts:
      - ``url/{train,test[,val]}/<class>/<image>`` (class folders);
      - split files ``url/{train,test[,val]}.txt`` with ``relative/path label [group]`` lines
        (ImageNet-LT style) and an optional ``url/classes.txt`` (line i = the name of label i);
      - ``url/metadata.csv`` with path, label, group and split columns (the SubpopBench layout of
        NICO++, Waterbirds, CelebA: ``filename,y,a,split`` with split 0/1/2, or
        ``path,label,group,split`` with split train/val/test);
      - NICO++'s own ``url/<domain>/<class>/<image>`` folders: the domain is the group, and the
        split is drawn once per (class, domain) cell with ``cfg.split_seed`` (20% test, 10% val).
    """
    if not io.exists(url):
        raise DataError(f"dataset not found: {url}")
    if io.exists(io.join(url, "train.txt")):
        return _load_split_files(url, cfg)
    if io.exists(io.join(url, "metadata.csv")):
        return _load_metadata_csv(url, cfg)
    if io.exists(io.join(url, "train")):
        return _load_class_folders(url, cfg)
    fs, path = io.fs_and_path(url)
    if any(e["type"] == "directory" for e in fs.ls(path, detail=True)):
        return _load_domain_folders(url, cfg)
    raise DataError(f"dataset {url}: expected class folders under {io.join(url, 'train')}/, a split file "
                    f"{io.join(url, 'train.txt')}, a {io.join(url, 'metadata.csv')} or <domain>/<class>/ folders")


def _splits_present(url: str, suffix: str) -> list[str]:
    present = [s for s in ("train", "val", "test") if io.exists(io.join(url, f"{s}{suffix}"))]
    if "test" not in present:
        raise DataError(f"dataset {url}: no test split ({io.join(url, 'test' + suffix)})")
    return present


def _load_class_folders(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    scanned = {s: _scan_folder_split(url, s) for s in _splits_present(url, "")}
    class_names = sorted(set(scanned["train"][1]))
    if not class_names:
        raise DataError(f"dataset {url}: no class folders in {io.join(url, 'train')}/")
    index = {c: i for i, c in enumerate(class_names)}
    channels = cfg.channels or _guess_channels(scanned["train"][0][0])
    out = {}
    for split, (files, classes) in scanned.items():
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise DataError(f"dataset {url}: class '{unknown[0]}' in split '{split}' is not in the "
                            f"class list of the train split ({', '.join(class_names)})")
        labels = np.array([index[c] for c in classes], dtype=np.int64)
        out[split] = ImageSet(_read_images(files, cfg.image_size, channels), labels,
                              np.zeros(len(files), np.int64), np.array(files), class_names)
    return out


def _load_split_files(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    parsed = {s: _parse_split_file(url, s) for s in _splits_present(url, ".txt")}
    classes_url = io.join(url, "classes.txt")
    if io.exists(classes_url):
        class_names = [c.strip() for c in io.read_text(classes_url).splitlines() if c.strip()]
    else:
        class_names = [str(c) for c in range(max(parsed["train"][1], default=-1) + 1)]
    group_names = sorted({g for _, _, groups in parsed.values() for g in groups})
    gindex = {g: i for i, g in enumerate(group_names)}
    out = {}
    for split, (files, labels, groups) in parsed.items():
        for f, y in zip(files, labels):
            if not 0 <= y < len(class_names):
                raise DataError(f"{io.join(url, split + '.txt')}: label {y} of {f} is outside the class "
                                f"list (0..{len(class_names) - 1})")
        if split == "train":
            counts = np.bincount(labels, minlength=len(class_names))
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                raise DataError(f"dataset {url}: empty class '{class_names[empty[0]]}' (label {empty[0]}) "
                                f"has no training images in {io.join(url, 'train.txt')}")
    channels = cfg.channels or _guess_channels(parsed["train"][0][0])
    for split, (files, labels, groups) in parsed.items():
        out[split] = ImageSet(_read_images(files, cfg.image_size, channels), np.array(labels, np.int64),
                              np.array([gindex[g] for g in groups], np.int64), np.array(files),
                              class_names, group_names)
    return out


_CSV_COLUMNS = {"path": ("path", "filename", "img_filename", "image"), "label": ("label", "y", "class"),
                "group": ("group", "a", "domain", "place"), "split": ("split",)}
_SPLIT_NAMES = {"0": "train", "1": "val", "2": "test", "train": "train", "val": "val", "test": "test"}


def _load_metadata_csv(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    import csv
    import io as _sio

    csv_url = io.join(url, "metadata.csv")
    reader = csv.DictReader(_sio.StringIO(io.read_text(csv_url)))
    header = reader.fieldnames or []
    cols = {}
    for key, names in _CSV_COLUMNS.items():
        found = [n for n in names if n in header]
        if not found and key != "group":
            raise DataError(f"{csv_url}: no {key} column (one of {', '.join(names)}); columns: {', '.join(header)}")
        cols[key] = found[0] if found else None
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": [], "test": []}
    for lineno, row in enumerate(reader, 2):
        split = _SPLIT_NAMES.get(str(row[cols["split"]]).strip())
        if split is None:
            raise DataError(f"{csv_url}:{lineno}: split '{row[cols['split']]}' is not one of 0/1/2 or train/val/test")
        group = row[cols["group"]].strip() if cols["group"] else "all"
        rows[split].append((io.join(url, row[cols["path"]].strip()), row[cols["label"]].strip(), group))
    if not rows["train"] or not rows["test"]:
        raise DataError(f"{csv_url}: needs train and test rows (split 0 and 2)")
    return _assemble(url, cfg, rows, csv_url)


def _load_domain_folders(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    fs, path = io.fs_and_path(url)
    cells: dict[tuple[str, str], list[str]] = {}
    for dom in sorted(e["name"] for e in fs.ls(path, detail=True) if e["type"] == "directory"):
        for cls in sorted(e["name"] for e in fs.ls(dom, detail=True) if e["type"] == "directory"):
            images = sorted(f for f in fs.find(cls) if f.lower().endswith(IMAGE_SUFFIXES))
            d, c = dom.rstrip("/").rsplit("/", 1)[-1], cls.rstrip("/").rsplit("/", 1)[-1]
            if not images:
                raise DataError(f"empty class '{c}' in domain '{d}': no images in {fs.unstrip_protocol(cls)}")
            cells[(c, d)] = [fs.unstrip_protocol(f) for f in images]
    if not cells:
        raise DataError(f"dataset {url}: no <domain>/<class>/ image folders")
    rng = np.random.RandomState(cfg.split_seed)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": [], "test": []}
    for (c, d), files in sorted(cells.items()):
        perm = [files[i] for i in rng.permutation(len(files))]
        n_test, n_val = int(round(0.2 * len(perm))), int(round(0.1 * len(perm)))
        for split, chunk in (("test", perm[:n_test]), ("val", perm[n_test:n_test + n_val]),
                             ("train", perm[n_test + n_val:])):
            rows[split].extend((f, c, d) for f in chunk)
    return _assemble(url, cfg, rows, url)


def _assemble(url: str, cfg: DataConfig, rows: dict[str, list[tuple[str, str, str]]], where: str) -> dict[str, ImageSet]:
    """(file URL, label name or index, group name) rows per split -> checked ImageSets."""
    train_labels = sorted({lab for _, lab, _ in rows["train"]}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    class_names = train_labels
    index = {c: i for i, c in enumerate(class_names)}
    group_names = sorted({g for split in rows.values() for _, _, g in split})
    gindex = {g: i for i, g in enumerate(group_names)}
    for split, items in rows.items():
        for f, lab, _ in items:
            if lab not in index:
                raise DataError(f"{where}: label '{lab}' of {f} (split {split}) is outside the class list of the "
                                f"train split ({', '.join(class_names[:20])})")
    channels = cfg.channels or _guess_channels(rows["train"][0][0])
    out = {}
    for split, items in rows.items():
        if not items:
            continue
        files = [f for f, _, _ in items]
        out[split] = ImageSet(_read_images(files, cfg.image_size, channels),
                              np.array([index[lab] for _, lab, _ in items], np.int64),
                              np.array([gindex[g] for _, _, g in items], np.int64), np.array(files),
                              class_names, group_names)
    return out


BUILTIN = {"digits-lt": make_digits_lt, "digits-groups": make_digits_groups}


def prepare_dataset(cfg: DataConfig, output_url: str) -> DatasetInfo:
    """Load (built-in or URL) and check the dataset, then write it to ``output_url``.

    Every check runs before anything is written: a bad dataset leaves no output behind.
    """
    cfg.validate()
    if cfg.dataset in BUILTIN:
        splits = BUILTIN[cfg.dataset](cfg.split_seed)
    elif "://" in cfg.dataset or "/" in cfg.dataset or io.exists(cfg.dataset):
        splits = load_url_dataset(cfg.dataset, cfg)
    else:
        raise DataError(f"unknown dataset '{cfg.dataset}': not a built-in ({', '.join(BUILTIN)}) "
                        "and not a path or URL")
    train = splits["train"]
    empty = np.flatnonzero(train.class_counts() == 0)
    if len(empty):
        raise DataError(f"dataset {cfg.dataset}: empty class '{train.class_names[empty[0]]}' in the train split")
    for split, data in splits.items():
        data.save(io.join(output_url, f"{split}.npz"))
    info = DatasetInfo(name=cfg.dataset, class_names=train.class_names, group_names=train.group_names,
                       splits=list(splits), train_class_counts=train.class_counts().tolist(),
                       image_shape=list(train.images.shape[1:]))
    io.write_json(io.join(output_url, "info.json"), info.__dict__)
    return info


def resolve_dataset(url_or_prepared: str) -> str:
    """Return the URL itself (a prepared dataset folder), checked."""
    load_info(url_or_prepared)
    return url_or_prepared


def sample_per_class(data: ImageSet, label: int, n: int, rng: np.random.Generator,
                     group: Optional[int] = None) -> np.ndarray:
    """Indices of ``n`` samples of class ``label`` (and group), cycling through a permutation."""
    mask = data.labels == label
    if group is not None:
        mask &= data.groups == group
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return idx
    reps = int(np.ceil(n / len(idx)))
    return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:n]
