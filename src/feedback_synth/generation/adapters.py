"""Generator adapters: what the generate stage must know about one kind of diffusers model.

A small registry in the style of timm's ``@register_model`` (and of this project's criteria,
filters and losses): a new kind of generator is one decorated class, and the shard loop
(``generation.shards``) and the memory estimate (``generation.memory``) stay as they are. An
adapter says whether a model folder is its kind (``matches``), builds its pipeline (``load``), and
turns one batch of the plan into the pipeline's conditioning arguments (``conditioning``).

Kinds, tried in this order: ``unclip`` (Stable unCLIP: CLIP image embedding of a real image plus a
prompt), ``text`` (Stable Diffusion style latent model: a prompt), ``pixel`` (a class-conditional
``UNet2DModel``: the bundled generators).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from feedback_synth.generation.parts import load_part


@dataclass
class BatchConditions:
    """What one batch of the plan asks for, whatever the generator.

    ``init_images``: the real images the samples start from (SDEdit) and, for image-conditioned
    models, condition on; [0, 1], (B, C, H, W); None without real-image conditioning.
    """

    classes: list[int]
    groups: list[int]
    class_names: list[str]
    group_names: list[str]
    per_group: bool  # the plan is per (class, group): prompts name the group too
    init_images: Optional[torch.Tensor]
    strength: float
    prompt_template: str = "a photo of a {class_name}"
    group_prompt_template: str = "a photo of a {class_name} on {group_name}"
    noise_level: int = 0
    class_index_map: Optional[list[int]] = None  # the generator's index of each task class (matched by name)

    def prompts(self) -> list[str]:
        template = self.group_prompt_template if self.per_group else self.prompt_template
        return [template.format(class_name=self.class_names[c], group_name=self.group_names[g])
                for c, g in zip(self.classes, self.groups)]


class GeneratorAdapter:
    """The interface of a generator kind (see the module docstring)."""

    name = ""
    pipeline_class: type = object
    weighted_parts: tuple[str, ...] = ("unet",)  # the subfolders that hold a config.json and weights

    def matches(self, folder: str) -> bool:
        """Is the local diffusers model ``folder`` of this kind?"""
        raise NotImplementedError

    def load(self, folder: str, dtype: torch.dtype, weights: bool = True):
        """The pipeline of ``folder`` on the CPU (``weights=False``: from the configs only)."""
        raise NotImplementedError

    def conditioning(self, pipe, batch: BatchConditions) -> dict[str, Any]:
        """The pipeline's conditioning arguments for ``batch`` (beyond the shared ones: generators,
        start images, strength, steps, CFG, dropout, feedback)."""
        raise NotImplementedError

    def native_size(self, pipe) -> tuple[int, int]:
        """(height, width) of the images the pipeline makes by default."""
        raise NotImplementedError

    def image_channels(self, pipe) -> int:
        """Channels of the images the pipeline takes and makes."""
        return 3

    def size_arguments(self, height: int, width: int) -> dict[str, int]:
        """The pipeline's arguments for another output size (none where the size is fixed)."""
        return {"height": height, "width": width}


GENERATOR_ADAPTERS: dict[str, GeneratorAdapter] = {}


def register_generator(cls: type[GeneratorAdapter]) -> type[GeneratorAdapter]:
    GENERATOR_ADAPTERS[cls.name] = cls()
    return cls


def adapter_for_folder(folder: str) -> Optional[GeneratorAdapter]:
    """The adapter of a local model folder (the first kind that matches), else None."""
    return next((a for a in GENERATOR_ADAPTERS.values() if a.matches(folder)), None)


def adapter_of(pipe) -> GeneratorAdapter:
    """The adapter of a loaded pipeline, by its class (the most derived registered one)."""
    for klass in type(pipe).__mro__:
        for adapter in GENERATOR_ADAPTERS.values():
            if adapter.pipeline_class is klass:
                return adapter
    raise TypeError(f"no generator adapter for {type(pipe).__name__}; known: {', '.join(GENERATOR_ADAPTERS)}")


def _has(folder: str, *subfolders: str) -> bool:
    return all(os.path.isdir(os.path.join(folder, s)) for s in subfolders)


@register_generator
class UnCLIPAdapter(GeneratorAdapter):
    """Stable unCLIP: the real image conditions through its CLIP image embedding (support)."""

    name = "unclip"
    weighted_parts = ("unet", "vae", "text_encoder", "image_encoder")

    @property
    def pipeline_class(self):  # type: ignore[override]
        from feedback_synth.generation.unclip import UnCLIPFeedbackPipeline

        return UnCLIPFeedbackPipeline

    def matches(self, folder: str) -> bool:
        return _has(folder, "image_encoder", "unet", "vae")

    def load(self, folder, dtype, weights=True):
        from feedback_synth.generation.unclip import load_unclip_pipeline

        return load_unclip_pipeline(folder, "cpu", dtype, weights)  # on the CPU, as every adapter: load_generator moves it

    def conditioning(self, pipe, batch):
        init = batch.init_images
        return {"prompts": batch.prompts(), "condition_images": init,
                "images": init if batch.strength < 1 else None, "noise_level": batch.noise_level}

    def native_size(self, pipe):
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return size, size


@register_generator
class TextAdapter(GeneratorAdapter):
    """A latent text-conditioned model (Stable Diffusion components): the prompt names the class."""

    name = "text"
    weighted_parts = ("unet", "vae", "text_encoder")

    @property
    def pipeline_class(self):  # type: ignore[override]
        from feedback_synth.generation.diffusion import TextFeedbackPipeline

        return TextFeedbackPipeline

    def matches(self, folder: str) -> bool:
        return _has(folder, "vae", "unet")

    def load(self, folder, dtype, weights=True):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from feedback_synth.generation.diffusion import TextFeedbackPipeline

        return TextFeedbackPipeline(
            vae=load_part(AutoencoderKL, folder, "vae", torch.float32, weights),  # in the gradient path: float32
            text_encoder=load_part(CLIPTextModel, folder, "text_encoder", dtype, weights),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            unet=load_part(UNet2DConditionModel, folder, "unet", dtype, weights),
            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))

    def conditioning(self, pipe, batch):
        return {"prompts": batch.prompts()}

    def native_size(self, pipe):
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return size, size


def joint_condition(num_class_embeds: int, num_classes: int, num_groups: int) -> bool:
    """Does a class-conditional UNet embed (class, group) cells rather than classes? (the
    digits-groups generator: one embedding per cell, plus the null class)"""
    return num_groups > 1 and num_class_embeds - 1 == num_classes * num_groups


@register_generator
class PixelAdapter(GeneratorAdapter):
    """A pixel-space class-conditional ``UNet2DModel`` (the bundled generators)."""

    name = "pixel"

    @property
    def pipeline_class(self):  # type: ignore[override]
        from feedback_synth.generation.diffusion import ClassConditionalFeedbackPipeline

        return ClassConditionalFeedbackPipeline

    def matches(self, folder: str) -> bool:
        return _has(folder, "unet", "scheduler")

    def load(self, folder, dtype, weights=True):
        from diffusers import DDIMScheduler, UNet2DModel

        from feedback_synth.generation.diffusion import ClassConditionalFeedbackPipeline

        return ClassConditionalFeedbackPipeline(unet=load_part(UNet2DModel, folder, "unet", dtype, weights),
                                                scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))

    def conditioning(self, pipe, batch):
        n_groups = len(batch.group_names)
        joint = joint_condition(pipe.unet.config.num_class_embeds, len(batch.class_names), n_groups)
        index = batch.class_index_map or list(range(len(batch.class_names)))
        cond = [index[c] * n_groups + g if joint else index[c] for c, g in zip(batch.classes, batch.groups)]
        return {"class_labels": torch.tensor(cond)}

    def native_size(self, pipe):
        size = pipe.unet.config.sample_size
        return size, size

    def image_channels(self, pipe) -> int:
        return pipe.unet.config.in_channels

    def size_arguments(self, height, width):
        return {}  # a pixel UNet makes images of its sample size only

