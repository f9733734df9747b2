"""Adapting the generator to the task (generation.adapt, adapt_generator) on tiny parts built
from config, and the gap measures (synthesis.gap)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from feedback_synth import storage
from feedback_synth.config import AdaptConfig, FilterConfig, GenerateConfig
from feedback_synth.errors import ConfigError
from feedback_synth.generation.loading import class_index, load_generator
from feedback_synth.stages.adapt_generator import adapt_generator
from feedback_synth.synthesis import gap
from feedback_synth.synthesis.gap_checks import GapError, check_gap

FAST_GEN = dict(num_inference_steps=4, criterion="none")


def _unet_state(folder: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_generator(folder, device="cpu").unet.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_pixel_generator_is_adapted_and_loads_like_any_folder(method, prepared, small_classifier, tiny_generator,
                                                              tmp_path):
    out = str(tmp_path / "adapted")
    cfg = AdaptConfig(method=method, steps=4, batch_size=8, samples_per_class=2, rank=2, lr=1e-2)
    result = adapt_generator(prepared, small_classifier[1], out, cfg,
                                    GenerateConfig(generator=tiny_generator, **FAST_GEN))
    folder = result.summary["generator"]
    assert folder == storage.join(out, "generator")
    before, after = _unet_state(tiny_generator), _unet_state(folder)
    assert set(before) == set(after)  # a plain diffusers UNet: LoRA merged in, no adapter keys left
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and (method == "full" or all(("attention" in k or "resnets" in k) for k in changed))
    if method == "lora":
        assert storage.exists(storage.join(folder, "lora", "pytorch_lora_weights.safetensors"))
    report = storage.read_json(storage.join(out, "adapt_report.json"))
    assert len(report["losses"]) == 4 and report["method"] == method
    for when in ("before", "after"):
        per_class = report[when]["near_copy"]["per_class"]
        assert len(per_class) == 10 and all(0 <= v <= 1 for v in per_class)
        assert 0 <= report[when]["discriminator"]["overall"] <= 1
    for name in ("loss.png", "samples_before_after.png", "gap_per_class.png"):
        assert storage.read_bytes(storage.join(out, name))[:4] == b"\x89PNG"
    assert result.metrics["off_support_before"] >= 0 and "near_copy_after" in result.metrics
    # the adapted generator keeps the generator's class names, and carries the task's
    meta = storage.read_json(storage.join(folder, "generator.json"))
    assert meta["task_class_names"] == [str(c) for c in range(10)] and meta["adapted_from"] == tiny_generator
    # the same stage again resumes from its fingerprint
    again = adapt_generator(prepared, small_classifier[1], out, cfg,
                                   GenerateConfig(generator=tiny_generator, **FAST_GEN))
    assert again.summary["resumed"] and again.summary["generator"] == folder


def test_method_none_names_the_original_generator(prepared, small_classifier, tmp_path):
    result = adapt_generator(prepared, small_classifier[1], str(tmp_path / "a"), AdaptConfig(),
                                    GenerateConfig(generator="builtin"))
    assert result.summary == {"generator": "builtin", "method": "none"}
    assert not os.path.exists(tmp_path / "a")
    from feedback_synth.config import RunConfig
    from feedback_synth.orchestration.stage_table import generate_config

    assert generate_config(RunConfig(), "/x/adapted") == GenerateConfig()  # adapt.method none: the generator as given
    adapted = RunConfig(adapt=AdaptConfig(method="full"))
    assert generate_config(adapted, "/x/adapted").generator == "/x/adapted/generator"


@pytest.mark.slow
def test_the_class_condition_is_dropped_or_kept(prepared, tiny_generator):
    """'drop' trains only the null class's embedding row (style from every class); 'keep' trains the
    rows of the classes too."""
    from feedback_synth.data.imageset import load_split
    from feedback_synth.generation.adapt import adapt_unet
    from feedback_synth.generation.adapters import adapter_of

    train = load_split(prepared, "train")
    rows = {}
    for mode in ("drop", "keep"):
        pipe = load_generator(tiny_generator, device="cpu")
        start = pipe.unet.class_embedding.weight.detach().clone()
        losses = adapt_unet(pipe, adapter_of(pipe).name, train, AdaptConfig(method="full", steps=3, batch_size=8,
                                                                              class_condition=mode), list(range(10)))
        assert len(losses) == 3 and all(np.isfinite(losses))
        moved = (pipe.unet.class_embedding.weight - start).abs().sum(1) > 0
        rows[mode] = moved.nonzero().flatten().tolist()
    assert rows["drop"] == [10]  # the null class only
    assert set(rows["keep"]) <= set(range(10)) and rows["keep"]


@pytest.mark.slow
def test_latent_generator_is_adapted_with_lora_and_loaded_with_diffusers_lora_methods(prepared, tmp_path):
    """A tiny Stable-Diffusion-style folder: LoRA through unet.add_adapter, saved as diffusers' LoRA
    file beside a reference to the base folder; load_generator puts it back with load_lora_adapter."""
    from builders import build_tiny_text_model

    from feedback_synth.data.imageset import load_split
    from feedback_synth.generation.adapt import adapt_unet, save_adapted

    base = str(tmp_path / "sd")
    build_tiny_text_model(base)
    train = load_split(prepared, "train")
    pipe = load_generator(base, device="cpu")
    losses = adapt_unet(pipe, "text", train, AdaptConfig(method="lora", steps=2, batch_size=4, rank=2,
                                                         layers="attention", class_condition="mixed"),
                        list(range(10)))
    assert len(losses) == 2
    out = str(tmp_path / "adapted")
    save_adapted(pipe, "text", "lora", base, out, {"task_class_names": train.class_names})
    assert storage.exists(storage.join(out, "pytorch_lora_weights.safetensors"))
    with pytest.raises(ConfigError, match="'full' is for the small pixel generators"):
        save_adapted(pipe, "text", "full", base, str(tmp_path / "x"), {})
    for name, p in pipe.unet.named_parameters():  # 2 small steps barely move B from 0: make the LoRA visible
        if "lora_B" in name:
            p.data.normal_()
    save_adapted(pipe, "text", "lora", base, out, {"task_class_names": train.class_names})
    reloaded, fresh = load_generator(out, device="cpu"), load_generator(base, device="cpu")
    before, after = dict(fresh.unet.named_parameters()), dict(reloaded.unet.named_parameters())
    assert set(before) == set(after)  # fused and unloaded: a plain UNet again
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0")) for k in changed)


@pytest.mark.slow
def test_adapt_resumes_after_a_kill(prepared, small_classifier, tiny_generator, tmp_path):
    """SIGKILL in the middle of adapt_generator leaves no marker: the re-run redoes the stage and
    finishes; nothing half-written is taken for done."""
    out = str(tmp_path / "adapted")
    script = (f"from feedback_synth.stages.adapt_generator import adapt_generator\n"
              f"from feedback_synth.config import AdaptConfig, GenerateConfig\n"
              f"adapt_generator({prepared!r}, {small_classifier[1]!r}, {out!r}, "
              f"AdaptConfig(method='full', steps=100000, batch_size=4, samples_per_class=1), "
              f"GenerateConfig(generator={tiny_generator!r}, num_inference_steps=2, criterion='none'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # its progress bar says when it trains
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        seen, deadline = "", time.time() + 240
        while time.time() < deadline and "loss=" not in seen and proc.poll() is None:
            seen += proc.stderr.read(1) or ""  # tqdm ends its lines with a carriage return
        assert "loss=" in seen, seen[-2000:]
    finally:
        proc.kill()
        proc.wait()
    assert not storage.exists(storage.join(out, "_STAGE.json"))
    cfg = AdaptConfig(method="full", steps=2, batch_size=4, samples_per_class=1)
    result = adapt_generator(prepared, small_classifier[1], out, cfg,
                                    GenerateConfig(generator=tiny_generator, num_inference_steps=2, criterion="none"))
    assert not result.summary.get("resumed") and storage.exists(storage.join(out, "_STAGE.json"))
    assert storage.read_json(storage.join(out, "_STAGE.json"))["result"]["seconds"] > 0  # the work's time
    assert load_generator(result.summary["generator"], device="cpu").unet is not None


def test_generator_classes_are_matched_by_name(tmp_path, tiny_generator):
    names = [str(c) for c in range(10)]
    assert class_index(tiny_generator, names) == list(range(10))  # a folder that lists no classes: in order
    listed = str(tmp_path / "listed")
    storage.write_json(storage.join(listed, "generator.json"), {"class_names": names})
    tiny_generator = listed
    shuffled = ["3", "0", "1", "2", "4", "5", "6", "7", "8", "9"]  # e.g. a renamed folder sorts elsewhere
    assert class_index(tiny_generator, shuffled) == [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]
    renamed = ["0", "1", "2", "three é 数", "4", "5", "6", "7", "8", "9"]
    with pytest.raises(ConfigError, match="has no class 'three é 数'.*generate.class_map"):
        class_index(tiny_generator, sorted(renamed))
    mapped = class_index(tiny_generator, sorted(renamed), {"three é 数": "3"})
    assert mapped[sorted(renamed).index("three é 数")] == 3
    with pytest.raises(ConfigError, match="'generate.class_map'"):
        class_index(tiny_generator, names, {"seven": "7"})


def test_near_copies_and_diversity_in_pixels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    base = rng.integers(40, 215, (4, 8, 8, 1))
    def draw(c, n, noise):  # a class's images: its pattern plus noise
        return np.clip(base[c] + rng.normal(0, noise, (n, 8, 8, 1)), 0, 255).astype(np.uint8)
    real = np.concatenate([draw(c, 10, 15) for c in range(4)])
    copies = real[labels == 1][:5]  # class 1: exact copies of real images
    fresh = draw(2, 5, 15)  # class 2: new images of the class, as far from the real ones as they are apart
    synth, synth_labels = np.concatenate([copies, fresh]), np.array([1] * 5 + [2] * 5)
    share = gap.near_copy_share(synth, synth_labels, real, labels, 4)
    assert share["per_class"][0] is None and share["per_class"][3] is None
    assert share["per_class"][1] == 1.0 and share["per_class"][2] <= 0.6
    div = gap.diversity(np.concatenate([np.repeat(fresh[:1], 5, 0), fresh]), synth_labels, real, labels, 4)
    assert div["per_class"][1] == 0.0 and 0.8 < div["per_class"][2] < 1.25  # as varied as the real images


def test_the_discriminator_tells_shifted_features_apart_and_not_same_ones():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    labels = np.repeat(np.arange(2), 100)
    same = gap.discriminator_gap(real, labels, rng.normal(size=(200, 8)), labels, 2)
    shifted = gap.discriminator_gap(real, labels, rng.normal(size=(200, 8)) + 3.0, labels, 2)
    assert abs(same["overall"] - 0.5) < 0.1 and shifted["overall"] > 0.95
    assert len(shifted["per_class"]) == 2 and min(shifted["per_class"]) > 0.9


def test_the_early_gap_warning_names_the_classes_and_can_stop(caplog):
    report = {"per_class": {"a": {}, "b": {}, "c": {}},
              "gap": {"off_support": {"per_class": [0.9, 0.2, None], "overall": 0.55}}}
    off = check_gap(report, FilterConfig(), "table.md")
    assert off == ["a (90%)"] and "a (90%)" in caplog.text and "adapt.method" in caplog.text
    with pytest.raises(GapError, match=r"a \(90%\).*filter.on_gap: stop"):
        check_gap(report, FilterConfig(on_gap="stop"), "table.md")
    assert check_gap(report, FilterConfig(gap_share=0.95), "table.md") == []
