"""Generation shards: atomic commits, skip finished shards, redo half-written ones, reproducible."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from feedback_synth import storage
from feedback_synth.config import FeedbackConfig, GenerateConfig
from feedback_synth.errors import DataError
from feedback_synth.generation.shards import generate, load_generated, shard_done, shard_url
from feedback_synth.stages.extract_feedback import extract_feedback
from feedback_synth.stages.outputs import plan_url
from feedback_synth.synthesis.plan import GenerationPlan

FAST = dict(num_inference_steps=4, batch_size=16, criterion="entropy", scale=0.02, guide_every=2)


@pytest.fixture(scope="module")
def feedback_dir(prepared, small_classifier, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("feedback"))
    extract_feedback(prepared, small_classifier[1], out, FeedbackConfig(budget_fraction=0.1, shard_size=8))
    return out


def _generate(prepared, small_classifier, feedback_dir, tiny_generator, out, **kw):
    cfg = GenerateConfig(generator=tiny_generator, **{**FAST, **kw})
    return generate(plan_url(feedback_dir), prepared, small_classifier[1], feedback_dir, out, cfg)


@pytest.mark.slow
def test_generate_writes_shards_with_metadata(prepared, small_classifier, feedback_dir, tiny_generator, memory_url):
    summary = _generate(prepared, small_classifier, feedback_dir, tiny_generator, memory_url)
    plan = GenerationPlan.load(plan_url(feedback_dir))
    assert summary["num_images"] == plan.total and summary["skipped"] == 0
    from feedback_synth.data.imageset import load_split

    data, rows = load_generated(memory_url, plan, load_split(prepared, "train"))
    assert len(data) == plan.total and data.images.dtype == np.uint8
    assert {"class_index", "group_index", "seed", "criterion_value", "condition"} <= set(rows[0])
    assert all(r["condition"].startswith("digits:") for r in rows)  # each starts from a real image
    assert np.bincount(data.labels, minlength=10).tolist() == list(plan.counts.values())
    # a second run skips every shard and changes nothing
    again = _generate(prepared, small_classifier, feedback_dir, tiny_generator, memory_url)
    assert again["skipped"] == len(plan.shards)


@pytest.mark.slow
def test_half_written_shard_is_redone_identically(prepared, small_classifier, feedback_dir, tiny_generator, tmp_path):
    out = str(tmp_path / "gen")
    _generate(prepared, small_classifier, feedback_dir, tiny_generator, out)
    plan = GenerationPlan.load(plan_url(feedback_dir))
    from feedback_synth.data.imageset import load_split

    before, _ = load_generated(out, plan, load_split(prepared, "train"))
    # simulate a pod killed after writing images but before the commit marker
    victim = shard_url(out, 1)
    os.remove(os.path.join(victim, "_SUCCESS"))
    with open(os.path.join(victim, "images.npz"), "wb") as f:
        f.write(b"truncated")
    assert not shard_done(out, 1)
    with pytest.raises(DataError, match=r"shard\(s\) of the plan are not finished"):
        load_generated(out, plan, load_split(prepared, "train"))
    summary = _generate(prepared, small_classifier, feedback_dir, tiny_generator, out)
    assert summary["skipped"] == len(plan.shards) - 1
    after, _ = load_generated(out, plan, load_split(prepared, "train"))
    assert np.array_equal(before.images, after.images) and before.ids.tolist() == after.ids.tolist()


@pytest.mark.slow
def test_generation_on_gcs_emulator(prepared, small_classifier, feedback_dir, tiny_generator, gcs_bucket):
    out = gcs_bucket + "/generated"
    summary = _generate(prepared, small_classifier, feedback_dir, tiny_generator, out)
    assert summary["num_images"] > 0
    assert storage.exists(storage.join(shard_url(out, 0), "_SUCCESS"))


@pytest.mark.slow
def test_killed_generation_resumes_without_duplicates(prepared, small_classifier, feedback_dir, tiny_generator,
                                                      tmp_path):
    """SIGKILL a generation process mid-run, run it again: exactly the planned images, each once."""
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "feedback_synth.cli", "generate", "--data", prepared, "--model", small_classifier[1],
           "--feedback", feedback_dir, "--output", out, "--set", f"generate.generator={tiny_generator}",
           "--set", "generate.num_inference_steps=12", "--set", "generate.batch_size=4", "--set", "generate.guide_every=2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not shard_done(out, 0) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert shard_done(out, 0), proc.stderr.read().decode() if proc.poll() is not None else "no shard in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    plan = GenerationPlan.load(plan_url(feedback_dir))
    unfinished = [s.shard_id for s in plan.shards if not shard_done(out, s.shard_id)]
    assert unfinished, "the process finished before it was killed; the test proves nothing"
    from feedback_synth.cli.main import main

    assert main(cmd[3:]) == 0  # the re-run, in this process (the kill above needed one of its own)
    from feedback_synth.data.imageset import load_split

    data, rows = load_generated(out, plan, load_split(prepared, "train"))
    keys = [(r["class_index"], r["group_index"], r["image_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == plan.total
    assert all(r["finite"] for r in rows)
    assert not any(n.startswith("images.npz.tmp") for s in plan.shards for n in os.listdir(shard_url(out, s.shard_id)))
    # every image decoded above; the shard that was in progress at the kill is bit-identical to an
    # uninterrupted run of the resolved config
    from feedback_synth.config import from_dict

    cfg = from_dict(GenerateConfig, storage.read_json(storage.join(out, "generate_config.json")))
    ref = str(tmp_path / "uninterrupted")
    generate(plan_url(feedback_dir), prepared, small_classifier[1], feedback_dir, ref, cfg,
             shard_ids=[unfinished[0]])
    got, want = shard_url(out, unfinished[0]), shard_url(ref, unfinished[0])
    assert np.array_equal(storage.read_npz(storage.join(got, "images.npz"))["images"],
                          storage.read_npz(storage.join(want, "images.npz"))["images"])
    assert storage.read_text(storage.join(got, "metadata.csv")) == storage.read_text(storage.join(want, "metadata.csv"))
