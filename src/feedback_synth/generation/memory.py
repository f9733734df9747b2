"""How much GPU memory one generation batch takes, estimated without a GPU or the weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from feedback_synth.config import GenerateConfig
from feedback_synth.generation.adapters import BatchConditions, adapter_of
from feedback_synth.generation.loading import load_generator
from feedback_synth.generation.performance import DTYPES, GUIDANCE_DTYPES, apply_performance_options
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one generation batch (bytes), from ``estimate_generation_memory``."""

    weights: int  # generator components + classifier
    unguided: int  # peak of a batch without feedback (the final decode, usually)
    guided: Optional[int]  # peak of a batch with a guided step (None when the criterion is 'none')
    batch_size: int
    height: int
    width: int

    def table(self, cfg: GenerateConfig) -> str:
        gib, batch_size, height, width = 2 ** 30, self.batch_size, self.height, self.width
        rows = [("weights", self.weights), ("peak, unguided batch", self.unguided)]
        if self.guided is not None:
            rows.append(("peak, guided batch", self.guided))
        head = (f"generator {cfg.generator}, batch {batch_size}, {height}x{width} px, weights {cfg.dtype}, "
                f"UNet autocast {cfg.autocast}, gradient path {cfg.guidance_dtype}, grad through UNet "
                f"{cfg.grad_through_unet}, guidance_chunk_size {cfg.guidance_chunk_size}, gradient_checkpointing "
                f"{cfg.gradient_checkpointing}")
        return head + "\n" + "\n".join(f"  {name:<22} {value / gib:7.2f} GiB" for name, value in rows)


def estimate_generation_memory(cfg: GenerateConfig, classifier_model: str, num_classes: int, image_size: int,
                               in_chans: int = 3, batch_size: Optional[int] = None, height: Optional[int] = None,
                               width: Optional[int] = None, dataset_name: str = "digits-lt",
                               fake: bool = True) -> MemoryEstimate:
    """How much GPU memory one batch of the generate stage takes with ``cfg``, without a GPU and
    without the weights: the pipeline is built from the model folder's configs and run for one
    guided step under FakeTensorMode (``performance.estimate_peak_bytes``; within 1% of a real
    run in the tests). Leaves out allocator fragmentation, kernel workspaces and the CUDA context.

    The classifier is the baseline's architecture (``classifier_model``, ``num_classes``,
    ``image_size``); the criterion is sized as ``entropy`` (the others differ by a few vectors).
    ``height``/``width`` default to the generator's native size. ``fake=False`` runs the same
    batch for real on the CPU (random weights), with the same count.
    """
    from dataclasses import replace

    from feedback_synth.generation.performance import estimate_peak_bytes, with_int_timesteps
    from feedback_synth.training.classifier import build_classifier

    batch = batch_size or cfg.batch_size
    state: dict[str, Any] = {}

    def build():
        # configs only, no weights: built on the CPU whatever the run's device (nothing runs)
        pipe = load_generator(cfg.generator, dataset_name, device="cpu", dtype=DTYPES[cfg.dtype], weights=False)
        pipe.scheduler = with_int_timesteps(pipe.scheduler)
        pipe.check_inputs = lambda *args, **kwargs: None  # checks values, which fake tensors do not have
        apply_performance_options(pipe, replace(cfg, compile_unet=False))
        clf = build_classifier(classifier_model, num_classes, in_chans, image_size).eval()
        state.update(pipe=pipe, clf=clf)
        return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)] + [clf]

    def sample(guided: bool):
        pipe = state["pipe"]
        adapter = adapter_of(pipe)
        feedback = FeedbackGuidance(state["clf"], "entropy", cfg.scale, precision=GUIDANCE_DTYPES[cfg.guidance_dtype],
                                    chunk_size=cfg.guidance_chunk_size)
        native = adapter.native_size(pipe)
        size = (height or native[0], width or native[1]) if adapter.size_arguments(1, 1) else native
        state["size"] = size
        sdedit = cfg.condition_on_real and cfg.strength < 1
        init = torch.rand(batch, adapter.image_channels(pipe), *size) if cfg.condition_on_real else None
        conditions = BatchConditions([0] * batch, [0] * batch, [str(c) for c in range(max(num_classes, 1))], ["all"],
                                     False, init, cfg.strength if sdedit else 1.0, noise_level=cfg.noise_level)
        kwargs = dict(generators=[torch.Generator().manual_seed(i) for i in range(batch)], num_inference_steps=2,
                      images=init if sdedit else None, strength=cfg.strength if sdedit else 1.0,
                      cfg_scale=cfg.cfg_scale, cond_dropout=cfg.cond_dropout, feedback=feedback,
                      guide_steps=[0] if guided else [], grad_through_unet=cfg.grad_through_unet,
                      criterion_labels=torch.zeros(batch, dtype=torch.long), **adapter.size_arguments(*size))
        return pipe(**{**kwargs, **adapter.conditioning(pipe, conditions)})

    runs = [lambda _: sample(False)] + ([lambda _: sample(True)] if cfg.criterion != "none" else [])
    weights, unguided, *guided = estimate_peak_bytes(build, *runs, fake=fake)
    return MemoryEstimate(weights, unguided, guided[0] if guided else None, batch, *state["size"])
