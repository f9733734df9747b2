"""A run's output and the pilot's grid under the second adversarial run (issue 25, items 1-3, 13, 15,
16, 20-26, 30, 31): each through the ``feedback-synth`` command, on real files (a real read-only
file system where one is concerned), real processes where a PID or a signal is."""
from __future__ import annotations

import io as _io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from feedback_synth.cli.main import main
from feedback_synth.orchestration.run import LOCK_FILE

QUICK = ["train.model=test_resnet", "train.epochs=1", "retrain.epochs=1", "feedback.budget_fraction=0.1",
         "generate.num_inference_steps=4", "tracking.enabled=false"]


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _run(out, generator, *extra: str, verb: str = "run", flags: tuple[str, ...] = ()) -> int:
    return main([verb, "--output", str(out), *flags, *_sets(*QUICK, f"generate.generator={generator}", *extra)])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("feedback-synth: error: ") and "Traceback" not in err, err
    return err


def _files(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _png(value: int) -> bytes:
    arr = np.full((16, 16), value % 256, np.uint8)
    arr[2:6, 3:9] = 255 - value % 256
    buf = _io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def _dataset(root, classes: list[str], per_class: int = 4) -> str:
    """``root/{train,val,test}/<class>/i.png``, 16x16 grey, every file different."""
    value = 0
    for split, n in (("train", per_class), ("val", 2), ("test", 2)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                value += 1
                (root / split / cls / f"{i}.png").write_bytes(_png(value))
    return str(root)


@pytest.fixture(scope="module")
def named_generator(tmp_path_factory):
    """A tiny pixel generator of 10 classes named 'a'..'j' (its generator.json)."""
    from builders import build_tiny_pixel_generator

    folder = build_tiny_pixel_generator(str(tmp_path_factory.mktemp("gen-named")), num_conditions=10)
    meta_file = os.path.join(folder, "generator.json")
    with open(meta_file) as f:
        meta = json.load(f)
    with open(meta_file, "w") as f:
        json.dump({**meta, "class_names": list("abcdefghij")}, f)
    return folder


# --- 1, 16: a config.yaml of the user's in --output


@pytest.mark.parametrize("text", ["# my notes\ntrain:\n  epochs: 2\n", "{{ not: yaml: at all\n\t- x"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_config_yaml_is_refused_in_one_line_and_never_overwritten(tmp_path, tiny_generator, capsys, text,
                                                                          overwrite):
    out = tmp_path / "u3"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    assert _run(out, tiny_generator, flags=("--overwrite",) if overwrite else ()) == 2
    err = _one_line(capsys)
    assert "holds a config.yaml that no run wrote" in err and len(err) < 300, err
    assert (out / "config.yaml").read_text() == text
    assert os.listdir(out) == ["config.yaml"]  # no lock file, no run.json left in the user's folder


def test_a_config_yaml_that_is_not_yaml_beside_a_run_json_is_one_line(tmp_path, tiny_generator, capsys):
    out = tmp_path / "u4"
    out.mkdir()
    (out / "config.yaml").write_text("{{ not: yaml: at all\n\t- x")
    record = json.dumps({"pid": 1, "host": "elsewhere", "state": "finished", "started": "2020-01-01T00:00:00"})
    (out / "run.json").write_text(record)
    assert _run(out, tiny_generator) == 2
    assert "holds a config.yaml that is not a run's config" in _one_line(capsys)
    assert sorted(os.listdir(out)) == ["config.yaml", "run.json"] and (out / "run.json").read_text() == record


# --- 2: memory:// for a whole run


@pytest.mark.parametrize("verb, flags", [("run", ()), ("run", ("--runner", "kfp-local")), ("tune", ())])
def test_a_memory_output_is_refused_for_a_whole_run(tiny_generator, capsys, verb, flags):
    import fsspec

    assert _run("memory://x/run1", tiny_generator, verb=verb, flags=flags) == 2
    assert "memory:// folder is gone when this process ends" in _one_line(capsys)
    assert not fsspec.filesystem("memory").exists("memory://x/run1")


# --- 3, 30: --overwrite and a user's file in a shard folder; run.json's start time


@pytest.mark.slow
def test_overwrite_keeps_a_users_file_in_a_finished_shard_folder(tmp_path, tiny_generator, capsys):
    out = tmp_path / "run"
    t0 = time.time()
    assert _run(out, tiny_generator) == 0, capsys.readouterr().err
    started = time.mktime(time.strptime(json.loads((out / "run.json").read_text())["started"], "%Y-%m-%dT%H:%M:%S"))
    assert int(t0) <= started <= os.path.getmtime(out / "config.yaml")  # the claim's time, not the last write's
    shard = min((out / "generated" / "shards").iterdir())
    (shard / "NOTES.md").write_text("mine")
    assert _run(out, tiny_generator, "generate.seed=1", flags=("--overwrite",)) == 0, capsys.readouterr().err
    assert (shard / "NOTES.md").read_text() == "mine"
    assert {"images.npz", "metadata.csv", "_SUCCESS", "NOTES.md"} <= set(os.listdir(shard))  # the new run's shard


# --- 13, 22, 23, 24: the pilot's grid and --overwrite


@pytest.mark.parametrize("grid, message", [
    ("generate.scale=", "--grid generate.scale=: no values"),
    ("generate.bogus=1,2", "unknown config field 'generate.bogus'"),
    ("generate.criterion=entropy,confidence", "--grid generate.criterion=confidence: "),
    ("feedback.rounds=2", "--grid feedback.rounds: not a setting the pilot can try"),
])
def test_a_bad_grid_is_refused_before_any_work(tmp_path, tiny_generator, capsys, grid, message):
    out = tmp_path / "tune"
    assert _run(out, tiny_generator, verb="tune", flags=("--grid", grid)) == 2
    assert message in _one_line(capsys)
    assert not out.exists()


@pytest.mark.slow
def test_tune_overwrite_starts_over_and_keeps_the_users_files(tmp_path, tiny_generator, capsys):
    out = tmp_path / "tune"
    flags = ("--grid", "generate.strength=1.0", "--epochs", "1", "--folds", "2")
    assert _run(out, tiny_generator, verb="tune", flags=flags) == 0, capsys.readouterr().err
    (out / "data" / "NOTES.md").write_text("mine")
    capsys.readouterr()
    assert _run(out, tiny_generator, "data.split_seed=1", verb="tune", flags=flags) == 2  # another config: refused
    assert "--overwrite" in _one_line(capsys)
    assert _run(out, tiny_generator, "data.split_seed=1", verb="tune", flags=(*flags, "--overwrite")) == 0, \
        capsys.readouterr().err
    assert (out / "data" / "NOTES.md").read_text() == "mine"
    assert json.loads((out / "data" / "_STAGE.json").read_text())["config"]["split_seed"] == 1


# --- 15: an --output that cannot be written


@pytest.fixture
def read_only_output(tmp_path):
    """An existing output folder on a real read-only file system (a small tmpfs, remounted ro)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False,
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        yield mnt / "out"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("verb, flags", [("run", ()), ("run", ("--runner", "kfp-local")), ("tune", ())])
def test_an_output_on_a_read_only_file_system_is_one_line(read_only_output, tiny_generator, capsys, verb, flags):
    assert _run(read_only_output, tiny_generator, verb=verb, flags=flags) == 2
    err = _one_line(capsys)
    assert f"cannot write to the output folder {read_only_output}" in err and "Read-only file system" in err, err


def test_a_lock_file_that_cannot_be_made_is_one_line(tmp_path, tiny_generator, capsys):
    out = tmp_path / "out"
    (out / LOCK_FILE).mkdir(parents=True)  # creating the lock file fails, as on a read-only file system
    assert _run(out, tiny_generator) == 2
    assert f"cannot create its lock file {LOCK_FILE}: Is a directory" in _one_line(capsys)
    assert os.listdir(out) == [LOCK_FILE]


# --- 20: --output inside the dataset root


@pytest.mark.parametrize("verb", ["run", "tune"])
def test_an_output_inside_the_dataset_root_is_refused_in_preflight(tmp_path, named_generator, capsys, verb):
    src = _dataset(tmp_path / "mine", ["a", "b"])
    out = tmp_path / "mine" / "runs" / "r1"
    assert _run(out, named_generator, verb=verb, flags=("--dataset", src)) == 2
    assert f"--output {out} is inside the dataset root {src}" in _one_line(capsys)
    assert not (tmp_path / "mine" / "runs").exists()


# --- 21, 30: a crashed run's PID now another process's


@pytest.mark.slow
def test_a_resume_is_not_refused_when_the_old_pid_is_another_process(tmp_path, tiny_generator, capsys):
    out = tmp_path / "run"
    assert _run(out, tiny_generator) == 0, capsys.readouterr().err
    other = subprocess.Popen(["sleep", "120"])  # the crashed run's PID, reused after a reboot
    try:
        record = json.loads((out / "run.json").read_text())
        (out / "run.json").write_text(json.dumps({**record, "pid": other.pid, "host": socket.gethostname(),
                                                  "state": "running", "started": "2020-01-01T00:00:00"}))
        t0 = time.time()
        assert _run(out, tiny_generator) == 0, capsys.readouterr().err  # we hold the lock: the old run is gone
        record = json.loads((out / "run.json").read_text())
        assert record["state"] == "finished" and record["pid"] == os.getpid()
        assert time.mktime(time.strptime(record["started"], "%Y-%m-%dT%H:%M:%S")) >= int(t0)
    finally:
        other.kill()
        other.wait()


# --- 25, 26: the dataset's classes against the generator's, by name, in pre-flight


@pytest.mark.parametrize("classes, extra, message", [
    ([*"abcdefghi", "zz"], (), "has no class 'zz'"),  # as many classes as the generator's: one name differs
    ([*"abcdefghij"], ('generate.class_map={"q": "a"}',), "config field 'generate.class_map': ['q'] are not classes"),
])
def test_class_names_are_checked_in_preflight(tmp_path, named_generator, capsys, classes, extra, message):
    src = _dataset(tmp_path / "mine", classes, per_class=2)
    out = tmp_path / "run"
    assert _run(out, named_generator, *extra, flags=("--dataset", src)) == 2
    assert message in _one_line(capsys)
    assert not out.exists()  # found before any work


@pytest.mark.slow
def test_a_dataset_of_some_of_the_generators_classes_runs(tmp_path, named_generator, capsys):
    src = _dataset(tmp_path / "mine", ["b", "e", "h"], per_class=6)
    out = tmp_path / "run"
    assert _run(out, named_generator, "feedback.budget_fraction=0.5", flags=("--dataset", src)) == 0, \
        capsys.readouterr().err
    summary = json.loads((out / "report" / "run_summary.json").read_text())
    assert summary["generation"]["num_images"] > 0


# --- 31: an interrupt with tracking off says nothing of MLflow runs


@pytest.mark.slow
def test_an_interrupt_with_tracking_off_does_not_mention_mlflow_runs(tmp_path, tiny_generator):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "feedback_synth.cli", "run", "--output", str(out),
                             *_sets(*QUICK, "train.epochs=2000", f"generate.generator={tiny_generator}")],
                            env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (out / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last == "feedback-synth: interrupted (SIGINT): run the same command again to resume", err[-2000:]
