"""Image datasets from any fsspec URL: class folders, split files, metadata.csv, domain folders.

Three steps, the first two of which read no image:

1. :func:`scan_url` finds the layout and *scans* it: per split, rows of (image path relative to the
   dataset root, label name or index, group name, where the row came from). Each layout is one
   ``_scan_*`` function that only lists folders or parses its split or metadata files.
2. :func:`check_scan` turns the rows of any layout into a :class:`CheckedDataset`: paths stay inside
   the dataset root (a local file's real path too: no symbolic link out of it), labels are in the
   class list, no class is empty, there are at least 2 classes, train and test are not empty.
   :func:`inspect_images` then opens and decodes every image (PIL ``verify``, then ``load``) and decides
   the channels: with it, this is all the pre-flight check needs (``prepare.scan_dataset``).
3. :func:`read_dataset` decides the channels from the whole train split and reads the images.
"""
from __future__ import annotations

import io as _io
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.imageset import IMAGE_SUFFIXES, ImageSet
from feedback_synth.errors import DataError

logger = logging.getLogger(__name__)

# How long the first request to a dataset URL may take before we call the store unreachable: gcsfs
# otherwise retries an offline gs:// URL for about a minute and ends in a long aiohttp traceback.
REACH_TIMEOUT_S = 15.0

# PIL modes with one colour band (alpha, if any, is dropped): such an image is grey.
GREY_MODES = ("1", "L", "LA", "La", "I", "F")

# How many images pre-flight opens at once (reading them is I/O bound on a remote store).
INSPECT_WORKERS = 8


class Row(NamedTuple):
    """One image of a split, as a layout scan found it (nothing checked yet)."""

    path: str  # relative to the dataset root, as the split file, metadata.csv or listing gave it
    label: str  # class name, or the class index as text when the layout gives indices (split files)
    group: str  # group name; "all" when the layout has no groups
    where: str  # where the row came from, for messages: "URL/train.txt:3" or a class folder URL


@dataclass
class Scan:
    """What a layout scan found at a dataset URL."""

    url: str
    layout: str  # class-folders, split-files, metadata-csv or domain-folders
    rows: dict[str, list[Row]]  # per split found: train, test and maybe val
    sources: dict[str, str]  # per split: the file or folder its rows came from (for messages)
    class_names: list[str] | None = None  # the declared class list (classes.txt, class folders), else from train
    indexed: bool = False  # labels are indices into the class list (split files), not class names


@dataclass
class CheckedDataset:
    """A scanned dataset that passed every check that needs no pixels."""

    url: str
    layout: str
    class_names: list[str]
    group_names: list[str]
    files: dict[str, list[str]] = field(default_factory=dict)  # per split: image URLs
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # per split: class indices
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # per split: group indices

    def summary(self) -> dict:
        """A small description for the pre-flight check and logs."""
        return {"dataset": self.url, "layout": self.layout, "splits": list(self.files),
                "num_classes": len(self.class_names), "class_names": list(self.class_names),
                "images": {s: len(f) for s, f in self.files.items()}, "groups": list(self.group_names)}


# --------------------------------------------------------------------------- step 1: scan


def load_url_dataset(url: str, cfg: DataConfig, timeout_s: float = REACH_TIMEOUT_S) -> dict[str, ImageSet]:
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

    Args:
        url: the dataset root (any fsspec URL or a local path).
        cfg: image size, channels (0 = decided from the train split) and split seed.
        timeout_s: how long the first request to ``url`` may take before the store counts as unreachable.
    """
    return read_dataset(check_scan(scan_url(url, cfg, timeout_s)), cfg)


def scan_url(url: str, cfg: DataConfig, timeout_s: float = REACH_TIMEOUT_S) -> Scan:
    """Find the layout of the dataset at ``url`` and scan it into rows (reads no image).

    Args:
        url: the dataset root.
        cfg: only ``split_seed`` is used (the split of domain folders).
        timeout_s: how long the first request to ``url`` may take.
    """
    if not _exists_within(url, timeout_s):
        raise DataError(f"dataset not found: {url}")
    if storage.exists(storage.join(url, "train.txt")):
        return _scan_split_files(url)
    if storage.exists(storage.join(url, "metadata.csv")):
        return _scan_metadata_csv(url)
    if storage.exists(storage.join(url, "train")):
        return _scan_class_folders(url)
    fs, path = storage.fs_and_path(url)
    if _list_folders(fs, path, set()):
        return _scan_domain_folders(url, cfg.split_seed)
    raise DataError(f"dataset {url}: expected class folders under {storage.join(url, 'train')}/, a split file "
                    f"{storage.join(url, 'train.txt')}, a {storage.join(url, 'metadata.csv')} "
                    "or <domain>/<class>/ folders")


def _exists_within(url: str, timeout_s: float) -> bool:
    """Whether ``url`` exists, asked with a deadline: an unreachable store is a one-line DataError.

    Runs in a daemon thread so that a store that never answers cannot hold the caller (or the
    interpreter's exit); on an async filesystem (gs://, s3://, http://) the request itself is
    cancelled at the deadline, so no retries keep running (and logging) behind the error.
    """
    import fsspec.asyn

    result: dict = {}

    def probe() -> None:
        try:
            fs, path = storage.fs_and_path(url)
            if getattr(fs, "async_impl", False):
                result["exists"] = fsspec.asyn.sync(fs.loop, fs._exists, path, timeout=timeout_s)
            else:
                result["exists"] = fs.exists(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            result["error"] = exc

    thread = threading.Thread(target=probe, name=f"probe {url}", daemon=True)
    thread.start()
    thread.join(timeout_s + 1)  # the async request gives up at timeout_s itself; 1 s for it to say so
    error = result.get("error")
    if thread.is_alive() or isinstance(error, (fsspec.asyn.FSTimeoutError, TimeoutError)):
        raise DataError(f"dataset {url} cannot be reached (no answer; check the network and credentials) "
                        f"after {timeout_s:g} s")
    if error is not None:
        raise DataError(f"dataset {url} cannot be reached ({_one_line(error)})")
    return bool(result["exists"])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read_text(url: str) -> str:
    """A split, class or metadata file as text; unreadable is a DataError naming the file."""
    try:
        return storage.read_bytes(url).decode("utf-8-sig")  # -sig: spreadsheets often write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{url}: cannot read ({_one_line(exc)})") from None


def _splits_present(url: str, suffix: str) -> list[str]:
    present = [s for s in ("train", "val", "test") if storage.exists(storage.join(url, f"{s}{suffix}"))]
    if "test" not in present:
        raise DataError(f"dataset {url}: no test split ({storage.join(url, 'test' + suffix)})")
    return present


def _is_dir(entry: dict) -> bool:
    """A listed folder; a local symbolic link to a folder too (fsspec lists it as "other"), so that
    its files are listed, and refused by :func:`check_scan` when they lie outside the dataset root."""
    return entry["type"] == "directory" or bool(entry.get("islink") and os.path.isdir(entry["name"]))


# Folders that file managers, NAS boxes and archivers add beside the data: never a class or a domain.
SYSTEM_FOLDERS = ("__MACOSX", "$RECYCLE.BIN", "System Volume Information", "lost+found")


def is_hidden(name: str) -> bool:
    """A hidden or system file or folder (``.thumbnails``, ``.DS_Store``, ``._x.png``, Synology's
    ``@eaDir``, ``__MACOSX``): skipped when class folders, domain folders and images are listed."""
    return name.startswith((".", "@")) or name in SYSTEM_FOLDERS


def _visible(fs_path: str, root_path: str) -> bool:
    """Whether no part of ``fs_path`` below ``root_path`` is hidden (:func:`is_hidden`); only its name
    when the listing spells the path otherwise (the root's own parents never count)."""
    prefix = root_path.rstrip("/") + "/"
    below = fs_path[len(prefix):] if fs_path.startswith(prefix) else fs_path.rstrip("/").rsplit("/", 1)[-1]
    return not any(is_hidden(p) for p in below.split("/"))


def _list_folders(fs, path: str, skipped: set[str]) -> list[dict]:
    """The sub-folders of ``path`` (sorted), without hidden or system ones (their names go to ``skipped``)."""
    out = []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if is_hidden(name):
            if _is_dir(entry):
                skipped.add(name)
        elif _is_dir(entry):
            out.append(entry)
    return out


def _log_skipped(url: str, skipped: set[str]) -> None:
    if skipped:
        logger.info("dataset %s: skipped hidden or system folders (not classes): %s", url,
                    ", ".join(sorted(skipped)))


def _images_under(fs, folder: str) -> list[str]:
    """The image files under ``folder`` (sorted), without hidden files or files in hidden folders."""
    return sorted(f for f in fs.find(folder) if f.lower().endswith(IMAGE_SUFFIXES) and _visible(f, folder))


def _relative(fs_path: str, root_path: str) -> str:
    """A listed file's path relative to the listed root (both as the filesystem spells them)."""
    return fs_path.removeprefix(root_path.rstrip("/") + "/")


def _scan_class_folders(url: str) -> Scan:
    """``url/split/<class>/<image>`` -> rows; the class list is the train split's folders."""
    fs, root = storage.fs_and_path(url)
    rows, sources, skipped = {}, {}, set()
    for split in _splits_present(url, ""):
        rows[split], sources[split] = [], storage.join(url, split)
        for entry in _list_folders(fs, f"{root.rstrip('/')}/{split}", skipped):
            cls = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            where = storage.join(url, split, cls)
            images = _images_under(fs, entry["name"])
            if not images:
                raise DataError(f"empty class '{cls}': no images in {where}")
            rows[split].extend(Row(_relative(f, root), cls, "all", where) for f in images)
    _log_skipped(url, skipped)
    class_names = sorted({r.label for r in rows["train"]})
    return Scan(url, "class-folders", rows, sources, class_names=class_names)


def _scan_split_files(url: str) -> Scan:
    """ImageNet-LT style ``relative/path label [group]`` lines (and ``classes.txt``) -> rows."""
    rows, sources = {}, {}
    for split in _splits_present(url, ".txt"):
        split_url = storage.join(url, f"{split}.txt")
        rows[split], sources[split] = [], split_url
        for lineno, line in enumerate(_read_text(split_url).splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{split_url}:{lineno}"
            if len(parts) not in (2, 3):
                raise DataError(f"{where}: expected 'relative/path label [group]', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{where}: label '{parts[1]}' is not an integer") from None
            rows[split].append(Row(parts[0], str(label), parts[2] if len(parts) == 3 else "all", where))
    classes_url = storage.join(url, "classes.txt")
    class_names = None
    if storage.exists(classes_url):
        class_names, seen = [], {}
        for lineno, line in enumerate(_read_text(classes_url).splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if name in seen:
                raise DataError(f"{classes_url}:{lineno}: class '{name}' repeats line {seen[name]}")
            seen[name] = lineno
            class_names.append(name)
    return Scan(url, "split-files", rows, sources, class_names=class_names, indexed=True)


_CSV_COLUMNS = {"path": ("path", "filename", "img_filename", "image"), "label": ("label", "y", "class"),
                "group": ("group", "a", "domain", "place"), "split": ("split",)}


_SPLIT_NAMES = {"0": "train", "1": "val", "2": "test", "train": "train", "val": "val", "test": "test"}


def _scan_metadata_csv(url: str) -> Scan:
    """``url/metadata.csv`` with path, label, group and split columns -> rows."""
    import csv

    csv_url = storage.join(url, "metadata.csv")
    reader = csv.DictReader(_io.StringIO(_read_text(csv_url)))
    rows: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    try:
        header = reader.fieldnames or []
        cols = {}
        for key, names in _CSV_COLUMNS.items():
            found = [n for n in names if n in header]
            if not found and key != "group":
                raise DataError(f"{csv_url}: no {key} column (one of {', '.join(names)}); columns: {', '.join(header)}")
            cols[key] = found[0] if found else None
        for row in reader:
            where = f"{csv_url}:{reader.line_num}"
            values = {key: row[col] for key, col in cols.items() if col}
            if any(v is None for v in values.values()):  # a short row: DictReader fills in None
                got = sum(v is not None for k, v in row.items() if k is not None)
                raise DataError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {got}")
            split = _SPLIT_NAMES.get(values["split"].strip())
            if split is None:
                raise DataError(f"{where}: split '{values['split']}' is not one of 0/1/2 or train/val/test")
            rows[split].append(Row(values["path"].strip(), values["label"].strip(),
                                   values["group"].strip() if cols["group"] else "all", where))
    except csv.Error as exc:
        raise DataError(f"{csv_url}:{reader.line_num}: not valid CSV ({exc})") from None
    if not rows["val"]:
        del rows["val"]
    return Scan(url, "metadata-csv", rows, {split: csv_url for split in rows})


def _scan_domain_folders(url: str, split_seed: int) -> Scan:
    """NICO++'s ``url/<domain>/<class>/<image>`` -> rows, split once per (class, domain) cell."""
    fs, root = storage.fs_and_path(url)
    cells: dict[tuple[str, str], list[str]] = {}
    where: dict[tuple[str, str], str] = {}
    skipped: set[str] = set()
    for dom in [e["name"] for e in _list_folders(fs, root, skipped)]:
        for cls in [e["name"] for e in _list_folders(fs, dom, skipped)]:
            images = _images_under(fs, cls)
            d, c = dom.rstrip("/").rsplit("/", 1)[-1], cls.rstrip("/").rsplit("/", 1)[-1]
            if not images:
                raise DataError(f"empty class '{c}' in domain '{d}': no images in {storage.join(url, d, c)}")
            cells[(c, d)] = [_relative(f, root) for f in images]
            where[(c, d)] = storage.join(url, d, c)
    _log_skipped(url, skipped)
    if not cells:
        raise DataError(f"dataset {url}: no <domain>/<class>/ image folders")
    rng = np.random.RandomState(split_seed)
    rows: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    for (c, d), files in sorted(cells.items()):
        perm = [files[i] for i in rng.permutation(len(files))]
        n_test, n_val = round(0.2 * len(perm)), round(0.1 * len(perm))
        for split, chunk in (("test", perm[:n_test]), ("val", perm[n_test:n_test + n_val]),
                             ("train", perm[n_test + n_val:])):
            rows[split].extend(Row(f, c, d, where[(c, d)]) for f in chunk)
    if not rows["val"]:
        del rows["val"]
    return Scan(url, "domain-folders", rows, {split: url for split in rows})


# --------------------------------------------------------------------------- step 2: check


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def resolve_inside(root: str, path: str, where: str) -> str:
    """The URL of ``path`` under the dataset root ``root``, refusing any path that leaves it.

    ``a/../b.png`` is normalised to ``b.png``; ``..`` that climbs above the root, an absolute
    path and a URL (``gs://...``, ``file:///...``) are refused, naming ``where`` (file and line).
    """
    if "://" in path or "::" in path or path.startswith(("/", "\\")) or _DRIVE.match(path):  # "::" chains URLs
        raise DataError(f"{where}: path '{path}' is absolute or a URL; image paths must be relative "
                        f"to the dataset root {root}")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise DataError(f"{where}: path '{path}' leaves the dataset root {root}")
            parts.pop()
        else:
            parts.append(part)
    if not parts:
        raise DataError(f"{where}: path '{path}' names no file under the dataset root {root}")
    return storage.join(root, "/".join(parts))


def _check_real_path(real_root: str, local_file: str, root: str, row: Row) -> None:
    """A local file whose real path (symbolic links followed) is outside the dataset root is refused."""
    real = os.path.realpath(local_file)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise DataError(f"{row.where}: path '{row.path}' leaves the dataset root {root} "
                        f"(a symbolic link to {real})")


def _label_order(label: str) -> tuple:
    """Class names in order: integers by value first (0, 1, 2, 10), then the others by name."""
    return (not label.isdigit(), int(label) if label.isdigit() else 0, label)


def check_classes(dataset: str, class_names: list[str], counts: np.ndarray, source: str) -> None:
    """Every class has training images and there are at least 2: else a DataError naming them.

    Args:
        dataset: the dataset name or URL, for the message.
        class_names: the class list.
        counts: training images per class (same order).
        source: the file or folder the train split came from, for the message.
    """
    empty = np.flatnonzero(np.asarray(counts) == 0)
    if len(empty):
        raise DataError(f"dataset {dataset}: empty class '{class_names[empty[0]]}' (label {empty[0]}) "
                        f"has no training images in {source}")
    if len(class_names) < 2:
        only = f"only one class ('{class_names[0]}')" if class_names else "no class"
        raise DataError(f"dataset {dataset}: {only} in {source}; a classifier needs at least 2 classes")


def check_scan(scan: Scan) -> CheckedDataset:
    """Check the rows of any layout and index them: the one path from rows to a dataset.

    Refuses (one-line DataError naming the file, line, class or folder): a path that leaves the
    dataset root, an empty train or test split, a label outside the class list, an empty class,
    fewer than 2 classes. Reads no image.
    """
    url = scan.url
    for split in ("train", "test"):
        if not scan.rows.get(split):
            raise DataError(f"dataset {url}: no {split} images in {scan.sources.get(split, url)}")
    train = scan.rows["train"]
    for rows in scan.rows.values():
        for row in rows:
            if not row.label:
                raise DataError(f"{row.where}: empty label for '{row.path}'")
    if scan.indexed:
        class_names = scan.class_names or [str(c) for c in range(max(int(r.label) for r in train) + 1)]
    else:
        class_names = scan.class_names or sorted({r.label for r in train}, key=_label_order)
    index = {c: i for i, c in enumerate(class_names)}
    group_names = sorted({r.group for rows in scan.rows.values() for r in rows})
    gindex = {g: i for i, g in enumerate(group_names)}
    out = CheckedDataset(url, scan.layout, class_names, group_names)
    local_root = storage.local_path(url)
    real_root = os.path.realpath(local_root) if local_root is not None else None
    for split, rows in scan.rows.items():
        files, labels = [], []
        for row in rows:
            file_url = resolve_inside(url, row.path, row.where)
            if real_root is not None:
                _check_real_path(real_root, storage.local_path(file_url), url, row)
            if scan.indexed:
                y = int(row.label)
                if not 0 <= y < len(class_names):
                    raise DataError(f"{row.where}: label {y} of {file_url} is outside the class list "
                                    f"(0..{len(class_names) - 1})")
            elif row.label not in index:
                shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
                raise DataError(f"{row.where}: class '{row.label}' in split '{split}' is not in the class list "
                                f"of the train split ({shown})")
            else:
                y = index[row.label]
            files.append(file_url)
            labels.append(y)
        out.files[split] = files
        out.labels[split] = np.array(labels, np.int64)
        out.groups[split] = np.array([gindex[r.group] for r in rows], np.int64)
    check_classes(url, class_names, np.bincount(out.labels["train"], minlength=len(class_names)),
                  scan.sources["train"])
    return out


# --------------------------------------------------------------------------- step 3: read


def _is_grey_mode(mode: str) -> bool:
    return mode in GREY_MODES or mode.startswith("I;")  # I;16, I;16B, ...


def _is_16_bit_mode(mode: str) -> bool:
    return mode == "I" or mode.startswith("I;16")  # a 16-bit PNG opens as I;16 (older Pillow: I)


def _bands_equal(img) -> bool:
    """Whether an RGB image is grey in content (R = G = B everywhere)."""
    from PIL import ImageChops

    r, g, b = img.split()
    return ImageChops.difference(r, g).getbbox() is None and ImageChops.difference(g, b).getbbox() is None


def is_grey(img) -> bool:
    """Whether an opened image counts as grey when the channels are decided (``data.channels`` 0):
    a grey mode, or a colour mode whose bands are equal. Pre-flight and prepare both ask this."""
    return _is_grey_mode(img.mode) or _bands_equal(img if img.mode == "RGB" else img.convert("RGB"))


def decide_channels(configured: int, greys) -> int:
    """``configured`` (``data.channels``) when set, else 1 when every train image is grey, else 3.

    Args:
        configured: ``data.channels`` (0 = decide).
        greys: per train image, whether it is grey (:func:`is_grey`); read only while needed.
    """
    return configured or (1 if all(greys) else 3)


def _to_grey(img):
    """One band, 8 bits. A 16-bit image is scaled (65535 -> 255, i.e. / 257), not clipped to 0 and 255
    as PIL's convert("L") does; a 32-bit integer image beyond 16 bits is scaled from its own range."""
    from PIL import Image

    if not _is_16_bit_mode(img.mode):
        return img.convert("L")
    arr = np.asarray(img).astype(np.float64)
    top = 65535.0 if img.mode != "I" or arr.max(initial=0) <= 65535 else float(2 ** 31 - 1)
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def _image_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file that is not a readable image (UnidentifiedImageError is an OSError)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def _unreadable(url: str, exc: BaseException) -> DataError:
    """A one-line DataError naming the image's URL; PIL's "cannot identify image file <_io.BytesIO
    object at 0x...>" (the bytes were opened from memory) names the file instead of the buffer."""
    what = " ".join(str(exc).split()) or type(exc).__name__
    what = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", lambda _: repr(url.rstrip("/").rsplit("/", 1)[-1]), what)
    return DataError(f"corrupt or unreadable image: {url} ({what})")


def _image_bytes(url: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"image not found or unreadable: {url} ({exc})") from None


def _decode_image(data: bytes, where: str, size: int, channels: int) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Image bytes -> (uint8 ``(size, size, C)``, the file's PIL mode, its size before resizing).

    ``channels`` 1 or 3 converts to that; 0 keeps a grey image (a grey mode, or a colour mode with
    equal bands) at 1 channel and makes any other RGB, for the caller to decide from the whole split.
    A 16-bit image is scaled to 8 bits.
    """
    from PIL import Image

    try:
        with Image.open(_io.BytesIO(data)) as img:
            mode, original = img.mode, img.size
            if channels == 1 or _is_grey_mode(mode):
                img = _to_grey(img)
            else:
                img = img.convert("RGB")
                if channels == 0 and is_grey(img):
                    img = img.getchannel(0)  # exactly what convert("L") gives when R = G = B
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except _image_errors() as exc:
        raise _unreadable(where, exc) from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)  # what PIL's L -> RGB does, after the (per-band) resize
    return arr, mode, original


def _read_images(urls: list[str], size: int, channels: int, modes: Counter, sizes: Counter,
                 digests: list[bytes]) -> list[np.ndarray]:
    """Read and decode ``urls`` (see :func:`_decode_image`), counting their modes and sizes and
    appending the sha256 of each file's bytes to ``digests``."""
    import hashlib

    from tqdm.auto import tqdm

    out = []
    for url in tqdm(urls, desc="reading images", unit="img", leave=False, disable=len(urls) < 200):
        data = _image_bytes(url)
        digests.append(hashlib.sha256(data).digest())
        arr, mode, original = _decode_image(data, url, size, channels)
        modes[mode] += 1
        sizes[original] += 1
        out.append(arr)
    return out


def inspect_images(checked: CheckedDataset, cfg: DataConfig, workers: int = INSPECT_WORKERS) -> dict:
    """Open and decode every image of a checked dataset, and decide its channels.

    Each file is read, checked by PIL's ``verify`` (the header, the chunk checksums of a PNG, the
    decompression-bomb limit) and then decoded (``load``: a PNG whose chunk checksums are valid but
    whose compressed stream is broken passes ``verify``): a missing, corrupt, truncated or oversized
    image is the DataError that :func:`read_dataset` would raise, before anything is written. The
    channels are decided as :func:`read_dataset` decides them (:func:`decide_channels`,
    :func:`is_grey`); a colour train image's bands are compared only until one image in colour has
    decided for 3 channels.

    Returns:
        ``{"channels": 1 or 3, "image_size": cfg.image_size}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm.auto import tqdm

    decided = {"colour": False}

    def check(job: tuple[str, bool]) -> bool:
        url, train = job
        data = _image_bytes(url)
        try:
            with Image.open(_io.BytesIO(data)) as img:
                img.verify()
            with Image.open(_io.BytesIO(data)) as img:  # verify() leaves the image unusable: open it again
                img.load()  # decode every pixel (verify reads the chunks but not the compressed stream)
                if not (train and not cfg.channels and not decided["colour"]):
                    return True
                grey = is_grey(img)
        except _image_errors() as exc:
            raise _unreadable(url, exc) from None
        if not grey:
            decided["colour"] = True
        return grey

    jobs = [(f, split == "train") for split, files in checked.files.items() for f in files]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(check, jobs), total=len(jobs), desc="checking images", unit="img",
                            leave=False, disable=len(jobs) < 200))
    greys = (grey for (_, train), grey in zip(jobs, results) if train)
    return {"channels": decide_channels(cfg.channels, greys), "image_size": cfg.image_size}


def _stack(arrays: list[np.ndarray], size: int, channels: int) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)


def read_dataset(checked: CheckedDataset, cfg: DataConfig) -> dict[str, ImageSet]:
    """Read every image of a checked dataset into ImageSets, all with the same channel count.

    The channels are ``cfg.channels`` when set, else decided from the whole train split: 1 when
    every train image is grey (a grey mode, or a colour mode whose bands are equal), else 3. When
    the images mix modes, one warning says how many of which modes were converted to what; when
    any image is resized (to ``data.image_size``), one warning names the sizes; when a file of one
    split is byte-identical to a file of another (sha256), one warning counts them (leakage).
    """
    size, modes, sizes = cfg.image_size, Counter(), Counter()
    digests: dict[str, list[bytes]] = {split: [] for split in checked.files}
    train = _read_images(checked.files["train"], size, cfg.channels, modes, sizes, digests["train"])
    channels = decide_channels(cfg.channels, (a.shape[-1] == 1 for a in train))
    if not cfg.channels:
        logger.info("dataset %s: %d channel%s (%s)", checked.url, channels, "" if channels == 1 else "s",
                    "every train image is grey" if channels == 1 else "some train images are in colour")
    if channels == 3:
        train = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in train]
    images = {"train": _stack(train, size, channels)}
    del train
    for split, files in checked.files.items():
        if split != "train":
            images[split] = _stack(_read_images(files, size, channels, modes, sizes, digests[split]), size, channels)
    _warn_mixed_modes(checked.url, modes, channels)
    _warn_resized(checked.url, sizes, size)
    warn_leakage(checked.url, checked.files, digests)
    return {split: ImageSet(images[split], checked.labels[split], checked.groups[split], np.array(files),
                            list(checked.class_names), list(checked.group_names))
            for split, files in checked.files.items()}


def _warn_mixed_modes(url: str, modes: Counter, channels: int) -> None:
    """One warning when the images are of more than one mode: which were converted, to what."""
    if len(modes) < 2:
        return
    target = "L" if channels == 1 else "RGB"
    converted = {m: n for m, n in sorted(modes.items(), key=lambda kv: (-kv[1], kv[0])) if m != target}
    total = sum(converted.values())
    deep = sum(n for m, n in converted.items() if _is_16_bit_mode(m))
    logger.warning("dataset %s mixes image modes (%s): converted %d image%s (%s) to %d channel%s (%s)%s", url,
                   ", ".join(f"{m}: {n}" for m, n in sorted(modes.items())), total, "" if total == 1 else "s",
                   ", ".join(f"{n} {m}" for m, n in converted.items()), channels, "" if channels == 1 else "s",
                   target, f"; {deep} 16-bit image{'' if deep == 1 else 's'} scaled to 8 bits (/257)" if deep else "")


def warn_leakage(url: str, files: dict[str, list[str]], digests: dict[str, list[bytes]]) -> int:
    """One warning when files of different splits are byte-identical (same sha256): an image of val
    or test that is also in train (or test in val) is measured on what was trained on (leakage).
    Counts each image of a later split (train < val < test) that repeats one of an earlier split,
    and shows one pair. Returns the count.
    """
    seen: dict[bytes, tuple[str, str]] = {}  # digest -> (split, file) where it was first met
    pairs: Counter = Counter()
    example = None
    for split in sorted(files, key=lambda s: ("train", "val", "test").index(s) if s in ("train", "val", "test") else 3):
        mine: dict[bytes, tuple[str, str]] = {}
        for file, digest in zip(files[split], digests[split]):
            first = seen.get(digest)
            if first is not None:
                pairs[(split, first[0])] += 1
                example = example or (file, first[1])
            mine.setdefault(digest, (split, file))
        for digest, where in mine.items():
            seen.setdefault(digest, where)
    total = sum(pairs.values())
    if total:
        root = url.rstrip("/") + "/"
        a, b = (f.removeprefix(root) for f in example)
        logger.warning("dataset %s: %d image%s of one split %s byte-identical to images of another (sha256): %s; "
                       "e.g. %s = %s (leakage: accuracy on them is not generalisation; remove them from one split)",
                       url, total, "" if total == 1 else "s", "is" if total == 1 else "are",
                       ", ".join(f"{n} {s} = {t}" for (s, t), n in sorted(pairs.items())), a, b)
    return total


def _warn_resized(url: str, sizes: Counter, size: int) -> None:
    """One warning when images were resized: of one size (it and the target), or of several (how
    many were resized, to what)."""
    if len(sizes) == 1:
        (w, h), n = next(iter(sizes.items()))
        if (w, h) != (size, size):
            keep = f"; set data.image_size={w} to keep their size" if w == h and 4 <= w <= 1024 else ""
            logger.warning("dataset %s: its %d image%s of %dx%d %s resized to %dx%d (data.image_size %d%s)", url, n,
                           "" if n == 1 else "s", w, h, "was" if n == 1 else "were", size, size, size, keep)
        return
    if len(sizes) < 2:
        return
    resized = sum(n for s, n in sizes.items() if s != (size, size))
    common = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in common[:5]) + (", ..." if len(common) > 5 else "")
    logger.warning("dataset %s has images of %d sizes (%s): resized %d image%s to %dx%d (data.image_size)", url,
                   len(sizes), shown, resized, "" if resized == 1 else "s", size, size)
