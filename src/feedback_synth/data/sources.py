"""Image datasets from any fsspec URL: class folders, split files, metadata.csv, domain folders."""
from __future__ import annotations

import io as _io

import numpy as np

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.imageset import IMAGE_SUFFIXES, ImageSet
from feedback_synth.errors import DataError


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
            data = storage.read_bytes(url)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"image not found or unreadable: {url} ({exc})") from None
        out.append(_decode_image(data, url, size, channels))
    return np.stack(out) if out else np.zeros((0, size, size, channels), np.uint8)


def _guess_channels(url: str) -> int:
    from PIL import Image

    with Image.open(_io.BytesIO(storage.read_bytes(url))) as img:
        return 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3


def _scan_folder_split(root: str, split: str) -> tuple[list[str], list[str]]:
    """``root/split/<class>/<image>`` -> (file URLs, class names)."""
    fs, path = storage.fs_and_path(root)
    split_path = f"{path.rstrip('/')}/{split}"
    files, classes = [], []
    for entry in sorted(fs.ls(split_path, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        cls = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        images = sorted(f for f in fs.find(entry["name"]) if f.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise DataError(f"empty class '{cls}': no images in {storage.join(root, split, cls)}")
        for f in images:
            files.append(fs.unstrip_protocol(f))
            classes.append(cls)
    return files, classes


def _parse_split_file(root: str, split: str) -> tuple[list[str], list[int], list[str]]:
    """ImageNet-LT style ``relative/path label [group]`` lines -> (URLs, labels, groups)."""
    url = storage.join(root, f"{split}.txt")
    files, labels, groups = [], [], []
    for lineno, line in enumerate(storage.read_text(url).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            raise DataError(f"{url}:{lineno}: expected 'relative/path label [group]', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{url}:{lineno}: label '{parts[1]}' is not an integer") from None
        files.append(storage.join(root, parts[0]))
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
    if not storage.exists(url):
        raise DataError(f"dataset not found: {url}")
    if storage.exists(storage.join(url, "train.txt")):
        return _load_split_files(url, cfg)
    if storage.exists(storage.join(url, "metadata.csv")):
        return _load_metadata_csv(url, cfg)
    if storage.exists(storage.join(url, "train")):
        return _load_class_folders(url, cfg)
    fs, path = storage.fs_and_path(url)
    if any(e["type"] == "directory" for e in fs.ls(path, detail=True)):
        return _load_domain_folders(url, cfg)
    raise DataError(f"dataset {url}: expected class folders under {storage.join(url, 'train')}/, a split file "
                    f"{storage.join(url, 'train.txt')}, a {storage.join(url, 'metadata.csv')} or <domain>/<class>/ folders")


def _splits_present(url: str, suffix: str) -> list[str]:
    present = [s for s in ("train", "val", "test") if storage.exists(storage.join(url, f"{s}{suffix}"))]
    if "test" not in present:
        raise DataError(f"dataset {url}: no test split ({storage.join(url, 'test' + suffix)})")
    return present


def _load_class_folders(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    scanned = {s: _scan_folder_split(url, s) for s in _splits_present(url, "")}
    class_names = sorted(set(scanned["train"][1]))
    if not class_names:
        raise DataError(f"dataset {url}: no class folders in {storage.join(url, 'train')}/")
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
    classes_url = storage.join(url, "classes.txt")
    if storage.exists(classes_url):
        class_names = [c.strip() for c in storage.read_text(classes_url).splitlines() if c.strip()]
    else:
        class_names = [str(c) for c in range(max(parsed["train"][1], default=-1) + 1)]
    group_names = sorted({g for _, _, groups in parsed.values() for g in groups})
    gindex = {g: i for i, g in enumerate(group_names)}
    out = {}
    for split, (files, labels, groups) in parsed.items():
        for f, y in zip(files, labels):
            if not 0 <= y < len(class_names):
                raise DataError(f"{storage.join(url, split + '.txt')}: label {y} of {f} is outside the class "
                                f"list (0..{len(class_names) - 1})")
        if split == "train":
            counts = np.bincount(labels, minlength=len(class_names))
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                raise DataError(f"dataset {url}: empty class '{class_names[empty[0]]}' (label {empty[0]}) "
                                f"has no training images in {storage.join(url, 'train.txt')}")
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

    csv_url = storage.join(url, "metadata.csv")
    reader = csv.DictReader(_sio.StringIO(storage.read_text(csv_url)))
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
        rows[split].append((storage.join(url, row[cols["path"]].strip()), row[cols["label"]].strip(), group))
    if not rows["train"] or not rows["test"]:
        raise DataError(f"{csv_url}: needs train and test rows (split 0 and 2)")
    return _assemble(url, cfg, rows, csv_url)


def _load_domain_folders(url: str, cfg: DataConfig) -> dict[str, ImageSet]:
    fs, path = storage.fs_and_path(url)
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
