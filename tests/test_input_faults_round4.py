"""Bad input found by the second adversarial run (issue 25, items 7-10, 14, 17, 18, 27-29, 32): each
refused with one line, or reported with one warning, where the user meets it (the ``feedback-synth``
command), on real files, and before anything is written when it is refused."""
from __future__ import annotations

import io as _io
import json
import logging
import os
import struct
import zlib

import pytest
from builders import class_folders, png
from PIL import Image

from feedback_synth.cli.main import main
from feedback_synth.config import resolve_run_config

SOURCES_LOGGER = "feedback_synth.data.sources"


SMALL = {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}


def _warnings(caplog, logger: str = SOURCES_LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("feedback-synth: error: ") and "Traceback" not in err, err
    return err


def _prepare(src, out, *sets: str) -> int:
    return main(["prepare-data", "--dataset", str(src), "--output", str(out),
                 *[a for s in sets for a in ("--set", s)]])


# --- 7. images of one uniform size are resized with a warning


def test_images_of_one_size_are_resized_with_one_warning(tmp_path, caplog, capsys):
    src = tmp_path / "src"
    class_folders(src, SMALL, size=28)
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        assert _prepare(src, tmp_path / "out") == 0  # data.image_size: 16 by default
    capsys.readouterr()
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "28x28" in warnings[0] and "16x16" in warnings[0] and "data.image_size" in warnings[0], warnings
    assert "8 images" in warnings[0] and "data.image_size=28" in warnings[0], warnings
    assert json.loads((tmp_path / "out" / "info.json").read_text())["image_shape"] == [16, 16, 1]

    caplog.clear()  # at their own size: nothing resized, nothing said
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        assert _prepare(src, tmp_path / "out28", "data.image_size=28") == 0
    capsys.readouterr()
    assert _warnings(caplog) == []


# --- 8. hidden and system folders are not classes; a class-count mismatch names the classes


def test_hidden_and_system_folders_are_not_classes(tmp_path, capsys):
    src = tmp_path / "src"
    class_folders(src, SMALL)
    junk = png(200)
    for folder in ("train/@eaDir", "train/.thumbnails", "train/__MACOSX", "test/.thumbnails",
                   "train/a/@eaDir/0.png", "train/a/.hidden"):
        (src / folder).mkdir(parents=True)
        (src / folder / "thumb.png").write_bytes(junk)
    (src / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (src / "train" / "b" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert _prepare(src, tmp_path / "out") == 0, capsys.readouterr().err
    capsys.readouterr()
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["class_names"] == ["a", "b"] and info["train_class_counts"] == [3, 3], info


def test_hidden_folders_are_not_domains(tmp_path, capsys):
    """NICO++-style ``<domain>/<class>/`` folders: a hidden or system folder is not a domain or a class."""
    src = tmp_path / "nico"
    value = 0
    for dom in ("autumn", "rock"):
        for cls in ("cat", "dog"):
            (src / dom / cls).mkdir(parents=True)
            for i in range(10):
                value += 1
                (src / dom / cls / f"{i}.png").write_bytes(png(value))
    for folder in ("@eaDir/cat", ".git/objects", "autumn/.thumbnails"):
        (src / folder).mkdir(parents=True)
        (src / folder / "x.png").write_bytes(png(250))
    assert _prepare(src, tmp_path / "out") == 0, capsys.readouterr().err
    capsys.readouterr()
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["class_names"] == ["cat", "dog"] and info["group_names"] == ["autumn", "rock"], info


@pytest.fixture(scope="module")
def generator_a_b(tmp_path_factory):
    """A tiny random-weight pixel generator (1 channel, 16x16) of the 2 classes 'a' and 'b'."""
    from builders import build_tiny_pixel_generator

    folder = build_tiny_pixel_generator(str(tmp_path_factory.mktemp("gen-ab")), num_conditions=2)
    meta_file = os.path.join(folder, "generator.json")
    meta = json.load(open(meta_file)) if os.path.exists(meta_file) else {}
    with open(meta_file, "w") as f:
        json.dump({**meta, "class_names": ["a", "b"]}, f)
    return folder


def test_a_class_count_mismatch_names_the_extra_class(tmp_path, capsys, generator_a_b):
    src = tmp_path / "src"
    class_folders(src, {"train": {"a": 3, "b": 3, "zebra": 2}, "test": {"a": 1, "b": 1}}, size=16)
    out = tmp_path / "run"
    rc = main(["run", "--dataset", str(src), "--output", str(out), "--set", f"generate.generator={generator_a_b}",
               "--set", "tracking.enabled=false"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is conditioned on 2 classes; the dataset has 3 classes" in err, err
    assert "not among the generator's: 'zebra'" in err, err
    assert not out.exists()


# --- 9. identical images in two splits (leakage)


def test_identical_images_in_train_and_test_warn_of_leakage(tmp_path, caplog, capsys):
    src = tmp_path / "src"
    class_folders(src, {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (src / "test" / "a" / "1.png").write_bytes((src / "train" / "b" / "2.png").read_bytes())  # even another label
    (src / "test" / "b" / "0.png").write_bytes((src / "train" / "b" / "0.png").read_bytes())
    (src / "val" / "a" / "0.png").write_bytes((src / "train" / "a" / "0.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        assert _prepare(src, tmp_path / "out") == 0
    capsys.readouterr()
    leaks = [w for w in _warnings(caplog) if "leakage" in w]
    assert len(leaks) == 1, _warnings(caplog)
    assert "3 images" in leaks[0] and "2 test = train" in leaks[0] and "1 val = train" in leaks[0], leaks
    assert "val/a/0.png = train/a/0.png" in leaks[0], leaks  # one example pair, relative to the dataset root

    caplog.clear()  # no file repeats: no warning
    clean = tmp_path / "clean"
    class_folders(clean, SMALL)
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        assert _prepare(clean, tmp_path / "out2", "data.image_size=12") == 0
    capsys.readouterr()
    assert _warnings(caplog) == []


# --- 10. duplicate YAML keys


@pytest.mark.parametrize("text, key, line", [
    ("train:\n  epochs: 2\ndata:\n  image_size: 16\ntrain:\n  lr: 0.1\n", "train", 5),
    ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "lr", 4),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, capsys, text, key, line):
    config = tmp_path / "my config.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    rc = main(["run", "--output", str(out), "--config", str(config)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(config) in err and f"duplicate key '{key}' on line {line}" in err, err
    assert not out.exists()


def test_a_duplicate_key_in_a_set_value_is_refused(tmp_path, capsys):
    rc = main(["run", "--output", str(tmp_path / "run"), "--set", "generate.class_map={a: '1', a: '2'}"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--set generate.class_map" in err and "duplicate key 'a'" in err, err


# --- 14. --config naming a folder or a file that is not UTF-8


def test_config_naming_a_directory_is_one_line(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    rc = main(["run", "--output", str(tmp_path / "run"), "--config", str(folder)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"config file {folder} is a directory" in err, err
    assert not (tmp_path / "run").exists()


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("train:\n  model: caf\u00e9\n".encode("latin-1"))
    rc = main(["run", "--output", str(tmp_path / "run"), "--config", str(config)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"config file {config} is not UTF-8" in err and "0xe9" in err, err
    assert not (tmp_path / "run").exists()


# --- 17, 27, 28. non-finite and unbounded numbers


@pytest.mark.parametrize("setting, field, what", [
    ("tracking.request_timeout_s=.inf", "tracking.request_timeout_s", "finite"),
    ("tracking.request_timeout_s=1e9", "tracking.request_timeout_s", "less than or equal to 3600"),
    ("train.tau=.inf", "train.tau", "finite"),
    ("train.tau=.nan", "train.tau", "finite"),
    ("retrain.tau=.inf", "retrain.tau", "finite"),
    ("tracking.retries=1000", "tracking.retries", "less than or equal to 10"),
])
def test_non_finite_or_unbounded_values_are_refused(tmp_path, capsys, setting, field, what):
    rc = main(["run", "--output", str(tmp_path / "run"), "--set", setting])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"config field '{field}'" in err and what in err and "train.lr" not in err, err
    assert not (tmp_path / "run").exists()


def test_an_infinite_timeout_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("tracking:\n  request_timeout_s: .inf\n")
    rc = main(["run", "--output", str(tmp_path / "run"), "--config", str(config)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "config field 'tracking.request_timeout_s': input should be a finite number" in err, err


# --- 18. scientific notation


def test_scientific_notation_is_a_number_in_set_and_yaml(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\nadapt:\n  lr: 1.0e-4\n")
    cfg = resolve_run_config(None, str(config), ["retrain.lr=2e-3", "filter.flat_threshold=1e-3"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.adapt.lr) == (0.001, 0.0005, 0.0001)
    assert (cfg.retrain.lr, cfg.filter.flat_threshold) == (0.002, 0.001)
    # the command line accepts it (prepare-data reads the whole config, as run does)
    src = tmp_path / "src"
    class_folders(src, SMALL)
    rc = _prepare(src, tmp_path / "out", "train.lr=1e-3", "adapt.lr=1e-4", "data.image_size=12")
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["prepare-data", "--dataset", str(src), "--output", str(tmp_path / "out2"), "--config", str(config),
               "--set", "data.image_size=12"])
    assert rc == 0, capsys.readouterr().err


def test_scientific_notation_in_a_tune_grid():
    from feedback_synth.orchestration.tune import parse_grid

    assert parse_grid(["train.lr=1e-3,2E-2", "adapt.lr=1.0e-4"]) == {"train.lr": [0.001, 0.02], "adapt.lr": [0.0001]}


@pytest.mark.parametrize("setting, message", [
    ("train.lr='0.1'", "config field 'train.lr': input should be a valid number, got '0.1'"),  # quoted: text
    ("train.lr='1e-3'", "config field 'train.lr': input should be a valid number, got '1e-3'"),
    ("train.epochs=1e1", "config field 'train.epochs': input should be a valid integer"),
    ("train.lr=1e", "config field 'train.lr': input should be a valid number, got '1e'"),
])
def test_strict_numbers_stay_strict(tmp_path, capsys, setting, message):
    rc = main(["run", "--output", str(tmp_path / "run"), "--set", setting])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and message in err, err


# --- 29, 32. an image that verify() passes but cannot be decoded; the error names the file


def _broken_zlib_png() -> bytes:
    """A PNG whose chunk CRCs are all valid but whose IDAT zlib stream is garbage."""
    data = png(77, 16)
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = bytearray(data[pos + 8:pos + 8 + n])
        if kind == b"IDAT":
            for i in range(2, len(body) - 4):  # keep the zlib header, break the deflate stream
                body[i] ^= 0x5A
        out += struct.pack(">I", n) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        pos += 12 + n
    bad = bytes(out)
    with Image.open(_io.BytesIO(bad)) as img:
        img.verify()  # passes: the chunks are intact
    return bad


def test_a_png_with_a_broken_stream_is_refused_in_preflight(tmp_path, capsys):
    src = tmp_path / "src"
    class_folders(src, SMALL)
    (src / "train" / "b" / "broken.png").write_bytes(_broken_zlib_png())
    out = tmp_path / "run"
    rc = main(["run", "--dataset", str(src), "--output", str(out), "--set", "tracking.enabled=false"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "corrupt or unreadable image" in err and "train/b/broken.png" in err, err
    assert not out.exists()  # refused by pre-flight: no run.json, no lock


@pytest.mark.parametrize("verb", ["prepare-data", "run"])
def test_an_unreadable_image_is_named_not_a_buffer(tmp_path, capsys, verb):
    src = tmp_path / "src"
    class_folders(src, SMALL)
    (src / "test" / "a" / "notes.png").write_bytes(b"these are my notes, not a picture")
    rc = main([verb, "--dataset", str(src), "--output", str(tmp_path / "out"), "--set", "tracking.enabled=false"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "test/a/notes.png" in err and "'notes.png'" in err, err
    assert "BytesIO" not in err and " at 0x" not in err, err
    assert not (tmp_path / "out").exists()
