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

import contextlib
import functools
from typing import Any, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # generate.dtype
AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
GUIDANCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages alive while the block runs: the figure that
    ``torch.cuda.max_memory_allocated`` reports, less the allocator's rounding and the kernels'
    scratch space (cuDNN, cuBLAS workspaces).

    Storages alive before the block (weights) are counted with ``count``. Under
    ``torch._subclasses.FakeTensorMode`` nothing is computed or allocated, so this sizes a GPU
    configuration on any machine: ``estimate_peak_bytes``.
    """

    def __init__(self):
        super().__init__()
        import weakref

        self._weakref = weakref
        self._seen: dict[int, int] = {}  # id(storage) -> bytes, while alive
        self.live = self.peak = 0

    def count(self, *tensors: torch.Tensor) -> None:
        """Add storages that exist already (weights, inputs) to the live total."""
        for t in tensors:
            self._add(t.untyped_storage())

    def _add(self, storage) -> None:
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self._weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out


def with_int_timesteps(scheduler):
    """The same scheduler, with its timesteps kept as Python ints.

    Schedulers branch on timestep values (``prev_timestep >= 0``) and the denoising loop indexes
    ``alphas_cumprod[int(t)]``: under FakeTensorMode tensors have no values, so the timesteps are
    set outside it. Stepping is unchanged (diffusers' DDIM/DDPM steps take int timesteps).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    base = type(scheduler)

    class IntTimesteps(base):
        def set_timesteps(self, num_inference_steps, device=None, **kwargs):
            with unset_fake_temporarily():
                base.set_timesteps(self, num_inference_steps, **kwargs)
                self.timesteps = [int(t) for t in self.timesteps]

    IntTimesteps.__name__ = base.__name__
    return IntTimesteps.from_config(scheduler.config)


def estimate_peak_bytes(build, *runs, fake: bool = True) -> tuple[int, ...]:
    """Size a workload without running it: ``build()`` returns the modules (weights are made but
    not filled), each of ``runs`` (called with the modules) does one piece of work; all run under
    ``FakeTensorMode``, on the CPU device, so no kernel runs and no memory is taken. Give diffusers
    pipelines a scheduler from ``with_int_timesteps``. ``fake=False`` runs it for real, with the
    same count.

    Returns (weight bytes, then the peak bytes of all live tensors, weights included, during each
    run). What it leaves out on a GPU: allocator rounding and fragmentation, kernel workspaces, the
    CUDA context.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        modules = build()
        weights = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        weight_bytes = LiveTensorBytes()
        weight_bytes.count(*weights)
        peaks = []
        for run in runs:
            tracker = LiveTensorBytes()
            tracker.count(*weights)
            with tracker:
                run(modules)
            peaks.append(tracker.peak)
        return (weight_bytes.live, *peaks)
