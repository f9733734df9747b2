"""GPU performance options of the generate stage: mixed precision with a safe gradient path, SDPA
attention, torch.compile with padded (fixed-shape) batches, gradient checkpointing.

The CPU tests check that each option runs in float32-default CI and does not change what it must
not change; the ``gpu`` tests check the options where they matter (skipped without CUDA).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import build_tiny_text_model, build_tiny_unclip_model

from feedback_synth import storage
from feedback_synth.config import FeedbackConfig, GenerateConfig
from feedback_synth.errors import ConfigError
from feedback_synth.generation.performance import apply_performance_options, ensure_sdpa, pad_batch
from feedback_synth.generation.shards import generate_shard, read_metadata, shard_url
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, guided_step_indices
from feedback_synth.stages.extract_feedback import extract_feedback
from feedback_synth.stages.outputs import plan_url
from feedback_synth.synthesis.plan import GenerationPlan

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FAST = dict(num_inference_steps=4, criterion="entropy", scale=0.05, guide_every=2, strength=1.0)


@pytest.fixture(scope="module")
def feedback_dir(prepared, small_classifier, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("feedback"))
    extract_feedback(prepared, small_classifier[1], out, FeedbackConfig(budget_fraction=0.1, shard_size=7))
    return out


@pytest.fixture(scope="module")
def tiny_unclip_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-unclip"))
    build_tiny_unclip_model(path)
    return path


def _shard(prepared, small_classifier, feedback_dir, out, **kw):
    """Run shard 0 of the plan; returns its uint8 images and metadata rows."""
    plan = GenerationPlan.load(plan_url(feedback_dir))
    generate_shard(plan, 0, prepared, small_classifier[1], feedback_dir, out, GenerateConfig(**{**FAST, **kw}))
    url = shard_url(out, 0)
    return storage.read_npz(storage.join(url, "images.npz"))["images"], read_metadata(storage.join(url, "metadata.csv"))


def test_new_config_fields_are_validated():
    GenerateConfig(autocast="bfloat16", guidance_dtype="bfloat16", compile_unet=True, noise_level=999)
    for bad, match in ((dict(guidance_dtype="float16"), "overflow"), (dict(autocast="fp8"), "autocast"),
                       (dict(compile_mode="fast"), "compile_mode"), (dict(noise_level=1000), "noise_level")):
        with pytest.raises(ConfigError, match=match):
            GenerateConfig(**bad)
    with pytest.raises(ValueError, match="float16 overflows"):
        FeedbackGuidance(torch.nn.Linear(1, 1), "entropy", 0.1, precision=torch.float16)


@pytest.mark.slow
def test_padding_the_last_batch_does_not_change_the_real_items(prepared, small_classifier, feedback_dir,
                                                               tiny_generator, tmp_path):
    """Shard of 7, batches of 3: the last batch (1 item) is padded to 3 and the padding dropped."""
    seen = []
    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_generator, device="cpu")
    hook = pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    plain, rows = _shard(prepared, small_classifier, feedback_dir, str(tmp_path / "plain"), generator=tiny_generator,
                         batch_size=3)
    assert len(plain) == len(rows) == 7
    plan = GenerationPlan.load(plan_url(feedback_dir))
    generate_shard(plan, 0, prepared, small_classifier[1], feedback_dir, str(tmp_path / "padded"),
                   GenerateConfig(**FAST, generator=tiny_generator, batch_size=3, pad_last_batch=True), pipe=pipe)
    hook.remove()
    url = shard_url(str(tmp_path / "padded"), 0)
    padded = storage.read_npz(storage.join(url, "images.npz"))["images"]
    padded_rows = read_metadata(storage.join(url, "metadata.csv"))
    assert set(seen) == {3}  # every UNet call saw the fixed batch shape
    assert padded.shape == plain.shape
    # per-sample generators: a real item's image does not depend on its batch (up to one grey level
    # where batched CPU kernels round differently)
    assert np.abs(padded.astype(int) - plain.astype(int)).max() <= 1
    assert [r["seed"] for r in padded_rows] == [r["seed"] for r in rows]
    assert np.allclose([r["criterion_value"] for r in padded_rows], [r["criterion_value"] for r in rows], atol=1e-3)
    assert pad_batch([1, 2], 4) == [1, 2, 2, 2]


@pytest.mark.slow
def test_bfloat16_on_cpu_gives_finite_images(prepared, small_classifier, feedback_dir, tiny_generator, tmp_path):
    full, _ = _shard(prepared, small_classifier, feedback_dir, str(tmp_path / "fp32"), generator=tiny_generator,
                     batch_size=8)
    half, rows = _shard(prepared, small_classifier, feedback_dir, str(tmp_path / "bf16"), generator=tiny_generator,
                        batch_size=8, dtype="bfloat16", autocast="bfloat16", guidance_dtype="bfloat16")
    assert all(r["finite"] for r in rows) and half.std() > 0
    # the same samples, up to bfloat16 rounding (8 mantissa bits over 4 steps)
    assert np.abs(half.astype(float) - full.astype(float)).mean() < 0.1 * 255


@pytest.mark.slow
def test_unclip_with_autocast_and_checkpointing_on_cpu(tiny_unclip_model, small_classifier, digits):
    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_unclip_model, device="cpu")
    train = digits["train"]
    labels, real = torch.tensor(train.labels[:2]), train.to_tensor()[:2]

    def run(feedback):
        return pipe(prompts=["a photo of a 0"] * 2, criterion_labels=labels, condition_images=real, noise_level=10,
                    generators=[torch.Generator().manual_seed(i) for i in range(2)], num_inference_steps=2,
                    cfg_scale=2.0, feedback=feedback, guide_steps=[1]).images

    clf = small_classifier[0]
    ref = run(FeedbackGuidance(clf, "loss", 0.1))
    # gradient checkpointing recomputes activations: the same numbers
    apply_performance_options(pipe, GenerateConfig(gradient_checkpointing=True))
    assert pipe.unet.is_gradient_checkpointing and pipe.vae.is_gradient_checkpointing
    assert torch.allclose(run(FeedbackGuidance(clf, "loss", 0.1)), ref, atol=1e-5)
    # bf16 autocast for the UNet only; decode + classifier in bf16 autocast
    apply_performance_options(pipe, GenerateConfig(autocast="bfloat16"))
    out = run(FeedbackGuidance(clf, "loss", 0.1, precision=torch.bfloat16))
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert (out - ref).abs().mean() < 0.1


def test_autocast_covers_the_unet_but_not_the_gradient_path(tiny_unclip_model, small_classifier):
    from feedback_synth.generation.loading import load_generator

    pipe = apply_performance_options(load_generator(tiny_unclip_model, device="cpu"), GenerateConfig(autocast="bfloat16"))
    z = torch.randn(2, 4, 16, 16)
    cond = torch.zeros(2, 32)
    text = pipe.encode_prompt(["a", "b"])
    assert pipe.unet(z, 10, encoder_hidden_states=text, class_labels=cond).sample.dtype == torch.bfloat16
    assert pipe.unet.dtype == torch.float32  # weights untouched
    guide = FeedbackGuidance(small_classifier[0], "loss", 0.1, decode=pipe.decode_latents)
    zg = z.clone().requires_grad_(True)
    labels = torch.tensor([3, 4])
    g_ref, v_ref = guide.gradient(zg, torch.zeros_like(z), torch.tensor(0.5), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast region does not leak into it
        g, v = guide.gradient(zg, torch.zeros_like(z), torch.tensor(0.5), labels)
    assert g.dtype == torch.float32 and torch.equal(g, g_ref) and torch.equal(v, v_ref)


def test_attention_goes_through_sdpa(tiny_generator, tiny_unclip_model):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from feedback_synth.generation.loading import load_generator

    for spec in (tiny_generator, tiny_unclip_model):
        pipe = load_generator(spec, device="cpu")
        layers = [m for part in (pipe.unet, getattr(pipe, "vae", None)) if part is not None
                  for m in part.modules() if isinstance(m, Attention)]
        assert layers and ensure_sdpa(pipe.unet, getattr(pipe, "vae", None)) == len(layers)  # the default
        for layer in layers:
            layer.set_processor(AttnProcessor())  # what set_default_attn_processor() may do
        apply_performance_options(pipe, GenerateConfig())
        assert all(type(layer.processor) is AttnProcessor2_0 for layer in layers)


def test_compile_option_compiles_the_unet_and_fixes_shapes(prepared, small_classifier, feedback_dir, tiny_generator,
                                                           tmp_path, monkeypatch):
    """On the CPU, check the wiring only (inductor would take minutes here): the UNet goes through
    torch.compile with static shapes, and every call sees the padded batch shape."""
    calls, shapes = [], []

    def fake_compile(module, **kw):
        calls.append(kw)
        module.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    images, _ = _shard(prepared, small_classifier, feedback_dir, str(tmp_path / "c"), generator=tiny_generator,
                       batch_size=4, compile_unet=True, compile_mode="max-autotune-no-cudagraphs")
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]
    assert len(images) == 7 and {s[0] for s in shapes} == {4}


# ---------------------------------------------------------------- GPU checks (skipped without CUDA)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("autocast", ["bfloat16", "float16"])
def test_gpu_unclip_mixed_precision_keeps_the_gradient_path_finite(tiny_unclip_model, small_classifier, digits,
                                                                    autocast):
    from feedback_synth.generation.loading import load_generator
    from feedback_synth.training.classifier import load_classifier

    clf = load_classifier(small_classifier[1], device="cuda")
    train = digits["train"]
    labels, real = torch.tensor(train.labels[:4]), train.to_tensor()[:4]

    def run(pipe, precision):
        return pipe(prompts=["a photo"] * 4, criterion_labels=labels, condition_images=real, noise_level=10,
                    generators=[torch.Generator().manual_seed(i) for i in range(4)], num_inference_steps=4,
                    cfg_scale=2.0, feedback=FeedbackGuidance(clf, "entropy", 0.05, precision=precision),
                    guide_steps=guided_step_indices(4, 1))

    ref = run(load_generator(tiny_unclip_model, device="cuda"), torch.float32)
    pipe = apply_performance_options(load_generator(tiny_unclip_model, device="cuda"),
                                     GenerateConfig(autocast=autocast))
    for precision in (torch.float32, torch.bfloat16):
        out = run(pipe, precision)
        assert torch.isfinite(out.images).all() and torch.isfinite(out.criterion).all()
        assert (out.images - ref.images).abs().mean() < 0.05


@pytest.mark.gpu
@gpu
def test_gpu_compiled_unet_matches_eager_and_does_not_recompile_per_batch(prepared, small_classifier, feedback_dir,
                                                                          tiny_generator, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kw = dict(generator=tiny_generator, batch_size=3, device="cuda")
    eager, _ = _shard(prepared, small_classifier, feedback_dir, str(tmp_path / "eager"), **kw)
    compiled, rows = _shard(prepared, small_classifier, feedback_dir, str(tmp_path / "compiled"), compile_unet=True,
                            **kw)
    assert all(r["finite"] for r in rows)
    assert np.abs(compiled.astype(int) - eager.astype(int)).mean() < 2
    # graphs: (grad on, grad off) x (conditional, null) at one batch shape; no new ones for the last batch
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 8


@pytest.mark.gpu
@gpu
def test_gpu_gradient_checkpointing_lowers_peak_memory(tiny_unclip_model, small_classifier):
    from feedback_synth.generation.loading import load_generator
    from feedback_synth.training.classifier import load_classifier

    clf = load_classifier(small_classifier[1], device="cuda")
    peaks = []
    for checkpointing in (False, True):
        pipe = apply_performance_options(load_generator(tiny_unclip_model, device="cuda"),
                                         GenerateConfig(gradient_checkpointing=checkpointing))
        guide = FeedbackGuidance(clf, "loss", 0.1, decode=pipe.decode_latents)
        z = torch.randn(16, 4, 64, 64, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        guide.gradient(z, torch.zeros_like(z), torch.tensor(0.5, device="cuda"), torch.zeros(16, dtype=torch.long,
                                                                                              device="cuda"))
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] < peaks[0]


@pytest.mark.slow
def test_chunked_guidance_gives_the_same_gradient(tiny_unclip_model, small_classifier):
    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_unclip_model, device="cpu")
    torch.manual_seed(0)
    z = torch.randn(5, 4, 16, 16)
    text, cond, labels = pipe.encode_prompt(["a"] * 5), torch.randn(5, 32), torch.tensor([0, 3, 4, 7, 9])
    for through_unet in (True, False):
        results = {}
        for chunk in (0, 1, 2, 5):  # 2 leaves a last chunk of one; 5 is the whole batch
            guide = FeedbackGuidance(small_classifier[0], "loss", 0.1, decode=pipe.decode_latents, chunk_size=chunk)
            zg = z.clone().requires_grad_(True)
            with torch.enable_grad():
                eps = pipe.unet(zg if through_unet else z, 500, encoder_hidden_states=text, class_labels=cond).sample
            results[chunk] = guide.gradient(zg, eps, torch.tensor(0.3), labels)
        grad, values = results[0]
        assert grad.abs().sum() > 0
        for chunk in (1, 2, 5):
            assert torch.allclose(results[chunk][0], grad, rtol=1e-4, atol=1e-7), (through_unet, chunk)
            assert torch.allclose(results[chunk][1], values, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        FeedbackGuidance(small_classifier[0], "loss", 0.1, chunk_size=-1)


def test_live_tensor_bytes_tracks_allocations_and_frees():
    from feedback_synth.generation.performance import LiveTensorBytes

    weight = torch.zeros(250)  # 1,000 bytes, alive before the block
    tracker = LiveTensorBytes()
    tracker.count(weight, weight[10:])  # a view shares its storage: counted once
    assert tracker.live == 1000
    with tracker:
        a = torch.ones(1000)  # 4,000
        b = a.view(10, 100).t()  # a view: no new storage
        c = a * 2  # 4,000
        del a, b, c
        d = torch.ones(500, dtype=torch.float64)  # 4,000, after the 8,000 were freed
    assert tracker.peak == 9000 and tracker.live == 5000
    del d
    assert tracker.live == 1000


@pytest.mark.slow
def test_fake_mode_memory_estimate_equals_the_real_run(tiny_unclip_model, small_classifier, digits):
    """The GPU memory table of the throughput benchmark comes from FakeTensorMode: it must count
    what a real run keeps alive, and show the levers (chunks, checkpointing) working."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from feedback_synth.generation.loading import load_generator
    from feedback_synth.generation.performance import LiveTensorBytes, estimate_peak_bytes, with_int_timesteps
    from feedback_synth.generation.unclip import UnCLIPFeedbackPipeline
    from feedback_synth.training.classifier import Classifier

    def rebuild(part):
        if isinstance(part, ModelMixin):
            return type(part).from_config(part.config)
        return type(part)(part.config) if isinstance(part, PreTrainedModel) else part

    real_pipe = load_generator(tiny_unclip_model, device="cpu")
    real_pipe.scheduler = with_int_timesteps(real_pipe.scheduler)
    clf = small_classifier[0]
    train = digits["train"]
    labels, images = torch.tensor(train.labels[:4]), train.to_tensor()[:4]

    def sample(pipe, clf, chunk=0):
        return pipe(prompts=["a photo of a 0"] * 4, criterion_labels=labels, condition_images=images, noise_level=10,
                    generators=[torch.Generator().manual_seed(i) for i in range(4)], num_inference_steps=3,
                    cfg_scale=2.0, cond_dropout=0.1, guide_steps=[1],
                    feedback=FeedbackGuidance(clf, "loss", 0.1, chunk_size=chunk))

    def modules(pipe, clf):
        return [part for part in pipe.components.values() if isinstance(part, torch.nn.Module)] + [clf]

    tracker = LiveTensorBytes()
    tracker.count(*[t for m in modules(real_pipe, clf) for t in (*m.parameters(), *m.buffers())])
    with tracker:
        out = sample(real_pipe, clf)
    assert torch.isfinite(out.images).all()

    def estimate(chunk=0, checkpointing=False):
        state = {}

        def build():  # the same modules from their configs: fake weights of the same shapes
            pipe = UnCLIPFeedbackPipeline(**{name: rebuild(part) for name, part in real_pipe.components.items()})
            if checkpointing:
                apply_performance_options(pipe, GenerateConfig(gradient_checkpointing=True))
            state.update(pipe=pipe, clf=Classifier(clf.spec).eval())
            return modules(pipe, state["clf"])

        return estimate_peak_bytes(build, lambda _: sample(state["pipe"], state["clf"], chunk))[1]

    # within 1%: meta kernels can pick another memory layout than the CPU kernels (group_norm on a
    # channels-last input comes out contiguous), so a later .contiguous() copies in one run only
    assert abs(estimate() - tracker.peak) <= 0.01 * tracker.peak
    assert estimate(chunk=1) < estimate(chunk=2) < tracker.peak
    assert estimate(checkpointing=True) < tracker.peak


@pytest.mark.slow
def test_latents_and_scheduler_stay_float32_with_a_bfloat16_unet(tiny_generator, tiny_unclip_model, small_classifier,
                                                                  digits, monkeypatch, tmp_path):
    """bf16 weights speed up the UNet; the scheduler's update of the latents stays in float32 in
    every pipeline (a bf16 latent loses the small DDIM increments of late steps)."""

    from feedback_synth.generation.loading import load_generator

    train = digits["train"]
    labels, real = torch.tensor(train.labels[:2]), train.to_tensor()[:2]
    build_tiny_text_model(str(tmp_path / "text"))
    pixel = load_generator(tiny_generator, dtype=torch.bfloat16, device="cpu")
    text = load_generator(str(tmp_path / "text"), dtype=torch.bfloat16, device="cpu")
    unclip = load_generator(tiny_unclip_model, dtype=torch.bfloat16, device="cpu")
    assert pixel.unet.dtype == text.unet.dtype == unclip.unet.dtype == torch.bfloat16
    seen = []
    step = type(pixel.scheduler).step

    def recording_step(self, model_output, timestep, sample, *args, **kwargs):
        seen.append(sample.dtype)
        return step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(type(pixel.scheduler), "step", recording_step)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    feedback = FeedbackGuidance(small_classifier[0], "entropy", 0.1)
    common = dict(generators=gens, num_inference_steps=3, feedback=feedback, guide_steps=[1])
    outputs = [pixel(class_labels=labels, images=real, strength=0.8, **common).images,
               text(prompts=["a 0", "a 1"], criterion_labels=labels, images=real, strength=0.8, **common).images,
               unclip(prompts=["a 0", "a 1"], criterion_labels=labels, condition_images=real, **common).images]
    assert seen and set(seen) == {torch.float32}, seen
    assert all(torch.isfinite(out).all() and out.dtype == torch.float32 for out in outputs)


@pytest.mark.slow
def test_estimate_generation_memory_from_configs_only(tiny_unclip_model, memory_url, capsys, tmp_path, monkeypatch):
    """`feedback-synth estimate-memory`: the generator built from its configs (no weight file is
    even copied from a bucket), sized under fake tensors, agrees with the same batch run for real;
    the bucket's temporary copies are gone once each model is loaded."""
    import os
    import tempfile

    from feedback_synth import storage
    from feedback_synth.cli.main import main
    from feedback_synth.generation.loading import WEIGHT_SUFFIXES, local_folder
    from feedback_synth.generation.memory import estimate_generation_memory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the copies go: watched below
    fs, _ = storage.fs_and_path(memory_url)
    fs.put(tiny_unclip_model + "/", memory_url.replace("memory://", "/") + "/model/", recursive=True)
    url = memory_url + "/model"
    with local_folder(url, weights=False) as configs:
        copied = [f for _, _, files in os.walk(configs) for f in files]
        assert configs.startswith(str(tmp_path))
    assert "config.json" in copied and not [f for f in copied if f.endswith(WEIGHT_SUFFIXES)]
    assert not os.path.exists(configs)

    cfg = GenerateConfig(generator=url, batch_size=3, guidance_chunk_size=2, num_inference_steps=4)
    args = dict(classifier_model="resnet10t", num_classes=10, image_size=16, in_chans=3, height=32, width=32)
    fake = estimate_generation_memory(cfg, **args)
    real = estimate_generation_memory(cfg, **args, fake=False)
    assert fake.weights == real.weights > 0 and (fake.batch_size, fake.height, fake.width) == (3, 32, 32)
    for a, b in ((fake.unguided, real.unguided), (fake.guided, real.guided)):
        assert abs(a - b) <= 0.01 * b, (a, b)
    assert fake.guided > fake.unguided
    whole = estimate_generation_memory(GenerateConfig(generator=url, batch_size=3), **args)
    assert whole.guided > fake.guided  # chunks of 2 hold less than the whole batch
    assert not [p for p in os.listdir(tmp_path) if p.startswith("feedback-synth-model-")]  # loaded, then removed

    assert main(["estimate-memory", "--set", f"generate.generator={tiny_unclip_model}", "--num-classes", "10",
                 "--batch-size", "2", "--set", "generate.criterion=none"]) == 0
    out = capsys.readouterr().out
    assert "batch 2" in out and "peak, unguided batch" in out and "peak, guided batch" not in out


def test_a_broken_generator_folder_is_named(tmp_path, capsys):
    """A component folder without its config: a clear error naming the model folder, no traceback."""
    from feedback_synth.cli.main import main

    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "scheduler").mkdir()
    assert main(["estimate-memory", "--set", f"generate.generator={tmp_path / 'model'}"]) == 2
    err = capsys.readouterr().err
    assert f"generator model folder {tmp_path / 'model'}" in err and "config.json" in err, err
