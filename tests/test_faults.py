"""Fault injection: bad input gets a one-line error naming the file, field or class, and loses nothing."""
from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest
from builders import class_folders, colour_png, png, wait_for_stage_run

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.imageset import load_info, load_split
from feedback_synth.data.prepare import prepare_dataset, scan_dataset
from feedback_synth.data.sources import load_url_dataset
from feedback_synth.errors import DataError

SOURCES_LOGGER = "feedback_synth.data.sources"


def _split_files(root: str, train: list[str], test: list[str], images: tuple[str, ...] = ("x.png",)) -> None:
    for name in images:
        storage.write_bytes(storage.join(root, name), png(7))
    storage.write_text(storage.join(root, "train.txt"), "\n".join(train) + "\n")
    storage.write_text(storage.join(root, "test.txt"), "\n".join(test) + "\n")


def _metadata_csv(root: str, rows: list[str], images: tuple[str, ...] = ("x.png",)) -> None:
    for name in images:
        storage.write_bytes(storage.join(root, name), png(7))
    storage.write_text(storage.join(root, "metadata.csv"), "\n".join(["path,label,group,split", *rows]) + "\n")


def _assert_nothing_written(url: str) -> None:
    fs, path = storage.fs_and_path(url)
    assert not fs.exists(path) or not fs.ls(path), f"output written for a refused dataset: {fs.ls(path)}"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- paths escape the dataset root


@pytest.fixture
def outside(memory_url):
    """A dataset root ``memory_url/a/src`` with a real image two levels above it (``../../outside.png``)."""
    storage.write_bytes(storage.join(memory_url, "outside.png"), png(99))
    return memory_url + "/a/src"


def test_split_file_path_leaving_the_root_is_refused(outside, memory_url):
    _split_files(outside, ["x.png 0", "x.png 1", "../../outside.png 2"], ["x.png 0"])
    storage.write_text(storage.join(outside, "classes.txt"), "a\nb\nc\n")
    with pytest.raises(DataError) as exc:
        prepare_dataset(DataConfig(dataset=outside), memory_url + "/out")
    assert _one_line(exc) == f"{outside}/train.txt:3: path '../../outside.png' leaves the dataset root {outside}"
    _assert_nothing_written(memory_url + "/out")


def test_metadata_csv_path_leaving_the_root_is_refused(outside, memory_url):
    _metadata_csv(outside, ["x.png,cat,land,train", "x.png,dog,land,train", "../../outside.png,dog,land,test"])
    with pytest.raises(DataError) as exc:
        prepare_dataset(DataConfig(dataset=outside), memory_url + "/out")
    assert _one_line(exc) == f"{outside}/metadata.csv:4: path '../../outside.png' leaves the dataset root {outside}"
    _assert_nothing_written(memory_url + "/out")


def test_etc_passwd_is_refused_for_its_path_not_as_a_bad_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.png").write_bytes(png(7))
    (src / "train.txt").write_text("x.png 0\nx.png 1\n../../../../etc/passwd 0\n")
    (src / "test.txt").write_text("x.png 0\n")
    refused = r"train.txt:3: path '\.\./\.\./\.\./\.\./etc/passwd' leaves the dataset root"
    with pytest.raises(DataError, match=refused) as exc:
        prepare_dataset(DataConfig(dataset=str(src)), str(tmp_path / "out"))
    assert "image" not in _one_line(exc)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["/etc/passwd", "gs://other-bucket/x.png", "file:///etc/passwd", "memory://x.png",
                                  "x.png::/etc/passwd"])
def test_absolute_paths_and_other_schemes_are_refused(memory_url, path):
    src = memory_url + "/src"
    _split_files(src, ["x.png 0", f"{path} 1"], ["x.png 0"])
    refused = r"train.txt:2: path '.*' is absolute or a URL; image paths must be relative"
    with pytest.raises(DataError, match=refused) as exc:
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")
    assert path in _one_line(exc)
    _assert_nothing_written(memory_url + "/out")


def test_dot_dot_that_stays_inside_the_root_is_normalised(memory_url):
    src = memory_url + "/src"
    _split_files(src, ["sub/../x.png 0", "./x.png 1"], ["x.png 0"])
    prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/out")
    assert load_split(memory_url + "/out", "train").ids.tolist() == [f"{src}/x.png"] * 2


# --- channels decided from the whole train split


def test_one_stray_rgba_file_keeps_a_grey_dataset_grey(memory_url, caplog):
    """The stray file sorts first (it used to decide alone): its grey content is grey, with one warning."""
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    storage.write_bytes(storage.join(src, "train", "a", "00-stray.png"), png(50, mode="RGBA"))
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        info = prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/out")
    assert info.image_shape == [8, 8, 1]
    assert load_split(memory_url + "/out", "test").images.shape[-1] == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == SOURCES_LOGGER and r.levelno == logging.WARNING
                and "resized to" not in r.getMessage()]  # the 12x12 images are resized to 8x8: its own warning
    assert warnings == [(f"dataset {src} mixes image modes (L: 8, RGBA: 1): converted 1 image (1 RGBA) "
                         "to 1 channel (L)")]


def test_a_colour_image_makes_the_dataset_rgb_with_one_warning(memory_url, caplog):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    storage.write_bytes(storage.join(src, "train", "b", "zz-colour.png"), colour_png(mode="RGBA"))
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        info = prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/out")
    assert info.image_shape == [8, 8, 3]
    test = load_split(memory_url + "/out", "test")
    assert test.images.shape[-1] == 3 and (test.images[..., 0] == test.images[..., 2]).all()  # grey kept grey
    warnings = [r.getMessage() for r in caplog.records
                if r.name == SOURCES_LOGGER and "resized to" not in r.getMessage()]  # 12x12 -> 8x8: its own warning
    assert len(warnings) == 1 and "converted 9 images (8 L, 1 RGBA) to 3 channels (RGB)" in warnings[0], warnings


def test_channels_3_forces_rgb(memory_url, caplog):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        info = prepare_dataset(DataConfig(dataset=src, image_size=8, channels=3), memory_url + "/out")
    assert info.image_shape == [8, 8, 3]
    assert not [r for r in caplog.records if r.name == SOURCES_LOGGER  # one mode: nothing to warn about
                and "resized to" not in r.getMessage()]  # (but the resize from 12x12 to 8x8)


def test_channels_1_forces_grey_on_a_colour_dataset(memory_url):
    src = memory_url + "/src"
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                storage.write_bytes(storage.join(src, split, cls, f"{i}.png"), colour_png())
    assert prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/auto").image_shape == [8, 8, 3]
    grey = prepare_dataset(DataConfig(dataset=src, image_size=8, channels=1), memory_url + "/grey")
    assert grey.image_shape == [8, 8, 1]


# --- fewer than 2 classes


def _one_class_layouts(root: str) -> dict[str, str]:
    """The same one-class dataset in every layout; returns layout -> URL."""
    urls = {k: f"{root}/{k}" for k in ("class-folders", "split-files", "metadata-csv", "domain-folders")}
    class_folders(urls["class-folders"], {"train": {"cat": 3}, "test": {"cat": 1}})
    _split_files(urls["split-files"], ["x.png 0", "x.png 0"], ["x.png 0"])
    storage.write_text(storage.join(urls["split-files"], "classes.txt"), "cat\n")
    _metadata_csv(urls["metadata-csv"], ["x.png,cat,land,train", "x.png,cat,land,test"])
    for i in range(5):
        storage.write_bytes(storage.join(urls["domain-folders"], "grass", "cat", f"{i}.png"), png(i))
    return urls


@pytest.mark.parametrize("layout", ["class-folders", "split-files", "metadata-csv", "domain-folders"])
def test_a_single_class_dataset_is_refused(memory_url, layout):
    url = _one_class_layouts(memory_url + "/src")[layout]
    with pytest.raises(DataError, match=rf"dataset {url}: only one class \('cat'\) in .*; a classifier needs at "
                                        "least 2 classes") as exc:
        prepare_dataset(DataConfig(dataset=url), memory_url + "/out")
    _one_line(exc)
    _assert_nothing_written(memory_url + "/out")
    with pytest.raises(DataError, match="only one class"):
        scan_dataset(url, DataConfig())


# --- one assembly path: every layout's rows become the same checked dataset


def test_layouts_agree(memory_url):
    """The same images as class folders, split files and metadata.csv give the same labels and pixels."""
    base = memory_url + "/src"
    folders, split_files, csv = base + "/folders", base + "/txt", base + "/csv"
    class_folders(folders, {"train": {"a": 2, "b": 3}, "test": {"a": 1, "b": 1}})
    lines: dict[str, list[str]] = {"train": [], "test": []}
    csv_rows = []
    for split, per_class in (("train", {"a": 2, "b": 3}), ("test", {"a": 1, "b": 1})):
        for y, (cls, n) in enumerate(per_class.items()):
            for i in range(n):
                data = storage.read_bytes(storage.join(folders, split, cls, f"{i}.png"))  # the same files
                for root in (split_files, csv):
                    storage.write_bytes(storage.join(root, split, cls, f"{i}.png"), data)
                lines[split].append(f"{split}/{cls}/{i}.png {y}")
                csv_rows.append(f"{split}/{cls}/{i}.png,{cls},all,{split}")
    for split, ls in lines.items():
        storage.write_text(storage.join(split_files, f"{split}.txt"), "\n".join(ls) + "\n")
    storage.write_text(storage.join(split_files, "classes.txt"), "a\nb\n")
    _metadata_csv(csv, csv_rows, images=())
    cfg = DataConfig(image_size=8)
    loaded = {root: load_url_dataset(root, cfg) for root in (folders, split_files, csv)}
    for root, splits in loaded.items():
        for split in ("train", "test"):
            ref = loaded[folders][split]
            assert splits[split].class_names == ["a", "b"] and splits[split].group_names == ["all"], root
            assert splits[split].labels.tolist() == ref.labels.tolist(), (root, split)
            assert np.array_equal(splits[split].images, ref.images), (root, split)
    assert {s["layout"] for s in (scan_dataset(r, cfg) for r in loaded)} == {"class-folders", "split-files",
                                                                               "metadata-csv"}


# --- a structural check without reading images


def test_scan_dataset_summarises_without_reading_images(memory_url):
    src = memory_url + "/src"
    storage.write_bytes(storage.join(src, "img", "broken.png"), b"not an image at all")
    storage.write_text(storage.join(src, "train.txt"), "img/broken.png 0 land\nimg/broken.png 1 water\n")
    storage.write_text(storage.join(src, "test.txt"), "img/broken.png 0 land\n")
    storage.write_text(storage.join(src, "classes.txt"), "a\nb\n")
    summary = scan_dataset(src, DataConfig())
    assert summary == {"dataset": src, "layout": "split-files", "splits": ["train", "test"], "num_classes": 2,
                       "class_names": ["a", "b"], "images": {"train": 2, "test": 1}, "groups": ["land", "water"]}
    with pytest.raises(DataError, match="corrupt or unreadable image"):  # the pixels are the prepare stage's
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")


def test_scan_dataset_of_builtins():
    summary = scan_dataset("digits-lt", DataConfig())
    assert summary["layout"] == "built-in" and summary["num_classes"] == 10 and "test" in summary["splits"]
    assert summary["groups"] == ["all"]
    assert scan_dataset("digits-groups", DataConfig())["groups"] == ["red", "green", "blue"]
    with pytest.raises(DataError, match="unknown dataset 'digits-xx'"):
        scan_dataset("digits-xx", DataConfig())


def test_scan_dataset_refuses_what_prepare_refuses(memory_url, outside):
    cfg = DataConfig()
    with pytest.raises(DataError, match="dataset not found: memory://nowhere"):
        scan_dataset("memory://nowhere", cfg)
    src = memory_url + "/no-test"
    class_folders(src, {"train": {"a": 2, "b": 2}})
    with pytest.raises(DataError, match=rf"dataset {src}: no test split \({src}/test\)"):
        scan_dataset(src, cfg)
    src = memory_url + "/unknown"
    class_folders(src, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "zebra": 1}})
    with pytest.raises(DataError, match=rf"{src}/test/zebra: class 'zebra' in split 'test' is not in the class list"):
        scan_dataset(src, cfg)
    src = memory_url + "/empty"
    _split_files(src, ["x.png 0", "x.png 2"], ["x.png 0"])
    storage.write_text(storage.join(src, "classes.txt"), "a\nb\nc\n")
    with pytest.raises(DataError, match=rf"dataset {src}: empty class 'b' \(label 1\) has no training images"):
        scan_dataset(src, cfg)
    _split_files(outside, ["x.png 0", "../../outside.png 1"], ["x.png 0"])
    with pytest.raises(DataError, match=r"train.txt:2: path '../../outside.png' leaves the dataset root"):
        scan_dataset(outside, cfg)


def test_unreadable_split_and_metadata_files_are_named(memory_url):
    cfg = DataConfig()
    src = memory_url + "/latin1"
    _split_files(src, ["x.png 0", "x.png 1"], ["x.png 0"])
    storage.write_bytes(storage.join(src, "test.txt"), "caf\xe9.png 0\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{src}/test.txt: cannot read \(UnicodeDecodeError: "):
        scan_dataset(src, cfg)
    src = memory_url + "/dup"
    _split_files(src, ["x.png 0", "x.png 1"], ["x.png 0"])
    storage.write_text(storage.join(src, "classes.txt"), "cat\ndog\ncat\n")
    with pytest.raises(DataError, match=rf"{src}/classes.txt:3: class 'cat' repeats line 1"):
        scan_dataset(src, cfg)
    src = memory_url + "/short"
    _metadata_csv(src, ["x.png,cat,land,train", "x.png,dog"])
    with pytest.raises(DataError, match=rf"{src}/metadata.csv:3: expected 4 fields \(path, label, group, split\), "
                                        "got 2"):
        scan_dataset(src, cfg)
    src = memory_url + "/bom"  # a spreadsheet's byte-order mark is not part of the first column's name
    _metadata_csv(src, ["x.png,cat,land,train", "x.png,dog,land,train", "x.png,cat,land,test"])
    csv_url = storage.join(src, "metadata.csv")
    storage.write_bytes(csv_url, b"\xef\xbb\xbf" + storage.read_bytes(csv_url))
    assert scan_dataset(src, cfg)["num_classes"] == 2


# --- an offline gs:// dataset


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def test_unreachable_gcs_dataset_is_one_line_after_the_timeout(monkeypatch):
    import fsspec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon", "project": "test"})
    url = "gs://offline-bucket-feedback-synth/x"
    for call in (lambda: scan_dataset(url, DataConfig(dataset=url), timeout_s=1),
                 lambda: load_url_dataset(url, DataConfig(dataset=url), timeout_s=1)):
        start = time.monotonic()
        with pytest.raises(DataError) as exc:
            call()
        assert time.monotonic() - start < 5
        assert _one_line(exc) == (f"dataset {url} cannot be reached (no answer; check the network and credentials) "
                                  "after 1 s")


def test_prepared_info_is_unchanged_by_the_checks(memory_url):
    """The checks change nothing for a good dataset: shape, classes and counts as before."""
    src = memory_url + "/src"
    class_folders(src, {"train": {"cat": 5, "dog": 2}, "test": {"cat": 2, "dog": 2}})
    prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/out")
    info = load_info(memory_url + "/out")
    assert info.class_names == ["cat", "dog"] and info.train_class_counts == [5, 2] and info.image_shape == [8, 8, 1]


# --- stale outputs are never reused silently


def _stage_inputs(prepared, small_classifier, tmp_path):
    from feedback_synth.config import FeedbackConfig
    from feedback_synth.stages.extract_feedback import extract_feedback

    fb = str(tmp_path / "feedback")
    extract_feedback(prepared, small_classifier[1], fb, FeedbackConfig(budget_fraction=0.05, shard_size=8))
    return fb


@pytest.mark.slow
def test_a_finished_stage_with_the_same_fingerprint_is_resumed_and_another_is_refused(prepared, tmp_path):
    from feedback_synth.config import TrainConfig
    from feedback_synth.fingerprints import StaleOutputError
    from feedback_synth.stages.train_baseline import train_baseline

    out = str(tmp_path / "baseline")
    cfg = TrainConfig(model="test_resnet", epochs=1)
    first = train_baseline(prepared, out, cfg, DataConfig())
    weights = tmp_path / "baseline" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = train_baseline(prepared, out, cfg, DataConfig())
    assert again.summary["resumed"] and again.metrics == first.metrics and weights.stat().st_mtime_ns == stamp
    with pytest.raises(StaleOutputError) as err:
        train_baseline(prepared, out, TrainConfig(model="test_resnet", epochs=2, loss="balanced_softmax"),
                              DataConfig())
    msg = _one_line(err)
    assert "train_baseline config train.epochs: 1 -> 2" in msg and "train.loss: 'logit_adjusted' -> 'balanced_softmax'" in msg
    assert weights.stat().st_mtime_ns == stamp  # nothing overwritten
    redone = train_baseline(prepared, out, TrainConfig(model="test_resnet", epochs=2), DataConfig(),
                                   overwrite=True)
    assert "resumed" not in redone.summary and weights.stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_a_shard_made_with_another_config_is_refused_and_counts_are_checked(prepared, small_classifier,
                                                                              tiny_generator, tmp_path):
    from feedback_synth.config import GenerateConfig
    from feedback_synth.fingerprints import StaleOutputError
    from feedback_synth.generation.shards import load_generated, shard_url
    from feedback_synth.stages.generate_shard import generate
    from feedback_synth.synthesis.plan import GenerationPlan

    fb = _stage_inputs(prepared, small_classifier, tmp_path)
    gen = str(tmp_path / "generated")
    cfg = GenerateConfig(generator=tiny_generator, num_inference_steps=2, batch_size=8)
    generate(prepared, small_classifier[1], fb, gen, cfg, shard_ids=[0])
    with pytest.raises(StaleOutputError) as err:
        generate(prepared, small_classifier[1], fb, gen, GenerateConfig(
            generator=tiny_generator, num_inference_steps=2, batch_size=8, criterion="loss", seed=7), shard_ids=[0])
    msg = _one_line(err)
    assert "generate.criterion: 'entropy' -> 'loss'" in msg and "generate.seed: 0 -> 7" in msg
    generate(prepared, small_classifier[1], fb, gen, cfg)  # the rest of the plan, same config
    plan = GenerationPlan.load(f"{fb}/plan.json")
    train = load_split(prepared, "train")
    url = shard_url(gen, 0)
    rows = storage.read_text(f"{url}/metadata.csv").splitlines()
    storage.write_text(f"{url}/metadata.csv", "\n".join(rows[:-1]) + "\n")  # one row lost
    with pytest.raises(DataError, match="shard 0 of the plan has"):
        load_generated(gen, plan, train)


def test_generate_with_another_runs_data_or_an_unknown_shard_is_one_line(prepared, small_classifier, tiny_generator,
                                                                          tmp_path, capsys):
    from feedback_synth.cli.main import main

    fb = _stage_inputs(prepared, small_classifier, tmp_path)
    sets = ["--set", f"generate.generator={tiny_generator}", "--set", "generate.num_inference_steps=2"]
    base = ["generate", "--model", small_classifier[1], "--feedback", fb, "--output", str(tmp_path / "gen"), *sets]
    assert main([*base, "--data", prepared, "--shard", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard 99 is not in the plan" in err
    other = str(tmp_path / "groups-data")
    assert main(["prepare-data", "--dataset", "digits-groups", "--output", other]) == 0
    capsys.readouterr()
    assert main([*base, "--data", other]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was made from another dataset" in err


# --- found late: checked before any training


def _broken_generator(tmp_path, tiny_generator, keep: str) -> str:
    import shutil

    folder = tmp_path / f"gen-{keep.replace('/', '-')}"
    shutil.copytree(tiny_generator, folder)
    if keep == "no unet":
        shutil.rmtree(folder / "unet")
    elif keep == "unet config only":
        for f in (folder / "unet").iterdir():
            if f.name != "config.json":
                f.unlink()
    return str(folder)


@pytest.mark.parametrize("keep, message", [
    ("no unet", "is not a diffusers model of a kind this project knows"),
    ("unet config only", "unet/ has no weight file"),
])
def test_a_broken_generator_folder_stops_the_run_before_anything_is_written(tmp_path, tiny_generator, capsys,
                                                                             keep, message):
    from feedback_synth.cli.main import main

    folder = _broken_generator(tmp_path, tiny_generator, keep)
    out = tmp_path / "run"
    rc = main(["run", "--output", str(out), "--set", f"generate.generator={folder}", "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_a_generator_for_other_classes_is_refused_before_training(tmp_path, capsys):
    from builders import build_tiny_pixel_generator

    from feedback_synth.cli.main import main

    folder = build_tiny_pixel_generator(str(tmp_path / "gen7"), num_conditions=7)
    rc = main(["run", "--output", str(tmp_path / "run"), "--set", f"generate.generator={folder}",
               "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "is conditioned on 7 classes; the dataset has 10 classes" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, message", [
    ("cuad", "config field 'train.device': 'cuad' is not a device"),
    ("cuda:7", "cuda:7"),
])
def test_devices_are_checked_before_any_work(tmp_path, capsys, device, message):
    import torch

    from feedback_synth.cli.main import main

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    rc = main(["run", "--output", str(tmp_path / "run"), "--set", f"train.device={device}",
               "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "config field 'train.device'" in err and message in err and not (tmp_path / "run").exists()


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    from feedback_synth.cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["run", "--output", str(blocker / "run"), "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write to the output folder" in err and err.count("\n") == 1


# --- silent wrong results


@pytest.mark.slow
def test_filters_that_drop_every_image_stop_with_their_reasons(prepared, small_classifier, tiny_generator, tmp_path):
    from feedback_synth.config import FilterConfig, GenerateConfig
    from feedback_synth.stages.filter_synthetic import filter_synthetic
    from feedback_synth.stages.generate_shard import generate

    fb = _stage_inputs(prepared, small_classifier, tmp_path)
    gen = str(tmp_path / "generated")
    generate(prepared, small_classifier[1], fb, gen, GenerateConfig(generator=tiny_generator,
                                                                            num_inference_steps=2))
    strict = FilterConfig(filters=["degenerate", "off_support"], support_margin=1e-6, min_kept_fraction=0.0)
    out = tmp_path / "filtered"
    with pytest.raises(DataError) as err:
        filter_synthetic(prepared, small_classifier[1], fb, gen, str(out), strict)
    msg = _one_line(err)
    assert "the filters dropped all" in msg and "off_support" in msg and "filter_report.json" in msg
    assert (out / "filter_report.json").exists() and not (out / "synthetic.npz").exists()
    assert not (out / "_STAGE.json").exists()  # not a finished stage: nothing downstream can use it


# --- MLflow runs left RUNNING; signals


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(15, 143), (2, 130)])
def test_sigterm_and_sigint_close_the_runs_failed_with_one_line(tmp_path, tiny_generator, sig, code):
    import os
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    out = tmp_path / "run"
    sets = [a for s in ("train.model=test_resnet", "train.epochs=2000", f"generate.generator={tiny_generator}")
            for a in ("--set", s)]
    # the run keeps an inherited SIGINT ignore (nohup, a background job): start it as from a terminal
    proc = subprocess.Popen([sys.executable, "-m", "feedback_synth.cli", "run", "--output", str(out), *sets],
                            env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_stage_run(out, "train_baseline", proc)  # in the baseline's training, its stage run open
    proc.send_signal(signal.Signals(sig))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-2000:]
    lines = [line for line in err.splitlines()
             if line.startswith("feedback-synth: ") and not line.startswith("feedback-synth: MLflow run ")]
    assert lines[-1].startswith(("feedback-synth: terminated (SIGTERM)", "feedback-synth: interrupted (SIGINT)"))
    assert "Traceback" not in err
    client = MlflowClient(f"sqlite:///{out}/mlflow/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("feedback-synth").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parent] == ["FAILED"]
    assert "RUNNING" not in {r.info.status for r in runs}  # the stage runs too: FINISHED or FAILED


@pytest.mark.parametrize("point", ["_create_run", "_log_params"])
def test_a_signal_as_a_stage_run_opens_leaves_no_run_running(tmp_path, monkeypatch, point):
    """SIGTERM while a stage's run is being made (raised when MLflow's call returns) or while its
    params are logged: the stage run is closed FAILED, as the parent run is. Before the fix the run
    was made but not yet on the tracker's stack, so nothing closed it (it stayed RUNNING; seen when
    the signal test above started signalling as soon as the stage run existed)."""
    import os
    import signal

    from mlflow import MlflowClient

    from feedback_synth.config import TrackingConfig
    from feedback_synth.interrupts import Terminated, handled
    from feedback_synth.orchestration.run import make_tracker
    from feedback_synth.tracking.mlflow_tracker import MLflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = make_tracker(TrackingConfig(), str(tmp_path))
    tracker.start("run", {"train": {"epochs": 1}})
    real = getattr(MLflowTracker, point)

    def signalled(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if point == "_create_run":  # as if it arrived during MLflow's call: it waits until the call returns
            from feedback_synth.interrupts import deferred

            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        return out

    monkeypatch.setattr(MLflowTracker, point, signalled)
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN:  # handled() keeps an inherited ignore; this test needs the signal
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with handled(), pytest.raises(Terminated):
            with tracker.stage("train_baseline", {"epochs": 1}):
                pytest.fail("the stage ran although the signal came as its run opened")
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.setattr(MLflowTracker, point, real)
    tracker.finish("FAILED")
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("feedback-synth").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"run": "FAILED", "train_baseline": "FAILED"}


def test_a_signal_waits_for_the_tracking_call_to_return():
    """SIGINT/SIGTERM inside a tracking call (an MLflow write) is raised when the call returns, so
    that no SQLite transaction is left open for the calls that close the runs; a second one does not
    wait."""
    import os
    import signal

    from feedback_synth.interrupts import Terminated, deferred, handled
    from feedback_synth.tracking.client import mlflow_http

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in before.items():  # inherited ignores (nohup, a background job) are kept by handled():
        if handler is signal.SIG_IGN:  # this test needs the signals delivered
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    started = {sig: signal.getsignal(sig) for sig in before}
    try:
        done = []
        with handled():
            with pytest.raises(KeyboardInterrupt):
                with mlflow_http(0, 5):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)
                    done.append("the write")  # reached: the signal waited
            assert done == ["the write"]
            with pytest.raises(Terminated):
                with deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)
                    os.kill(os.getpid(), signal.SIGTERM)  # a second one: raised now
                    time.sleep(0.05)
                    done.append("never")
            assert done == ["the write"]
            with pytest.raises(Terminated):  # outside a tracking call: raised where the process is
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        assert {sig: signal.getsignal(sig) for sig in before} == started  # restored to what they were
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_command_ends_without_teardown_but_with_everything_written(tmp_path):
    """``feedback-synth`` skips the interpreter's module teardown (seconds with torch and MLflow
    loaded): the exit status, unflushed standard streams, a thread still writing and the at-exit
    handlers all survive it, and an error still exits 2 with its one line."""
    import subprocess
    import sys

    script = f"""
import atexit, sys, threading, time
from feedback_synth.interrupts import exit_without_teardown
atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))
def late():
    time.sleep(0.3)
    open({str(tmp_path / 'thread')!r}, 'w').write('joined')
threading.Thread(target=late).start()
sys.stdout.write('no newline, still buffered')
sys.stderr.write('stderr too')
exit_without_teardown(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "no newline, still buffered", "stderr too")
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    proc = subprocess.run([sys.executable, "-m", "feedback_synth.cli", "run", "--output", str(tmp_path / "run"),
                           "--set", "train.epochs=0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("feedback-synth: error: ")
    assert "train.epochs" in proc.stderr


@pytest.mark.parametrize("root", ["memory://marker-moves", "runs"])
def test_a_stage_marker_finds_what_it_names_after_the_run_folder_moved(root, monkeypatch, tmp_path):
    """A resumed stage's artifacts and datasets inside the run resolve where the run folder went
    (another bucket, another disk); a dataset outside the run stays where it was."""
    from feedback_synth.stages.result import StageResult

    monkeypatch.chdir(tmp_path)
    outside = f"{root}-data/digits"
    for url in (f"{root}/a/retrained/per_class.png", f"{root}/a/data/info.json", f"{root}/a/filtered/synthetic.npz",
                f"{outside}/info.json"):
        storage.write_text(url, "x")
    result = StageResult("retrain", artifacts=[f"{root}/a/retrained/per_class.png"],
                         datasets=[{"url": f"{root}/a/data", "splits": ["train"]},
                                   {"synthetic": f"{root}/a/filtered", "plan": None, "name": "digits"},
                                   {"url": outside, "splits": ["test"]}])
    marker = result.to_dict(f"{root}/a/retrained")
    assert marker["relative"]["artifacts"] == ["per_class.png"]
    assert marker["relative"]["datasets"][:2] == [{"url": "../data"}, {"synthetic": "../filtered"}]
    assert StageResult.from_dict(marker, f"{root}/a/retrained") == result  # not moved
    fs, path = storage.fs_and_path(f"{root}/a")
    fs.mv(path, storage.fs_and_path(f"{root}/b")[1], recursive=True)
    moved = StageResult.from_dict(marker, f"{root}/b/retrained")
    assert moved.artifacts == [f"{root}/b/retrained/per_class.png"]
    assert [d.get("url") or d.get("synthetic") for d in moved.datasets] == [f"{root}/b/data", f"{root}/b/filtered",
                                                                           outside]
    # a stage that runs after the move reads the filter report's plan where it went
    from feedback_synth.tracking.descriptors import synthetic_set

    storage.write_text(f"{root}/b/feedback/plan.json", "{}")
    storage.write_json(f"{root}/b/filtered/filter_report.json", {"plan": f"{root}/a/feedback/plan.json",
                                                                 "plan_path": "../feedback/plan.json"})
    assert synthetic_set(f"{root}/b/filtered", "training", "digits")["plan"] == f"{root}/b/feedback/plan.json"
