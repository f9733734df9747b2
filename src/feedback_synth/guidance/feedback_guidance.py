"""Feedback guidance: one implementation for pixel-space and latent diffusion models.

Written as a component that a denoising loop calls (the ``cond_fn`` style of diffusers' community
CLIP-guided pipeline), not as a fork of a stock pipeline. The maths is docs/method.md's "The guided step",
itself the reference code's: at a guided step t,

    x0  = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)           # predicted clean sample
    fac = sqrt(1 - abar_t)
    x   = decode(fac * x0 + (1 - fac) * z_t)                        # identity in pixel space
    g   = d C(f(x)) / d z_t                                         # through decode (and the UNet)
    z_t = z_t + s * ||z_t|| * g / ||g||                             # ascent, norms per sample
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from feedback_synth.guidance.criteria import ClassStats, get_criterion
from feedback_synth.training.classifier import Classifier

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents -> images in [0, 1], differentiable


def pixel_decode(z: torch.Tensor) -> torch.Tensor:
    """Pixel-space models work in [-1, 1]."""
    return ((z + 1) / 2).clamp(0, 1)


def guided_step_indices(num_steps: int, every: int, start_fraction: float = 0.0) -> list[int]:
    """Indices of the denoising steps that get feedback: every ``every``-th, after ``start_fraction``."""
    first = int(round(start_fraction * num_steps))
    return [i for i in range(first, num_steps) if (i - first) % every == 0]


class FeedbackGuidance:
    """Shifts the noisy latents toward samples the frozen classifier finds hard.

    Args:
        classifier: the frozen classifier f; takes images in [0, 1].
        criterion: name in the criteria registry (``loss``, ``entropy``, ``hardness``).
        scale: the step size s.
        stats: class statistics (needed by ``hardness``).
        decode: latents -> [0, 1] images; ``pixel_decode`` for pixel models, the VAE for latent ones.
        precision: the decode and the classifier (the gradient path) run in float32 (autocast off, even
            inside an autocast region) or under bfloat16 autocast; never float16, whose VAEs overflow.
        chunk_size: decode and classify the guided batch this many samples at a time (0: all at once).
            The criterion is per sample, so the gradient is the same; the memory of the gradient path
            (a VAE decode at full resolution dominates it) is that of one chunk.
    """

    def __init__(self, classifier: Classifier, criterion: str, scale: float,
                 stats: Optional[ClassStats] = None, decode: Decode = pixel_decode,
                 precision: torch.dtype = torch.float32, chunk_size: int = 0):
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: the whole batch), got {chunk_size}")
        self.chunk_size = chunk_size
        if precision not in (torch.float32, torch.bfloat16):
            raise ValueError(f"guidance precision must be torch.float32 or torch.bfloat16, got {precision} "
                             "(float16 overflows in VAE decodes)")
        self.precision = precision
        self.classifier = classifier.eval().requires_grad_(False)
        self.criterion_name = criterion
        self.criterion = get_criterion(criterion)
        self.scale = scale
        self.stats = stats
        self.decode = decode

    def autocast(self, device: torch.device):
        """The precision of the gradient path: overrides any autocast region around the pipeline."""
        if self.precision == torch.bfloat16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    def score_images(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample criterion of images in [0, 1] (float32 on the classifier's device)."""
        dtype = torch.promote_types(images.dtype, torch.float32)  # float32, or float64 in gradient checks
        with self.autocast(images.device):
            feats, logits = self.classifier.features_and_logits(images.to(dtype))
        return self.criterion(feats.to(dtype), logits.to(dtype), labels, self.stats)

    def gradient(self, z_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d C / d z_t and C. ``eps`` may carry the UNet's graph w.r.t. ``z_t`` (grad through UNet)."""
        a = alpha_bar_t.to(torch.promote_types(z_t.dtype, torch.float32))
        x0 = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
        fac = (1 - a).sqrt()
        decode_input = fac * x0 + (1 - fac) * z_t
        with self.autocast(z_t.device):  # the backward too: autocast state also reaches backward kernels
            if not 0 < self.chunk_size < len(z_t):
                values = self.score_images(self.decode(decode_input), labels)
                (grad,) = torch.autograd.grad(values.sum(), z_t)
                return grad, values.detach()
            # chunk by chunk: d C / d decode_input, then one backward through x0 (and the UNet)
            grads, values = [], []
            for start in range(0, len(z_t), self.chunk_size):
                part = decode_input[start:start + self.chunk_size].detach().requires_grad_(True)
                part_values = self.score_images(self.decode(part), labels[start:start + self.chunk_size])
                grads.append(torch.autograd.grad(part_values.sum(), part)[0])
                values.append(part_values.detach())
            (grad,) = torch.autograd.grad(decode_input, z_t, grad_outputs=torch.cat(grads))
        return grad, torch.cat(values)

    def step(self, z_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """One guided step; returns the shifted (detached) latents.

        If ``eps`` was computed from ``z_t`` under ``torch.enable_grad()`` (with ``z_t`` requiring
        grad), the gradient flows through the UNet as in the reference code; otherwise eps is a
        constant of the step.
        """
        with torch.enable_grad():
            if not z_t.requires_grad:
                z_t = z_t.detach().float().requires_grad_(True)
            grad, _ = self.gradient(z_t, eps.float(), alpha_bar_t, labels)
        z = z_t.detach().float()
        dims = tuple(range(1, z.ndim))
        z_norm = z.flatten(1).norm(dim=1).view(-1, *([1] * len(dims)))
        g_norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * len(dims))).clamp_min(1e-12)
        return z + self.scale * z_norm * grad / g_norm
