"""Adapt a generator to the task's style: fine-tune its UNet on the task's real training images
(docs/method.md: Adapting the generator to the task).

Methods (``AdaptConfig.method``):
- ``full``: every UNet weight (the small pixel UNets);
- ``lora``: low-rank adapters through peft, as diffusers' training scripts do it. A latent UNet
  (Stable Diffusion, unCLIP) takes them with ``unet.add_adapter(LoraConfig(...))`` and the output is
  diffusers' LoRA file (``pytorch_lora_weights.safetensors``, written by ``save_lora_weights``)
  beside a reference to the base folder, loaded back with ``load_lora_weights``; a pixel
  ``UNet2DModel`` has no ``add_adapter``, so the adapters go in with ``peft.inject_adapter_in_model``
  and are merged into a plain diffusers folder (their weights are kept beside it).

The class condition while adapting (``class_condition``): ``drop`` trains every image on the null
condition (the null class of a pixel UNet; the empty prompt and a zero image embedding of a latent
one), so the task's *style* is learned from all classes together while each class's *content* still
comes from the pretrained class embedding; ``keep`` trains each image with its own class (a class
with 2 images is then pulled toward copies of them); ``mixed`` drops it for half of each batch.
The training loss is the usual noise-prediction loss of the generator's own scheduler.

The copy guard (``copy_check_every`` > 0; docs/method.md: Copies): a class with 2-4 images, each
drawn hundreds of times by class-balanced sampling, is learned by heart, and SDEdit from those
images then gives them back. So every ``copy_check_every`` steps, ``copy_check_samples`` images of
each class with at most ``copy_check_max_images`` training images are sampled as generation makes
them, and their near-copy share is measured (``synthesis.copies``, the definition the ``near_copy``
filter and the report use). At the first check where a class exceeds ``copy_share``, adaptation
stops and the trainable weights go back to the last checkpoint that passed (early stopping on the
near-copy share; the start, the pretrained generator, is the first checkpoint).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from feedback_synth import storage
from feedback_synth.config import AdaptConfig
from feedback_synth.data.imageset import ImageSet
from feedback_synth.errors import ConfigError
from feedback_synth.generation.loading import ADAPTED_JSON, LORA_FILE
from feedback_synth.training.train import one_cycle

PIXEL_TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"],
                 "attention_conv": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}
LATENT_TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"],
                  "attention_conv": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}


def _translate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the size (zero padding is the background of [-1, 1] digits)."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


class _Trainee:
    """One kind of generator under adaptation: its trainable UNet, how a batch becomes its input and
    target, and how the result is saved."""

    def __init__(self, pipe: Any, kind: str, cfg: AdaptConfig, class_index: list[int]):
        from diffusers import DDPMScheduler

        self.pipe, self.kind, self.cfg, self.class_index = pipe, kind, cfg, class_index
        self.unet = pipe.unet
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.latent = kind in ("text", "unclip")

    def attach(self) -> list[torch.nn.Parameter]:
        """Make the UNet trainable by the method; returns the parameters to optimise."""
        self.unet.requires_grad_(False)
        if self.cfg.method == "full":
            self.unet.requires_grad_(True)
            return list(self.unet.parameters())
        from peft import LoraConfig

        targets = (LATENT_TARGETS if self.latent else PIXEL_TARGETS)[self.cfg.layers]
        lora = LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.rank, init_lora_weights="gaussian",
                          target_modules=targets)
        if hasattr(self.unet, "add_adapter"):  # diffusers' PeftAdapterMixin (UNet2DConditionModel)
            self.unet.add_adapter(lora)
        else:  # UNet2DModel: peft directly
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, self.unet)
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        if not params:
            raise ConfigError(f"config field 'adapt.layers': '{self.cfg.layers}' matches no layer of this UNet")
        return params

    def condition(self, images: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor) -> dict[str, Any]:
        """The UNet's conditioning for a batch; ``drop`` marks the samples trained on the null condition."""
        device = self.unet.device
        if not self.latent:
            null = self.unet.config.num_class_embeds - 1
            cond = torch.tensor([self.class_index[int(c)] for c in labels])
            return {"class_labels": torch.where(drop, torch.full_like(cond, null), cond).to(device)}
        names = self.class_names
        prompts = ["" if d else self.prompt_template.format(class_name=names[int(c)]) for c, d in zip(labels, drop)]
        with torch.no_grad():
            out: dict[str, Any] = {"encoder_hidden_states": self.pipe.encode_prompt(prompts).to(self.unet.dtype)}
            if self.kind == "unclip":
                gens = [torch.Generator().manual_seed(i) for i in range(len(images))]
                embeds = self.pipe.encode_condition(images, len(images), 0, gens, 0.0)
                out["class_labels"] = (embeds * (~drop).to(device).float().unsqueeze(1)).to(self.unet.dtype)
        return out

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> what the UNet denoises: pixels in [-1, 1], or VAE latents."""
        device = self.unet.device
        if not self.latent:
            size = self.unet.config.sample_size
            x = images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bilinear",
                                                                       align_corners=False)
            return (x * 2 - 1).to(device, self.unet.dtype)
        vae = self.pipe.vae
        size = self.unet.config.sample_size * self.pipe.vae_scale_factor
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1
        if x.shape[1] != vae.config.in_channels:
            x = x.expand(-1, vae.config.in_channels, -1, -1)
        with torch.no_grad():
            z = vae.encode(x.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        return z.to(self.unet.dtype)

    def loss(self, x0: torch.Tensor, cond: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
        pred = self.unet(self.noise.add_noise(x0, noise, t), t, **cond).sample
        target = self.noise.get_velocity(x0, noise, t) if self.noise.config.prediction_type == "v_prediction" else noise
        return F.mse_loss(pred.float(), target.float())


def class_balanced_indices(labels: np.ndarray, num_classes: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` indices with every class equally likely (then an image uniformly within its class)."""
    present = [c for c in range(num_classes) if (labels == c).any()]
    classes = torch.tensor(present)[torch.randint(0, len(present), (n,), generator=gen)]
    out = []
    for c in classes.tolist():
        members = np.flatnonzero(labels == c)
        out.append(int(members[int(torch.randint(0, len(members), (1,), generator=gen))]))
    return torch.tensor(out)


class AdaptLosses(list):
    """The loss per step (a list), with what the copy guard saw: ``copy_guard`` = {"checks": [{step,
    per_class near-copy share of the checked classes}], "stopped_at": the step whose weights were
    kept (None: ran to the end), "classes": the checked classes, "threshold": the copy distance}."""

    copy_guard: Optional[dict[str, Any]] = None


def _copy_check(pipe: Any, train: ImageSet, classes: list[int], cfg: AdaptConfig, gen_cfg: Any,
                class_index: list[int], threshold: float) -> dict[str, float]:
    """The near-copy share of ``cfg.copy_check_samples`` fresh samples of each of ``classes``."""
    from feedback_synth.synthesis import copies

    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    images, labels = sample_per_class(pipe, train, cfg.copy_check_samples, gen_cfg, class_index, cfg.seed + 7919,
                                      classes=classes)
    if was_training:
        unet.train()
    close = copies.is_near_copy(images, labels, train.images, train.labels, threshold)
    return {train.class_names[c]: float(close[labels == c].mean()) for c in classes}


def adapt_unet(pipe: Any, kind: str, train: ImageSet, cfg: AdaptConfig, class_index: list[int],
               prompt_template: str = "a photo of a {class_name}",
               on_step: Optional[Callable[[int, float], None]] = None, gen_cfg: Any = None) -> AdaptLosses:
    """Fine-tune ``pipe.unet`` in place on ``train`` by ``cfg`` (``class_index``: the generator's
    condition index of each task class), guarded against copies when ``cfg.copy_check_every`` > 0
    (samples drawn as ``gen_cfg`` generates; default ``GenerateConfig()``). Returns the loss per step
    (``AdaptLosses``, with the guard's checks)."""
    import logging

    from feedback_synth.synthesis import copies

    if gen_cfg is None:
        from feedback_synth.config import GenerateConfig

        gen_cfg = GenerateConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    trainee = _Trainee(pipe, kind, cfg, class_index)
    trainee.class_names, trainee.prompt_template = train.class_names, prompt_template
    params = trainee.attach()
    # no weight decay on embedding tables (as usual): a class the batch never conditions on (every
    # class under class_condition 'drop') must keep its row, not decay toward zero
    embedding_rows = {id(p) for m in trainee.unet.modules() if isinstance(m, torch.nn.Embedding)
                      for p in m.parameters(recurse=False)}
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in embedding_rows], "weight_decay": 1e-4},
                             {"params": [p for p in params if id(p) in embedding_rows], "weight_decay": 0.0}],
                            lr=cfg.lr)
    lr_sched = one_cycle(opt, cfg.lr, cfg.steps, 0.1)
    images, labels = train.to_tensor(), torch.from_numpy(train.labels)
    counts = train.class_counts()
    checked = [c for c in range(train.num_classes) if 0 < counts[c] <= cfg.copy_check_max_images]
    guard = cfg.copy_check_every > 0 and bool(checked)
    threshold = copies.copy_threshold(train.images, train.labels) if guard else None
    saved = {id(p): p.detach().to("cpu", copy=True) for p in params} if guard else {}
    losses = AdaptLosses()
    losses.copy_guard = {"classes": [train.class_names[c] for c in checked], "threshold": threshold, "checks": [],
                         "stopped_at": None, "share": cfg.copy_share} if guard else None
    trainee.unet.train()
    bar = tqdm(range(cfg.steps), desc=f"adapt generator ({cfg.method})", unit="step", mininterval=2)
    for step in bar:
        idx = class_balanced_indices(train.labels, train.num_classes, cfg.batch_size, gen) if cfg.class_balanced \
            else torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
        x = images[idx]
        if cfg.augment:
            x = (_translate(x * 2 - 1, gen) + 1) / 2
        drop = {"drop": torch.ones(len(idx), dtype=torch.bool), "keep": torch.zeros(len(idx), dtype=torch.bool),
                "mixed": torch.rand(len(idx), generator=gen) < 0.5}[cfg.class_condition]
        loss = trainee.loss(trainee.to_model_space(x), trainee.condition(x, labels[idx], drop), gen)
        if not torch.isfinite(loss):
            raise ConfigError(f"adapt: the loss is {float(loss)} at step {step + 1}; lower adapt.lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        done = step + 1
        if guard and (done % cfg.copy_check_every == 0 or done == cfg.steps):
            shares = _copy_check(pipe, train, checked, cfg, gen_cfg, class_index, threshold)
            losses.copy_guard["checks"].append({"step": done, "per_class": shares})
            above = {k: v for k, v in shares.items() if v > cfg.copy_share}
            if above:
                last = losses.copy_guard["checks"][-2]["step"] if len(losses.copy_guard["checks"]) > 1 else 0
                with torch.no_grad():
                    for p in params:
                        p.copy_(saved[id(p)].to(p.device))
                losses.copy_guard["stopped_at"] = last
                logging.getLogger(__name__).warning(
                    "adapt: at step %d the samples of %s are near-copies of their training images (more than %.0f%%);"
                    " stopped, keeping the weights of step %d (adapt.copy_check_every)", done,
                    ", ".join(f"{k} ({v:.0%})" for k, v in above.items()), 100 * cfg.copy_share, last)
                break
            saved = {id(p): p.detach().to("cpu", copy=True) for p in params}
    trainee.unet.eval()
    trainee.unet.requires_grad_(False)
    return losses


def merged_pixel_unet(unet: Any) -> Any:
    """A plain ``UNet2DModel`` with the peft adapters of ``unet`` merged into its weights (so that
    the adapted folder loads like any diffusers folder), plus the adapters' own state dict."""
    from diffusers import UNet2DModel
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    lora_state = get_peft_model_state_dict(unet)
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    clean = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    plain = UNet2DModel.from_config(unet.config)
    plain.load_state_dict(clean)
    return plain, lora_state


def save_adapted(pipe: Any, kind: str, method: str, base_folder_url: str, output_url: str,
                 meta: dict[str, Any]) -> None:
    """Write the adapted generator to ``output_url`` as a folder that ``load_generator`` reads."""
    from safetensors.torch import save_file

    if kind == "pixel":
        from feedback_synth.generation.bundled import save_generator

        unet = pipe.unet
        if method == "lora":
            unet, lora_state = merged_pixel_unet(unet)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, LORA_FILE)
                save_file({k: v.contiguous() for k, v in lora_state.items()}, path)
                storage.write_bytes(storage.join(output_url, "lora", LORA_FILE), open(path, "rb").read())
        with tempfile.TemporaryDirectory() as tmp:  # the scheduler of the base folder, as it was
            pipe.scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
            save_generator(unet.cpu(), output_url, meta)
            for name in os.listdir(os.path.join(tmp, "scheduler")):
                storage.write_bytes(storage.join(output_url, "scheduler", name),
                                    open(os.path.join(tmp, "scheduler", name), "rb").read())
        return
    if method != "lora":
        raise ConfigError(f"config field 'adapt.method': 'full' is for the small pixel generators; a {kind} latent "
                          f"model is adapted with 'lora'")
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers)
        storage.write_bytes(storage.join(output_url, LORA_FILE), open(os.path.join(tmp, LORA_FILE), "rb").read())
    storage.write_json(storage.join(output_url, ADAPTED_JSON), {**meta, "base": base_folder_url, "lora": LORA_FILE})


def sample_per_class(pipe: Any, train: ImageSet, per_class: int, gen_cfg: Any, class_index_map: list[int],
                     seed: int = 0, batch_size: int = 64, classes: Optional[list[int]] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` unguided samples of every class (or of ``classes``), as generation makes them
    (SDEdit from real images of the class at ``gen_cfg.strength`` when ``gen_cfg.condition_on_real``);
    uint8 (N, H, W, C)."""
    from feedback_synth.generation.adapters import BatchConditions, adapter_of
    from feedback_synth.generation.shards import _images_to_uint8

    adapter = adapter_of(pipe)
    gen = np.random.default_rng(seed)
    labels = np.repeat(np.arange(train.num_classes) if classes is None else np.asarray(classes, np.int64), per_class)
    sources = np.array([gen.choice(np.flatnonzero(train.labels == c)) for c in labels])
    real = train.to_tensor()
    out = []
    for b in range(0, len(labels), batch_size):
        cls, src = labels[b:b + batch_size], sources[b:b + batch_size]
        init = real[src] if gen_cfg.condition_on_real else None
        conditions = BatchConditions(cls.tolist(), [0] * len(cls), train.class_names, train.group_names, False, init,
                                     gen_cfg.strength, gen_cfg.prompt_template, gen_cfg.group_prompt_template,
                                     gen_cfg.noise_level, class_index_map)
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + b + i) for i in range(len(cls))]
        with torch.no_grad():
            result = pipe(generators=generators, images=init, strength=gen_cfg.strength,
                          num_inference_steps=gen_cfg.num_inference_steps, cfg_scale=gen_cfg.cfg_scale,
                          cond_dropout=gen_cfg.cond_dropout, feedback=None, guide_steps=[],
                          criterion_labels=torch.from_numpy(cls), **adapter.conditioning(pipe, conditions))
        images = result.images
        size = train.images.shape[1]
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        if images.shape[1] != train.images.shape[-1]:
            images = images.mean(1, keepdim=True) if train.images.shape[-1] == 1 else images.expand(-1, 3, -1, -1)
        out.append(_images_to_uint8(images)[0])
    return np.concatenate(out), labels
