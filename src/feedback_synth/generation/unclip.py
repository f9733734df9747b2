"""Image-conditioned latent diffusion with feedback guidance: the paper's setting.

Stable unCLIP (Stable Diffusion 2.1 unCLIP; diffusers' ``StableUnCLIPImg2ImgPipeline``) conditions the
UNet on the CLIP image embedding of an image, passed as ``class_labels`` to a UNet whose
``class_embed_type`` is ``"projection"``, next to a text prompt (cross-attention). Here the image is a
real training image of the target class (support); dropout on its embedding gives diversity
(docs/method.md: the method in one paragraph). The conditioning follows the stock pipeline exactly:

    e    = image_encoder(preprocess(image)).image_embeds             # (B, D)
    e    = unscale(add_noise(scale(e), noise, noise_level))         # image_normalizer, image_noising_scheduler
    cond = cat(e, timestep_embedding(noise_level, D))               # (B, 2D) -> unet(..., class_labels=cond)
    null = zeros_like(cond)                                          # the classifier-free-guidance null condition

Sampling runs the shared loop, ``denoise_with_feedback``, with the one ``FeedbackGuidance``; the VAE
decode sits in the gradient path in float32 (or bfloat16 autocast; never float16).

SD 2.1 unCLIP predicts v (``prediction_type="v_prediction"``) while the guided step is written for
eps: the UNet's v is turned into eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t (Salimans & Ho 2022,
section 4) and the scheduler steps as an eps scheduler, which is the same DDIM/DDPM update.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.embeddings import get_timestep_embedding

from feedback_synth.generation.diffusion import (
    FeedbackPipelineOutput,
    TextFeedbackPipeline,
    _dropout_masks,
    _per_sample_randn,
    check_batch_inputs,
    check_scheduler,
    denoise_with_feedback,
    latent_start,
    sdedit_timesteps,
)
from feedback_synth.generation.parts import load_part
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance

PREDICTION_TYPES = ("epsilon", "v_prediction")


def epsilon_scheduler(scheduler):
    """The same scheduler, stepping from eps predictions (a v model's output is converted first)."""
    if scheduler.config.prediction_type == "epsilon":
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type="epsilon")


class UnCLIPFeedbackPipeline(TextFeedbackPipeline):
    """Stable unCLIP (image-embedding + text conditioned latent diffusion) with feedback guidance.

    Built from the components of diffusers' ``StableUnCLIPImg2ImgPipeline`` under the same names, so
    ``UnCLIPFeedbackPipeline(**stock_pipeline.components)`` works. ``encode_prompt``,
    ``decode_latents`` (float32, differentiable) and ``vae_scale_factor`` come from
    ``TextFeedbackPipeline``.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, image_encoder, feature_extractor,
                 image_normalizer, image_noising_scheduler):
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              image_encoder=image_encoder, feature_extractor=feature_extractor,
                              image_normalizer=image_normalizer, image_noising_scheduler=image_noising_scheduler)

    @property
    def embedding_dim(self) -> int:
        return self.image_encoder.config.projection_dim

    def preprocess_condition(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (grey or RGB, any size) -> the image encoder's input, on the device.

        The feature extractor's recipe (resize the shortest edge, centre crop, mean/std) in torch,
        so that a batch stays on the GPU; its sizes and statistics come from its config.
        """
        fe = self.feature_extractor
        x = images.to(self.image_encoder.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = fe.size.get("shortest_edge") or min(fe.size["height"], fe.size["width"])
        crop = (fe.crop_size["height"], fe.crop_size["width"]) if getattr(fe, "do_center_crop", True) else None
        h, w = x.shape[-2:]
        new = (max(1, round(h * size / min(h, w))), max(1, round(w * size / min(h, w))))
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if crop is not None:
            top, left = (x.shape[-2] - crop[0]) // 2, (x.shape[-1] - crop[1]) // 2
            x = x[..., max(top, 0):max(top, 0) + crop[0], max(left, 0):max(left, 0) + crop[1]]
        mean = torch.tensor(fe.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(fe.image_std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def encode_condition(self, images: Optional[torch.Tensor], batch_size: int, noise_level: int,
                         generators: list[torch.Generator], cond_dropout: float) -> torch.Tensor:
        """The UNet's ``class_labels``: noised CLIP image embeddings + the noise-level embedding, (B, 2D).

        Random draws per sample, from its own generator: the embedding noise, then the dropout mask.
        ``images=None`` gives the null condition (zeros: text only).
        """
        device, d = self.unet.device, self.embedding_dim
        noise = _per_sample_randn((d,), generators, device, torch.float32)
        masks = _dropout_masks((d,), cond_dropout, generators)
        if images is None:
            return torch.zeros(batch_size, 2 * d, device=device)
        embeds = self.image_encoder(self.preprocess_condition(images).to(self.image_encoder.dtype)).image_embeds.float()
        if masks is not None:
            embeds = embeds * masks.to(device)
        levels = torch.full((batch_size,), noise_level, device=device, dtype=torch.long)
        # as diffusers' stock pipeline does (the normalizer is kept out of CPU offload); only when it
        # is elsewhere: a no-op .to() of a module fails under FakeTensorMode (memory estimates)
        if self.image_normalizer.mean.device != device:
            self.image_normalizer.to(device)
        embeds = self.image_normalizer.scale(embeds)
        embeds = self.image_noising_scheduler.add_noise(embeds, noise, levels)
        embeds = self.image_normalizer.unscale(embeds)
        level_emb = get_timestep_embedding(levels, embedding_dim=d, flip_sin_to_cos=True, downscale_freq_shift=0)
        return torch.cat([embeds, level_emb.to(embeds.dtype)], dim=1)

    def check_inputs(self, prompts, condition_images, images, strength, noise_level, generators) -> None:
        check_scheduler(self.scheduler)
        prediction = self.scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type '{prediction}' is not supported; "
                             f"use one of {PREDICTION_TYPES}")
        expected = 2 * self.embedding_dim
        if self.unet.config.class_embed_type != "projection" or \
                self.unet.config.projection_class_embeddings_input_dim != expected:
            raise ValueError(f"the UNet must take image embeddings as class_labels (class_embed_type='projection', "
                             f"projection_class_embeddings_input_dim={expected}), got class_embed_type="
                             f"{self.unet.config.class_embed_type!r}, projection_class_embeddings_input_dim="
                             f"{self.unet.config.projection_class_embeddings_input_dim}")
        if condition_images is not None and len(condition_images) != len(prompts):
            raise ValueError(f"got {len(condition_images)} condition_images for {len(prompts)} prompts")
        check_batch_inputs(len(prompts), images, strength, generators)
        top = self.image_noising_scheduler.config.num_train_timesteps - 1
        if not 0 <= noise_level <= top:
            raise ValueError(f"noise_level must be in [0, {top}], got {noise_level}")

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        criterion_labels: torch.Tensor,
        generators: list[torch.Generator],
        condition_images: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        strength: float = 1.0,
        noise_level: int = 0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 30,
        cfg_scale: float = 5.0,
        cond_dropout: float = 0.0,
        feedback: Optional[FeedbackGuidance] = None,
        guide_steps: Optional[list[int]] = None,
        grad_through_unet: bool = True,
        progress: Optional[Callable] = None,
    ) -> FeedbackPipelineOutput:
        """Generate one image per prompt.

        Args:
            prompts: one text prompt per sample (e.g. the class name).
            criterion_labels: (B,) the classifier's labels (the intended classes).
            generators: one ``torch.Generator`` per sample (its embedding noise, dropout mask, latent noise).
            condition_images: (B, C, H, W) real images in [0, 1] whose CLIP embeddings condition the
                samples; None = the null image condition (text only).
            images, strength: optional SDEdit start (as in the other pipelines); strength 1 = pure noise.
            noise_level: noise on the image embeddings (stable unCLIP's knob: more = more variation).
            cond_dropout: dropout probability on the image embedding, a mask per sample.
            feedback, guide_steps, grad_through_unet: the feedback guidance (None = unguided).
        """
        # 1. check inputs
        self.check_inputs(prompts, condition_images, images, strength, noise_level, generators)
        device, dtype = self.unet.device, self.unet.dtype
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        labels = criterion_labels.to(device)
        # 2. encode the condition: CLIP image embeddings (noised, dropout per sample) and the prompts
        image_cond = self.encode_condition(condition_images, len(prompts), noise_level, generators, cond_dropout)
        image_cond = image_cond.to(dtype)
        image_null = torch.zeros_like(image_cond)
        text_cond = self.encode_prompt(list(prompts)).to(dtype)
        text_null = self.encode_prompt([""] * len(prompts)).to(dtype)
        # 3. timesteps and starting latents (float32: the scheduler's maths stays exact in any UNet dtype)
        scheduler = epsilon_scheduler(self.scheduler)
        timesteps = sdedit_timesteps(scheduler, num_inference_steps, strength if images is not None else 1.0, device)
        latents = latent_start(self.vae, scheduler, self.unet.config.in_channels, self.vae_scale_factor, images,
                               generators, timesteps, height, width, device)
        v_prediction = self.scheduler.config.prediction_type == "v_prediction"
        alphas = scheduler.alphas_cumprod.to(device)

        def eps_fn(z, t, conditional):
            out = self.unet(z.to(dtype), t, encoder_hidden_states=text_cond if conditional else text_null,
                            class_labels=image_cond if conditional else image_null).sample
            if not v_prediction:
                return out
            a = alphas[int(t)]
            return a.sqrt() * out.float() + (1 - a).sqrt() * z.float()  # v -> eps

        if feedback is not None:
            feedback.decode = self.decode_latents
        # 4. denoising loop with feedback
        latents = denoise_with_feedback(latents, timesteps, scheduler, eps_fn, labels, cfg_scale, feedback,
                                        guide_steps or [], grad_through_unet, progress)
        # 5. decode; the criterion of the final images, recorded in the shard metadata
        if feedback is not None:
            with feedback.autocast(latents.device):
                out = self.decode_latents(latents).float()
            crit = feedback.score_images(out, labels).detach().cpu()
        else:
            out, crit = self.decode_latents(latents).float(), None
        return FeedbackPipelineOutput(images=out.cpu(), criterion=crit)


def load_unclip_pipeline(path: str, device: str, dtype: torch.dtype = torch.float32,
                         weights: bool = True) -> UnCLIPFeedbackPipeline:
    """Load a stable unCLIP folder from local disk (``generation.loading.load_generator`` copies remote ones).

    The UNet and both CLIP encoders take ``dtype``; the VAE (in the gradient path), the image
    normalizer and the schedulers stay float32. ``weights=False``: from the configs only.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    pipe = UnCLIPFeedbackPipeline(
        vae=load_part(AutoencoderKL, path, "vae", torch.float32, weights),
        text_encoder=load_part(CLIPTextModel, path, "text_encoder", dtype, weights),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        unet=load_part(UNet2DConditionModel, path, "unet", dtype, weights),
        scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
        image_encoder=load_part(CLIPVisionModelWithProjection, path, "image_encoder", dtype, weights),
        feature_extractor=CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor"),
        image_normalizer=load_part(StableUnCLIPImageNormalizer, path, "image_normalizer", torch.float32, weights),
        image_noising_scheduler=DDPMScheduler.from_pretrained(path, subfolder="image_noising_scheduler"))
    if device != "cpu":
        pipe.to(device)
    return pipe
