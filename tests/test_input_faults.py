"""Bad input found by an adversarial user (issue 19): each refused or reported with one line, in the
place the user meets it (the ``feedback-synth`` command), and before anything is written when it can be."""
from __future__ import annotations

import io as _io
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from builders import class_folders, colour_png, png
from PIL import Image

from feedback_synth import storage
from feedback_synth.cli.main import main

SOURCES_LOGGER = "feedback_synth.data.sources"
PREPARE_LOGGER = "feedback_synth.data.prepare"
NO_TRACKING = ["--set", "tracking.enabled=false"]


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("feedback-synth: error: ") and "Traceback" not in err, err
    return err


def _nothing_written(folder) -> bool:
    return not os.path.exists(folder) or not os.listdir(folder)


@pytest.fixture(scope="module")
def generator_2_classes(tmp_path_factory):
    """A tiny random-weight pixel generator: 1 channel, 16x16, 2 classes (+ the null class)."""
    from builders import build_tiny_pixel_generator

    return build_tiny_pixel_generator(str(tmp_path_factory.mktemp("gen2")), num_conditions=2)


# --- 1. 16-bit images


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(memory_url, caplog, capsys):
    src, out = memory_url + "/src", memory_url + "/out"
    class_folders(src, {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    deep = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 455)  # 0 .. 65065: every shade of grey
    buf = _io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    assert Image.open(_io.BytesIO(buf.getvalue())).mode.startswith("I")
    storage.write_bytes(storage.join(src, "train", "a", "zz-16bit.png"), buf.getvalue())
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        assert main(["prepare-data", "--dataset", src, "--output", out, "--set", "data.image_size=12"]) == 0
    capsys.readouterr()
    from feedback_synth.data.imageset import load_split

    train = load_split(out, "train")
    got = train.images[[i for i, f in enumerate(train.ids) if f.endswith("zz-16bit.png")][0], ..., 0]
    assert np.abs(got.astype(int) - np.round(deep / 257.0)).max() <= 1, np.unique(got)[:10]
    assert len(np.unique(got)) > 100  # not clipped to 0 and 255
    warnings = _warnings(caplog, SOURCES_LOGGER)
    assert len(warnings) == 1 and "mixes image modes" in warnings[0] and "16-bit" in warnings[0], warnings


# --- 2. a symbolic link out of the dataset root


@pytest.mark.parametrize("layout", ["class-folders", "split-files", "linked-folder"])
def test_a_symlink_out_of_the_dataset_root_is_refused(tmp_path, capsys, layout):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(99))
    src = tmp_path / "src"
    class_folders(str(src), {"train": {"1": 2, "2": 2}, "test": {"1": 1, "2": 1}})
    if layout == "class-folders":
        (src / "train" / "3").mkdir()
        (src / "train" / "3" / "link.png").symlink_to(outside / "secret.png")
        (src / "train" / "2" / "inside.png").symlink_to(src / "train" / "1" / "0.png")  # inside: allowed
        bad = "train/3/link.png"
    elif layout == "split-files":
        (src / "link.png").symlink_to(outside / "secret.png")
        (src / "train.txt").write_text("train/1/0.png 0\ntrain/2/0.png 1\nlink.png 1\n")
        (src / "test.txt").write_text("test/1/0.png 0\n")
        bad = "link.png"
    else:
        (src / "train" / "3").symlink_to(outside)
        bad = "train/3/secret.png"
    url = f"file://{src}" if layout == "split-files" else str(src)
    rc = main(["prepare-data", "--dataset", url, "--output", str(tmp_path / "out")])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"path '{bad}' leaves the dataset root {url}" in err, err
    assert _nothing_written(tmp_path / "out")


# --- 3. the generator's channels and image size, checked at pre-flight


def test_a_colour_image_in_a_grey_dataset_is_refused_at_preflight(tmp_path, generator_2_classes, capsys):
    src = tmp_path / "src"
    class_folders(str(src), {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    (src / "train" / "b" / "colour.png").write_bytes(colour_png())
    out = tmp_path / "run"
    rc = main(["run", "--dataset", str(src), "--output", str(out), "--set", f"generate.generator={generator_2_classes}",
               *NO_TRACKING])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "1-channel" in err and "3 channels" in err and "data.channels" in err, err
    assert not out.exists()
    # data.channels=1 is the way out: the run passes pre-flight (stopped here by an unknown model)
    rc = main(["run", "--dataset", str(src), "--output", str(out), "--set", f"generate.generator={generator_2_classes}",
               "--set", "data.channels=1", "--set", "train.model=no_such_model", *NO_TRACKING])
    assert rc == 2 and "unknown timm model" in capsys.readouterr().err and not out.exists()


def test_an_image_size_the_generator_does_not_make_is_refused_at_preflight(tmp_path, generator_2_classes, capsys):
    src = tmp_path / "src"
    class_folders(str(src), {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    out = tmp_path / "run"
    rc = main(["run", "--dataset", str(src), "--output", str(out), "--set", f"generate.generator={generator_2_classes}",
               "--set", "data.image_size=32", *NO_TRACKING])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "16x16" in err and "32" in err and "data.image_size" in err, err
    assert not out.exists()


# --- 4. bad images refused at pre-flight, before anything is written


def _bomb_png() -> bytes:
    buf = _io.BytesIO()
    Image.new("1", (20000, 10000)).save(buf, format="PNG")  # 200 Mpx in ~24 kB
    return buf.getvalue()


@pytest.mark.parametrize("fault, message", [
    ("corrupt", "corrupt or unreadable image: .*train/b/bad.png"),
    ("truncated", "corrupt or unreadable image: .*train/b/bad.png"),
    ("missing", "image not found or unreadable: .*train/b/bad.png"),
    ("bomb", "corrupt or unreadable image: .*train/b/bad.png .*decompression bomb"),
])
def test_a_bad_image_is_refused_at_preflight(tmp_path, generator_2_classes, capsys, fault, message):
    import re

    src = tmp_path / "src"
    class_folders(str(src), {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    lines = {split: [f"{split}/{c}/{i}.png {y}" for y, c in enumerate("ab") for i in range(n)]
             for split, n in (("train", 3), ("test", 1))}
    lines["train"].append("train/b/bad.png 1")
    for split, ls in lines.items():
        (src / f"{split}.txt").write_text("\n".join(ls) + "\n")
    good = png(40)
    data = {"corrupt": b"\x89PNG not really", "truncated": good[:len(good) // 2], "bomb": _bomb_png()}.get(fault)
    if data is not None:
        (src / "train" / "b" / "bad.png").write_bytes(data)
    out = tmp_path / "run"
    rc = main(["run", "--dataset", str(src), "--output", str(out), "--set", f"generate.generator={generator_2_classes}",
               *NO_TRACKING])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and re.search(message, err), err
    assert _nothing_written(out)


# --- 5. an inherited SIGINT ignore is kept


def test_an_ignored_sigint_stays_ignored_inside_the_handlers():
    """``trap "" INT; exec ...`` (nohup, a background job): the handlers leave an ignored signal alone."""
    code = ("import os, signal, time\n"
            "from feedback_synth.interrupts import handled\n"
            "with handled():\n"
            "    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.2)\n"
            "    print('still running')\n"
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    proc = subprocess.run(["bash", "-c", f'trap "" INT; exec "{sys.executable}" -c "$0"', code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["still", "running", "True"], proc.stderr[-2000:]


@pytest.mark.slow
def test_kill_int_does_not_stop_a_run_that_ignores_sigint(tmp_path):
    out = tmp_path / "run"
    sets = [a for s in ("train.model=test_resnet", "train.epochs=2000", "tracking.enabled=false") for a in ("--set", s)]
    cmd = " ".join([f'"{sys.executable}"', "-m", "feedback_synth.cli", "run", "--output", str(out), *sets])
    proc = subprocess.Popen(["bash", "-c", f'trap "" INT; exec {cmd}'], env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "run.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)  # the exec'd process: kill -INT
        time.sleep(3)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 143, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- 6. one-liners


def test_an_infinite_learning_rate_is_refused(tmp_path, capsys):
    rc = main(["run", "--output", str(tmp_path / "run"), "--set", "train.lr=.inf", *NO_TRACKING])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "'train.lr'" in err and not (tmp_path / "run").exists()


def test_a_loss_that_turns_nan_stops_training_with_one_line(prepared, tmp_path, capsys):
    rc = main(["train-baseline", "--data", prepared, "--output", str(tmp_path / "baseline"), "--set",
               "train.model=test_resnet", "--set", "train.epochs=2", "--set", "train.lr=1.0e+30"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "epoch 1" in err and "train.lr" in err and "lower" in err, err
    assert not (tmp_path / "baseline" / "model").exists()


def test_compare_refuses_an_output_folder_without_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    typo = tmp_path / "rnus" / "mine"
    rc = main(["compare", "--output", str(typo)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(typo) in err and "no run" in err, err
    assert not (tmp_path / "rnus").exists()
    (tmp_path / "empty").mkdir()
    assert main(["compare", "--output", str(tmp_path / "empty")]) == 2
    assert "no run" in capsys.readouterr().err and not os.listdir(tmp_path / "empty")


def test_a_class_missing_from_the_test_split_is_warned_about(memory_url, caplog, capsys):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 2, "b": 2, "c": 2, "d": 2}, "test": {"a": 1, "c": 1}})
    with caplog.at_level(logging.WARNING, logger=PREPARE_LOGGER):
        assert main(["prepare-data", "--dataset", src, "--output", memory_url + "/out"]) == 0
    capsys.readouterr()
    warnings = _warnings(caplog, PREPARE_LOGGER)
    assert len(warnings) == 1 and "'b', 'd'" in warnings[0] and "test" in warnings[0], warnings
    assert "\n" not in warnings[0]


def test_an_invalid_yaml_config_is_one_line_with_its_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    rc = main(["prepare-data", "--config", str(bad), "--output", str(tmp_path / "out")])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(bad) in err and "not valid YAML" in err and "line 4" in err and "column" in err, err


def test_images_of_different_sizes_are_resized_with_one_warning(memory_url, caplog, capsys):
    src = memory_url + "/src"
    class_folders(src, {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    storage.write_bytes(storage.join(src, "train", "a", "big.png"), png(30, (20, 14)))
    storage.write_bytes(storage.join(src, "test", "b", "big.png"), png(30, 24))
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOGGER):
        assert main(["prepare-data", "--dataset", src, "--output", memory_url + "/out",
                     "--set", "data.image_size=12"]) == 0
    capsys.readouterr()
    warnings = _warnings(caplog, SOURCES_LOGGER)
    assert len(warnings) == 1 and "resized 2 images" in warnings[0] and "12x12" in warnings[0], warnings
