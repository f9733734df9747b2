"""The latent, text-conditioned generator: tiny Stable-Diffusion-style components built from config
(no download), with the VAE decode inside the gradient path of the same feedback guidance."""
from __future__ import annotations

import pytest
import torch
from builders import build_tiny_text_model

from feedback_synth.generation.diffusion import TextFeedbackPipeline
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, guided_step_indices


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-sd"))
    build_tiny_text_model(path)
    return path


def _run(pipe, feedback, labels, images=None, strength=1.0):
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(labels))]
    prompts = [f"a photo of a {c}" for c in labels.tolist()]
    return pipe(prompts=prompts, criterion_labels=labels, generators=gens, images=images, strength=strength,
                num_inference_steps=4, cfg_scale=3.0, cond_dropout=0.2, feedback=feedback,
                guide_steps=guided_step_indices(4, 1))


@pytest.mark.slow
def test_latent_pipeline_loads_from_a_url_and_is_guided(tiny_text_model, small_classifier, memory_url):
    from feedback_synth import storage
    from feedback_synth.generation.loading import load_generator

    # copy the model folder to memory:// to load it the way a pod reads a bucket
    fs, _ = storage.fs_and_path(memory_url)
    fs.put(tiny_text_model + "/", memory_url.replace("memory://", "/") + "/model/", recursive=True)
    pipe = load_generator(memory_url + "/model", device="cpu")
    assert isinstance(pipe, TextFeedbackPipeline)
    clf = small_classifier[0]
    labels = torch.tensor([1, 7, 9])
    scorer = FeedbackGuidance(clf, "entropy", 0.0)
    unguided = _run(pipe, None, labels)
    guided = _run(pipe, FeedbackGuidance(clf, "entropy", 0.2), labels)
    assert unguided.images.shape == guided.images.shape == (3, 3, 32, 32)
    assert torch.isfinite(guided.images).all()
    assert not torch.allclose(unguided.images, guided.images)
    assert scorer.score_images(guided.images, labels).mean() > scorer.score_images(unguided.images, labels).mean()
    # deterministic for fixed seeds
    assert torch.allclose(_run(pipe, None, labels).images, unguided.images)


def test_gradient_flows_through_the_vae_decode(tiny_text_model, small_classifier):
    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_text_model, device="cpu")
    guide = FeedbackGuidance(small_classifier[0], "loss", 0.1, decode=pipe.decode_latents)
    z = torch.randn(2, 4, 16, 16).requires_grad_(True)
    grad, values = guide.gradient(z, torch.zeros_like(z), torch.tensor(0.5), torch.tensor([3, 4]))
    assert values.shape == (2,) and grad.abs().sum() > 0


def test_sdedit_from_real_images(tiny_text_model, small_classifier, digits):
    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_text_model, device="cpu")
    real = digits["train"].to_tensor()[:2]  # grey 16x16: resized and expanded to the VAE's RGB 32x32
    out = _run(pipe, FeedbackGuidance(small_classifier[0], "entropy", 0.05), torch.tensor([0, 0]), images=real,
               strength=0.5)
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()


def test_unsupported_scheduler_raises(tiny_text_model):
    from diffusers import EulerDiscreteScheduler

    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_text_model, device="cpu")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler is not supported"):
        _run(pipe, None, torch.tensor([0]))


def test_v_prediction_is_refused_rather_than_guided_wrongly(tiny_text_model):
    from diffusers import DDIMScheduler

    from feedback_synth.generation.loading import load_generator

    pipe = load_generator(tiny_text_model, device="cpu")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type 'v_prediction' is not supported"):
        _run(pipe, None, torch.tensor([0]))
