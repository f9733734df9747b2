"""Diffusers pipelines with feedback guidance: a pixel-space class-conditional one (the bundled
generator) and a latent text-conditioned one (Stable Diffusion style). Both run the same denoising
loop, ``denoise_with_feedback``, which calls the one ``FeedbackGuidance`` implementation.

Conditioning on real images (support) is SDEdit (Meng et al. 2022): real images are noised to
``strength`` and denoised; each sample starts from its own real image and its own noise. Dropout on
the conditioning embedding gives diversity (docs/method.md: the method in one paragraph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, pixel_decode

SUPPORTED_SCHEDULERS = (DDIMScheduler, DDPMScheduler, PNDMScheduler)

# eps_fn(latents, t, conditional) -> noise prediction; conditional=False gives the null condition
EpsFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class FeedbackPipelineOutput:
    images: torch.Tensor  # (B, C, H, W) in [0, 1], float32, on the CPU
    criterion: Optional[torch.Tensor]  # (B,) criterion of the final images, if feedback was given


def _per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """One generator per sample, so that a sample's noise does not depend on its batch."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device, dtype)


def _dropout_masks(shape: tuple[int, ...], p: float, generators: list[torch.Generator]) -> Optional[torch.Tensor]:
    if p <= 0:
        return None
    return torch.stack([(torch.rand(shape, generator=g) >= p).float() / (1 - p) for g in generators])


def check_scheduler(scheduler) -> None:
    if not isinstance(scheduler, SUPPORTED_SCHEDULERS) or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"scheduler {type(scheduler).__name__} is not supported by feedback guidance: it needs "
                         f"alphas_cumprod and unscaled model inputs ({', '.join(s.__name__ for s in SUPPORTED_SCHEDULERS)})")


def check_epsilon_prediction(scheduler) -> None:
    """The guided step's x0 formula is written for eps-prediction models (unclip.py converts v)."""
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"scheduler prediction_type '{prediction}' is not supported by this pipeline's feedback "
                         "guidance: it needs an epsilon-prediction model")


def check_batch_inputs(n: int, images: Optional[torch.Tensor], strength: float,
                       generators: list[torch.Generator]) -> None:
    """Checks every feedback pipeline makes of its batch: start images, strength, one generator each."""
    if images is not None and len(images) != n:
        raise ValueError(f"got {len(images)} init images for {n} samples")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if len(generators) != n:
        raise ValueError(f"need one generator per sample: {len(generators)} for {n}")


def sdedit_timesteps(scheduler, num_inference_steps: int, strength: float, device) -> torch.Tensor:
    scheduler.set_timesteps(num_inference_steps, device=device)
    n = min(num_inference_steps, max(1, int(round(num_inference_steps * strength))))
    return scheduler.timesteps[num_inference_steps - n:]


def start_timesteps(timesteps, n: int, device) -> torch.Tensor:
    """The first timestep, once per sample (``add_noise`` of an SDEdit start). ``timesteps`` may be
    a tensor or a list of ints (``performance.with_int_timesteps``)."""
    return torch.full((n,), int(timesteps[0]), dtype=torch.long, device=device)


def latent_start(vae, scheduler, in_channels: int, vae_scale_factor: int, images: Optional[torch.Tensor],
                 generators: list[torch.Generator], timesteps: torch.Tensor, height: int, width: int,
                 device) -> torch.Tensor:
    """The starting latents of a latent diffusion pipeline (float32): noise times the scheduler's
    ``init_noise_sigma`` without ``images``; with them (in [0, 1]), their VAE latents noised to the
    first of ``timesteps`` (the SDEdit start), grey images repeated to the VAE's channels."""
    shape = (in_channels, height // vae_scale_factor, width // vae_scale_factor)
    noise = _per_sample_randn(shape, generators, device, torch.float32)
    if images is None:
        return noise * scheduler.init_noise_sigma
    x = torch.nn.functional.interpolate(images.to(device, torch.float32) * 2 - 1, size=(height, width), mode="bilinear",
                                        align_corners=False)
    if x.shape[1] != vae.config.in_channels:
        x = x.expand(-1, vae.config.in_channels, -1, -1)
    z0 = vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    return scheduler.add_noise(z0, noise, start_timesteps(timesteps, len(z0), device))


def denoise_with_feedback(
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    eps_fn: EpsFn,
    labels: torch.Tensor,
    cfg_scale: float,
    feedback: Optional[FeedbackGuidance],
    guide_steps: list[int],
    grad_through_unet: bool,
    progress: Optional[Callable] = None,
) -> torch.Tensor:
    """The denoising loop of both pipelines (docs/method.md: the guided step).

    At a guided step the classifier-free-guided eps is computed first; the latents are then
    shifted by the feedback gradient, and the scheduler steps from the shifted latents with that eps.
    """
    guided = set(guide_steps) if feedback is not None else set()
    for i, t in enumerate(timesteps):
        if i in guided and grad_through_unet:
            z = latents.detach().float().requires_grad_(True)
            with torch.enable_grad():
                eps_cond = eps_fn(z, t, True)
            eps_uncond = eps_fn(latents, t, False) if cfg_scale != 1 else eps_cond.detach()
        else:
            z = latents
            eps_cond = eps_fn(latents, t, True)
            eps_uncond = eps_fn(latents, t, False) if cfg_scale != 1 else eps_cond
        eps_cfg = eps_uncond.detach() + cfg_scale * (eps_cond.detach() - eps_uncond.detach())
        if i in guided:
            alpha_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)]
            latents = feedback.step(z, eps_cond, alpha_bar, labels).to(latents.dtype)
        latents = scheduler.step(eps_cfg.to(latents.dtype), t, latents.detach()).prev_sample
        if progress is not None:
            progress()
    return latents.detach()


class ClassConditionalFeedbackPipeline(DiffusionPipeline):
    """Pixel-space class-conditional diffusion (``UNet2DModel`` with ``num_class_embeds``; the last
    class index is the null class for classifier-free guidance) with feedback guidance."""

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1

    def check_inputs(self, class_labels, images, strength, generators) -> None:
        check_scheduler(self.scheduler)
        check_epsilon_prediction(self.scheduler)
        if self.unet.config.num_class_embeds is None:
            raise ValueError("the UNet has no class embedding (num_class_embeds is None)")
        if int(class_labels.max()) >= self.null_class or int(class_labels.min()) < 0:
            raise ValueError(f"class_labels must be in [0, {self.null_class - 1}], got {class_labels.tolist()}")
        check_batch_inputs(len(class_labels), images, strength, generators)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: torch.Tensor,
        generators: list[torch.Generator],
        images: Optional[torch.Tensor] = None,
        strength: float = 1.0,
        num_inference_steps: int = 20,
        cfg_scale: float = 2.0,
        cond_dropout: float = 0.0,
        feedback: Optional[FeedbackGuidance] = None,
        guide_steps: Optional[list[int]] = None,
        grad_through_unet: bool = True,
        criterion_labels: Optional[torch.Tensor] = None,
        progress: Optional[Callable] = None,
    ) -> FeedbackPipelineOutput:
        """Generate one image per label.

        Args:
            class_labels: (B,) condition indices (a class, or a joint class-group index).
            generators: one ``torch.Generator`` per sample (its noise and dropout mask).
            images: optional (B, C, H, W) real images in [0, 1] to start from (SDEdit).
            strength: noise level of the start; 1.0 with no images = pure class-conditional sampling.
            feedback: the guidance component; None = unguided.
            guide_steps: indices (into the executed steps) that get feedback.
            criterion_labels: the classifier's labels when they differ from the condition indices.
        """
        # 1. check inputs
        self.check_inputs(class_labels, images, strength, generators)
        device, dtype = self.unet.device, self.unet.dtype
        labels = class_labels.to(device)
        clf_labels = (criterion_labels if criterion_labels is not None else class_labels).to(device)
        size = self.unet.config.sample_size
        shape = (self.unet.config.in_channels, size, size)
        # 2. timesteps and starting latents (SDEdit when images are given); float32 whatever the
        # UNet's dtype, so that the scheduler's maths stays exact (the UNet gets its dtype in eps_fn)
        timesteps = sdedit_timesteps(self.scheduler, num_inference_steps, strength if images is not None else 1.0, device)
        noise = _per_sample_randn(shape, generators, device, torch.float32)
        if images is not None:
            x0 = images.to(device, torch.float32) * 2 - 1
            latents = self.scheduler.add_noise(x0, noise, start_timesteps(timesteps, len(x0), device))
        else:
            latents = noise * self.scheduler.init_noise_sigma
        # 3. dropout on the class embedding (a hook keeps the stock UNet)
        masks = _dropout_masks((self.unet.class_embedding.embedding_dim,), cond_dropout, generators)
        null = torch.full_like(labels, self.null_class)

        def eps_fn(z, t, conditional):
            handle = None
            if conditional and masks is not None:
                m = masks.to(z.device, z.dtype)
                handle = self.unet.class_embedding.register_forward_hook(lambda mod, inp, out: out * m.to(out.dtype))
            try:
                return self.unet(z.to(dtype), t, class_labels=labels if conditional else null).sample
            finally:
                if handle is not None:
                    handle.remove()

        # 4. denoising loop with feedback
        latents = denoise_with_feedback(latents, timesteps, self.scheduler, eps_fn, clf_labels, cfg_scale, feedback,
                                        guide_steps or [], grad_through_unet, progress)
        out = pixel_decode(latents.float())
        # 5. the criterion of the final images, recorded in the shard metadata
        crit = feedback.score_images(out, clf_labels).detach().cpu() if feedback is not None else None
        return FeedbackPipelineOutput(images=out.cpu(), criterion=crit)


class TextFeedbackPipeline(DiffusionPipeline):
    """Latent text-conditioned diffusion (Stable Diffusion components) with feedback guidance.

    The VAE decode sits inside the gradient path of the guided step; it runs in float32.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1] images, differentiable, in float32 (fp16 VAEs overflow)."""
        x = self.vae.decode(z.float() / self.vae.config.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1)

    def check_inputs(self, prompts, images, strength, generators) -> None:
        check_scheduler(self.scheduler)
        check_epsilon_prediction(self.scheduler)
        check_batch_inputs(len(prompts), images, strength, generators)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        criterion_labels: torch.Tensor,
        generators: list[torch.Generator],
        images: Optional[torch.Tensor] = None,
        strength: float = 1.0,
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
        # 1. check inputs
        self.check_inputs(prompts, images, strength, generators)
        device, dtype = self.unet.device, self.unet.dtype
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        # 2. encode the prompts (and the empty prompt for classifier-free guidance); dropout per sample
        cond = self.encode_prompt(list(prompts)).to(dtype)
        uncond = self.encode_prompt([""] * len(prompts)).to(dtype)
        masks = _dropout_masks(tuple(cond.shape[1:]), cond_dropout, generators)
        if masks is not None:
            cond = cond * masks.to(device, dtype)
        # 3. timesteps and starting latents (float32: the scheduler's maths stays exact in any UNet dtype)
        timesteps = sdedit_timesteps(self.scheduler, num_inference_steps, strength if images is not None else 1.0, device)
        latents = latent_start(self.vae, self.scheduler, self.unet.config.in_channels, self.vae_scale_factor, images,
                               generators, timesteps, height, width, device)

        def eps_fn(z, t, conditional):
            return self.unet(z.to(dtype), t, encoder_hidden_states=cond if conditional else uncond).sample

        if feedback is not None:
            feedback.decode = self.decode_latents
        # 4. denoising loop with feedback
        latents = denoise_with_feedback(latents, timesteps, self.scheduler, eps_fn, criterion_labels.to(device),
                                        cfg_scale, feedback, guide_steps or [], grad_through_unet, progress)
        out = self.decode_latents(latents)
        crit = feedback.score_images(out, criterion_labels.to(device)).detach().cpu() if feedback is not None else None
        return FeedbackPipelineOutput(images=out.float().cpu(), criterion=crit)
