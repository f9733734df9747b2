"""GPU performance options of the generate stage (``GenerateConfig``); all off by default, so that
generation runs on the CPU in float32 unchanged.

- ``autocast``: mixed precision (bfloat16 or float16) for the UNet's forward passes only. The
  gradient path (VAE decode + classifier) runs at ``FeedbackGuidance.precision``: float32, or
  bfloat16 autocast; never float16, whose VAEs overflow to NaN (TOOL-FACTS).
- attention through PyTorch's fused ``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``,
  its default): ``ensure_sdpa`` puts it back wherever the classic processor was set.
- ``compile_unet``: ``torch.compile`` of the UNet with fixed shapes: every batch of a shard is padded
  to ``batch_size`` (``pad_batch``) and the padding dropped, so the compiled graph is reused.
- ``gradient_checkpointing``: recompute UNet and VAE activations in the guided backward pass.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
GUIDANCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run ``module``'s forward passes under ``torch.autocast`` (its weights keep their dtype).

    Only this module: decodes and the classifier outside it keep their own precision.
    """
    if getattr(module, "_feedback_synth_autocast", None) == dtype:
        return module
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast(module.device.type, dtype=dtype):
            return forward(*args, **kwargs)

    module.forward = wrapped
    module._feedback_synth_autocast = dtype
    return module


def ensure_sdpa(*modules: Any) -> int:
    """Make every diffusers attention layer of ``modules`` use SDPA; returns how many do.

    ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``: flash / memory-efficient kernels) is
    diffusers' default; ``set_default_attn_processor()`` or an old recipe may have swapped in the
    classic ``AttnProcessor``, which materialises the attention matrix: undo that, keep any other
    custom processor.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    count = 0
    for module in modules:
        for layer in module.modules() if module is not None else ():
            if isinstance(layer, Attention):
                if type(layer.processor) is AttnProcessor:
                    layer.set_processor(AttnProcessor2_0())
                count += isinstance(layer.processor, AttnProcessor2_0)
    return count


def apply_performance_options(pipe, cfg) -> Any:
    """Apply a ``GenerateConfig``'s GPU options to a loaded generator pipeline (idempotent)."""
    ensure_sdpa(getattr(pipe, "unet", None), getattr(pipe, "vae", None))
    if cfg.gradient_checkpointing:
        for name in ("unet", "vae"):
            part = getattr(pipe, name, None)
            if part is not None and getattr(part, "_supports_gradient_checkpointing", False):
                getattr(part, "_orig_mod", part).enable_gradient_checkpointing()
    dtype = AUTOCAST_DTYPES[cfg.autocast]
    if dtype is not None:
        autocast_forward(getattr(pipe.unet, "_orig_mod", pipe.unet), dtype)
    if cfg.compile_unet and not hasattr(pipe.unet, "_orig_mod"):
        # dynamic=False: one graph per (batch shape, grad mode); batches are padded to batch_size
        pipe.unet = torch.compile(pipe.unet, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                                  dynamic=False)
    return pipe


def pad_batch(batch: Sequence, size: int) -> list:
    """``batch`` padded to ``size`` by repeating its last item (the padding's outputs are dropped).

    Each item carries its own generator seed, so a real item's image does not depend on its batch.
    """
    batch = list(batch)
    return batch + [batch[-1]] * (size - len(batch))
