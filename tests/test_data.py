"""Data: the built-in digits-lt split, URL datasets on memory:// and gs://, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from builders import class_folders, png

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.digits import DIGITS_POOL_PER_CLASS, DIGITS_TEST_PER_CLASS, digits_lt_counts
from feedback_synth.data.imageset import load_info, load_split, shot_groups
from feedback_synth.data.prepare import prepare_dataset
from feedback_synth.errors import DataError


def test_digits_lt_counts_match_design():
    assert digits_lt_counts() == [60, 41, 28, 19, 13, 9, 6, 4, 2, 2]


def test_digits_lt_parts_are_disjoint_and_sized(digits):
    ids = {name: set(part.ids.tolist()) for name, part in digits.items() if name != "oracle"}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], f"{a} and {b} share samples"
    assert digits["test"].class_counts().tolist() == [DIGITS_TEST_PER_CLASS] * 10
    assert digits["pool"].class_counts().tolist() == [DIGITS_POOL_PER_CLASS] * 10
    assert digits["train"].class_counts().tolist() == digits_lt_counts()
    assert digits["val"].class_counts().tolist() == [8] + [30] * 9  # class 0's 60 train images leave 8
    assert sum(len(p) for n, p in digits.items() if n != "oracle") <= 1797
    assert digits["train"].images.shape[1:] == (16, 16, 1)
    # the oracle is the pool in the task style: same samples, different pixels
    assert digits["oracle"].ids.tolist() == digits["pool"].ids.tolist()
    assert not np.array_equal(digits["oracle"].images, digits["pool"].images)


def test_split_seed_changes_train_val_test_but_never_the_generator_pool(digits):
    from feedback_synth.data.digits import make_digits_lt

    other = make_digits_lt(split_seed=3)
    assert other["pool"].ids.tolist() == digits["pool"].ids.tolist()  # the bundled generator's pretraining data
    assert set(other["test"].ids) != set(digits["test"].ids)
    seen = set(digits["pool"].ids)
    for split in ("train", "val", "test"):
        assert not set(other[split].ids) & seen, split
    assert other["train"].class_counts().tolist() == digits_lt_counts()


def test_digits_lt_split_is_fixed(digits):
    from feedback_synth.data.digits import make_digits_lt

    again = make_digits_lt()
    assert again["train"].ids.tolist() == digits["train"].ids.tolist()
    assert np.array_equal(again["test"].images, digits["test"].images)


def test_task_style_differs_from_generator_pool(digits):
    """The domain gap: train/test are sheared and thicker, the pool is not."""
    from feedback_synth.data.digits import task_style

    pool = digits["pool"].images[..., 0] / 255.0
    styled = task_style(pool)
    assert styled.mean() > pool.mean() * 1.1  # thicker strokes
    assert np.abs(styled - pool).mean() > 0.05


def test_shot_groups_follow_thresholds():
    groups = shot_groups(np.array(digits_lt_counts()), DataConfig())
    assert groups["many"].tolist() == [0, 1, 2]
    assert groups["medium"].tolist() == [3, 4, 5, 6]
    assert groups["few"].tolist() == [7, 8, 9]
    g2 = shot_groups(np.array(digits_lt_counts()), DataConfig(many_threshold=10, few_threshold=2))
    assert g2["few"].tolist() == [8, 9]


def test_class_folder_dataset_on_memory(memory_url):
    src, out = memory_url + "/src", memory_url + "/prepared"
    class_folders(src, {"train": {"cat": 5, "dog": 2}, "test": {"cat": 2, "dog": 2}})
    info = prepare_dataset(DataConfig(dataset=src, image_size=8), out)
    assert info.class_names == ["cat", "dog"] and info.train_class_counts == [5, 2]
    test = load_split(out, "test")
    assert test.images.shape == (4, 8, 8, 1) and test.labels.tolist() == [0, 0, 1, 1]
    assert load_info(out).image_shape == [8, 8, 1]


def test_split_file_dataset_with_groups_on_memory(memory_url):
    src, out = memory_url + "/src", memory_url + "/prepared"
    lines = {"train": [], "test": []}
    for split, n in (("train", 6), ("test", 4)):
        for i in range(n):
            path = f"images/{split}_{i}.png"
            storage.write_bytes(storage.join(src, path), png(20 * i))
            lines[split].append(f"{path} {i % 3} {'water' if i % 2 else 'land'}")
        storage.write_text(storage.join(src, f"{split}.txt"), "\n".join(lines[split]) + "\n")
    storage.write_text(storage.join(src, "classes.txt"), "a\nb\nc\n")
    prepare_dataset(DataConfig(dataset=src, image_size=8, channels=3), out)
    train = load_split(out, "train")
    assert train.class_names == ["a", "b", "c"] and train.group_names == ["land", "water"]
    assert train.images.shape == (6, 8, 8, 3)
    assert train.groups.tolist() == [0, 1, 0, 1, 0, 1]


def test_class_folder_dataset_on_gcs_emulator(gcs_bucket):
    src, out = gcs_bucket + "/src", gcs_bucket + "/prepared"
    class_folders(src, {"train": {"a": 3, "b": 1}, "test": {"a": 1, "b": 1}})
    info = prepare_dataset(DataConfig(dataset=src, image_size=8), out)
    assert info.train_class_counts == [3, 1]
    assert len(load_split(out, "test")) == 2


# --------------------------------------------------------------------------- bad input


def _assert_no_output(url: str) -> None:
    assert not storage.exists(url) or not storage.fs_and_path(url)[0].ls(storage.fs_and_path(url)[1]), "half-written output left"


def test_missing_dataset_path(memory_url):
    with pytest.raises(DataError, match="dataset not found: memory://nowhere"):
        prepare_dataset(DataConfig(dataset="memory://nowhere"), memory_url + "/out")
    _assert_no_output(memory_url + "/out")


def test_unknown_builtin_name(memory_url):
    with pytest.raises(DataError, match="unknown dataset 'digits-xx'"):
        prepare_dataset(DataConfig(dataset="digits-xx"), memory_url + "/out")


def test_empty_class_folder_is_named(memory_url):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 2}, "test": {"a": 1}})
    storage.write_text(storage.join(src, "train", "empty", "README.txt"), "no images here")
    with pytest.raises(DataError, match="empty class 'empty'"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")
    _assert_no_output(memory_url + "/out")


def test_test_class_outside_class_list_is_named(memory_url):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "zebra": 1}})
    with pytest.raises(DataError, match="class 'zebra' in split 'test' is not in the class list"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")
    _assert_no_output(memory_url + "/out")


def test_label_outside_class_list_in_split_file(memory_url):
    src = memory_url + "/src"
    storage.write_bytes(storage.join(src, "x.png"), png(1))
    storage.write_text(storage.join(src, "classes.txt"), "a\nb\n")
    storage.write_text(storage.join(src, "train.txt"), "x.png 0\nx.png 1\n")
    storage.write_text(storage.join(src, "test.txt"), "x.png 7\n")
    with pytest.raises(DataError, match=r"test.txt:1: label 7 of .*x.png is outside the class list"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")
    _assert_no_output(memory_url + "/out")


def test_empty_class_in_split_file(memory_url):
    src = memory_url + "/src"
    storage.write_bytes(storage.join(src, "x.png"), png(1))
    storage.write_text(storage.join(src, "classes.txt"), "a\nb\nc\n")
    storage.write_text(storage.join(src, "train.txt"), "x.png 0\nx.png 2\n")
    storage.write_text(storage.join(src, "test.txt"), "x.png 0\n")
    with pytest.raises(DataError, match="empty class 'b'"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")


def test_corrupt_image_is_named(memory_url):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    storage.write_bytes(storage.join(src, "train", "b", "broken.png"), b"\x89PNG not really")
    with pytest.raises(DataError, match=r"corrupt or unreadable image: .*train/b/broken.png"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")
    _assert_no_output(memory_url + "/out")


def test_missing_image_in_split_file(memory_url):
    src = memory_url + "/src"
    storage.write_bytes(storage.join(src, "x.png"), png(1))
    storage.write_text(storage.join(src, "train.txt"), "x.png 0\nx.png 1\nmissing.png 0\n")
    storage.write_text(storage.join(src, "test.txt"), "x.png 0\n")
    with pytest.raises(DataError, match=r"image not found or unreadable: .*missing.png"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")


def test_no_test_split(memory_url):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 2}})
    with pytest.raises(DataError, match="no test split"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")


def _task_style_by_hand(images: np.ndarray) -> np.ndarray:
    """digits.task_style written out in numpy (another order of the same float64 operations): a 3x3
    grey dilation at 0.8, then each row sheared by 0.35 x its offset from the centre, bilinear, zero
    padding (affine_grid / grid_sample with align_corners=False)."""
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    pooled = np.max([padded[:, 1 + di:1 + di + h, 1 + dj:1 + dj + w] for di in (-1, 0, 1) for dj in (-1, 0, 1)], 0)
    x = np.maximum(images, 0.8 * pooled)
    out = np.zeros_like(x)
    for i in range(h):
        y_norm = (2 * i + 1) / h - 1
        for j in range(w):
            px = (((2 * j + 1) / w - 1 + 0.35 * y_norm + 1) * w - 1) / 2
            x0 = int(np.floor(px))
            frac = px - x0
            left = x[:, i, x0] if 0 <= x0 < w else 0.0
            right = x[:, i, x0 + 1] if 0 <= x0 + 1 < w else 0.0
            out[:, i, j] = left + frac * (right - left)
    return np.clip(out, 0, 1)


def test_the_builtin_data_is_the_same_bytes_whatever_the_float_order():
    # the style's weights put many pixels exactly half-way between two grey levels; the last bit of
    # the float sum then depends on the CPU's vector kernels, and so did the built-in data (the
    # shipped oracle was not found on another machine). to_uint8 rounds every such pixel the same way
    from sklearn.datasets import load_digits

    from feedback_synth.data.digits import _upsample_digits, task_style, to_uint8

    grey = _upsample_digits(load_digits().images)
    by_torch, by_hand = task_style(grey), _task_style_by_hand(grey)
    assert np.abs(by_torch - by_hand).max() < 1e-12  # the same transform ...
    halves = np.abs(np.abs(by_hand * 255 % 1) - 0.5) < 1e-9
    assert halves.sum() > 100  # ... with many pixels on a tie, where plain rounding may go either way
    assert np.array_equal(to_uint8(by_torch), to_uint8(by_hand))
    assert np.array_equal(to_uint8(np.array([0.5 / 255, 1.5 / 255, 2.5 / 255 + 1e-13])), [0, 2, 2])  # half to even
