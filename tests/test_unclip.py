"""Image-conditioned latent generation (stable unCLIP) with feedback guidance, on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import build_tiny_unclip_model

from feedback_synth.generation.unclip import UnCLIPFeedbackPipeline
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, guided_step_indices


@pytest.fixture(scope="module")
def tiny_unclip_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-unclip"))
    build_tiny_unclip_model(path)
    return path


@pytest.fixture(scope="module")
def unclip_pipe(tiny_unclip_model):
    from feedback_synth.generation.loading import load_generator

    return load_generator(tiny_unclip_model, device="cpu")


def _gens(n, seed=7):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _run(pipe, labels, condition, feedback=None, cond_dropout=0.0, noise_level=0, seed=7, steps=3, cfg_scale=3.0,
         **kw):
    return pipe(prompts=[f"a photo of a {c}" for c in labels.tolist()], criterion_labels=labels,
                generators=_gens(len(labels), seed), condition_images=condition, noise_level=noise_level,
                num_inference_steps=steps, cfg_scale=cfg_scale, cond_dropout=cond_dropout, feedback=feedback,
                guide_steps=guided_step_indices(steps, 1), **kw)


def test_matches_the_stock_stable_unclip_pipeline(unclip_pipe, digits):
    """Unguided, without dropout, the conditioning (noised image embedding + noise-level embedding as
    class_labels, zeros as the null condition), CFG and the v -> eps conversion reproduce diffusers'
    StableUnCLIPImg2ImgPipeline from the same per-sample generators."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    real = digits["train"].to_tensor()[:2]
    labels = torch.tensor(digits["train"].labels[:2])
    ours = _run(unclip_pipe, labels, real, noise_level=100).images
    stock = StableUnCLIPImg2ImgPipeline(**unclip_pipe.components)
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds = unclip_pipe.image_encoder(unclip_pipe.preprocess_condition(real)).image_embeds
    ref = stock(prompt=[f"a photo of a {c}" for c in labels.tolist()], image_embeds=embeds, noise_level=100,
                num_inference_steps=3, guidance_scale=3.0, generator=_gens(2), output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.slow
def test_loads_from_a_url_and_guidance_raises_the_criterion(tiny_unclip_model, small_classifier, digits, memory_url):
    from feedback_synth import storage
    from feedback_synth.generation.loading import load_generator

    fs, _ = storage.fs_and_path(memory_url)
    fs.put(tiny_unclip_model + "/", memory_url.replace("memory://", "/") + "/model/", recursive=True)
    pipe = load_generator(memory_url + "/model", device="cpu")
    assert isinstance(pipe, UnCLIPFeedbackPipeline)
    clf = small_classifier[0]
    train = digits["train"]
    idx = np.array([np.flatnonzero(train.labels == c)[0] for c in (1, 7, 9)])
    labels, real = torch.tensor(train.labels[idx]), train.to_tensor()[idx]
    scorer = FeedbackGuidance(clf, "entropy", 0.0)
    unguided = _run(pipe, labels, real, cond_dropout=0.1)
    guided = _run(pipe, labels, real, FeedbackGuidance(clf, "entropy", 0.2), cond_dropout=0.1)
    guided_no_unet_grad = _run(pipe, labels, real, FeedbackGuidance(clf, "entropy", 0.2), cond_dropout=0.1,
                               grad_through_unet=False)
    assert guided.images.shape == (3, 3, 32, 32) and torch.isfinite(guided.images).all()
    assert guided.criterion is not None and guided.criterion.shape == (3,)
    assert scorer.score_images(guided.images, labels).mean() > scorer.score_images(unguided.images, labels).mean()
    assert scorer.score_images(guided_no_unet_grad.images, labels).mean() > \
        scorer.score_images(unguided.images, labels).mean()
    assert torch.equal(_run(pipe, labels, real, cond_dropout=0.1).images, unguided.images)  # fixed seeds


@pytest.mark.slow
def test_condition_dropout_and_noise_level_change_the_samples(unclip_pipe, digits):
    train = digits["train"]
    labels, real = torch.tensor(train.labels[:2]), train.to_tensor()[:2]
    run = dict(steps=2, cfg_scale=1.0)
    base = _run(unclip_pipe, labels, real, **run).images
    dropped = _run(unclip_pipe, labels, real, cond_dropout=0.5, **run).images
    assert not torch.allclose(dropped, base)
    assert not torch.allclose(_run(unclip_pipe, labels, real, noise_level=500, **run).images, base)
    other = train.to_tensor()[-2:]  # other real images: the image condition is used
    assert not torch.allclose(_run(unclip_pipe, labels, other, **run).images, base)
    # per-sample masks: a sample's image does not depend on the rest of its batch
    first = _run(unclip_pipe, labels[:1], real[:1], cond_dropout=0.5, **run).images
    assert torch.allclose(dropped[:1], first, atol=1e-5)
    # no condition image: the null image condition (text only) still samples
    assert torch.isfinite(_run(unclip_pipe, labels, None, **run).images).all()


def test_bad_inputs_raise(unclip_pipe, tiny_unclip_model, digits):
    from diffusers import UNet2DConditionModel

    real = digits["train"].to_tensor()[:1]
    with pytest.raises(ValueError, match="noise_level must be in"):
        _run(unclip_pipe, torch.tensor([0]), real, noise_level=1000)
    with pytest.raises(ValueError, match="condition_images"):
        _run(unclip_pipe, torch.tensor([0, 1]), real)
    text_unet = UNet2DConditionModel.from_pretrained(tiny_unclip_model, subfolder="unet")
    text_unet.register_to_config(class_embed_type=None)
    pipe = UnCLIPFeedbackPipeline(**{**unclip_pipe.components, "unet": text_unet})
    with pytest.raises(ValueError, match="class_embed_type='projection'"):
        _run(pipe, torch.tensor([0]), real)


@pytest.mark.slow
def test_a_generation_shard_runs_with_an_unclip_generator(tiny_unclip_model, prepared, small_classifier,
                                                          tmp_path):
    from feedback_synth import storage
    from feedback_synth.config import FeedbackConfig, GenerateConfig
    from feedback_synth.generation.shards import generate_shard, read_metadata, shard_url
    from feedback_synth.stages.extract_feedback import extract_feedback
    from feedback_synth.stages.outputs import plan_url
    from feedback_synth.synthesis.plan import GenerationPlan

    fb = str(tmp_path / "feedback")
    extract_feedback(prepared, small_classifier[1], fb, FeedbackConfig(budget_fraction=0.1, shard_size=4))
    plan = GenerationPlan.load(plan_url(fb))
    cfg = GenerateConfig(generator=tiny_unclip_model, num_inference_steps=3, batch_size=4, strength=1.0,
                         noise_level=50, guide_every=2, scale=0.05)
    out = str(tmp_path / "gen")
    summary = generate_shard(plan, 0, prepared, small_classifier[1], fb, out, cfg)
    assert not summary["skipped"] and summary["num_images"] == plan.shards[0].num_images
    images = storage.read_npz(storage.join(shard_url(out, 0), "images.npz"))["images"]
    rows = read_metadata(storage.join(shard_url(out, 0), "metadata.csv"))
    assert images.shape == (plan.shards[0].num_images, 32, 32, 3) and images.dtype == np.uint8
    assert all(r["finite"] for r in rows) and all(r["condition"].startswith("digits:") for r in rows)
    assert images.std() > 0
