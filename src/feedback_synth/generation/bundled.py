"""The bundled digits generator: its UNet, its pretraining on the generator pool, its fidelity."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from pydantic import Field
from pydantic import StrictBool as Bool
from pydantic import StrictFloat as Float
from pydantic import StrictInt as Int
from pydantic import StrictStr as Str
from tqdm.auto import tqdm

from feedback_synth import storage
from feedback_synth.config import section
from feedback_synth.data.imageset import ImageSet
from feedback_synth.devices import resolve_device
from feedback_synth.generation.loading import load_generator
from feedback_synth.training.train import one_cycle


@section("pretrain")
class PretrainConfig:
    section: ClassVar[str]
    steps: Int = Field(3000, ge=1)  # optimiser steps (~12 min on 2 idle CPU cores)
    batch_size: Int = Field(64, ge=1)
    lr: Float = Field(1e-3, gt=0)  # AdamW peak lr, cosine-decayed
    class_dropout: Float = Field(0.1, ge=0, lt=1)  # share of labels replaced by the null class (classifier-free guidance)
    block_out_channels: tuple[Int, ...] = (32, 64, 64)
    seed: Int = 0
    device: Str = "auto"  # auto (CUDA where present) | cpu | cuda | cuda:N | mps
    joint_groups: Bool = False  # condition on (class, group) pairs (group-imbalanced data)


def unet_config(sample_size: int, channels: int, num_conditions: int, block_out_channels=(32, 64, 64)) -> dict[str, Any]:
    """The bundled generator's UNet: small, class-conditional, one extra (null) class for CFG."""
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        num_class_embeds=num_conditions + 1, norm_num_groups=8,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False)


def condition_index(labels: np.ndarray, groups: np.ndarray, num_groups: int, joint: bool) -> np.ndarray:
    """The generator's condition: the class, or the joint (class, group) index."""
    return labels * num_groups + groups if joint else labels


def pretrain_generator(pool: ImageSet, cfg: PretrainConfig, output_url: str) -> dict[str, float]:
    """Train the bundled generator on the generator pool only (never on the task's data).

    Writes a diffusers folder (``unet/``, ``scheduler/``) and ``generator.json`` to ``output_url``.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(resolve_device(cfg.device, "pretrain.device"))
    h, _, c = pool.images.shape[1:]
    cond = condition_index(pool.labels, pool.groups, pool.num_groups, cfg.joint_groups)
    num_conditions = pool.num_classes * (pool.num_groups if cfg.joint_groups else 1)
    unet = UNet2DModel(**unet_config(h, c, num_conditions, cfg.block_out_channels)).to(device)
    sched = training_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-4)
    lr_sched = one_cycle(opt, cfg.lr, cfg.steps, 0.05)
    x_all = pool.to_tensor() * 2 - 1
    y_all = torch.from_numpy(cond)
    ema = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretrain generator", unit="step", mininterval=2)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x0, y = x_all[idx].to(device), y_all[idx].clone()
        y[torch.rand(len(y), generator=gen) < cfg.class_dropout] = num_conditions  # null class
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y.to(device)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update_parameters(unet)
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    unet.load_state_dict(ema.module.state_dict())
    save_generator(unet.cpu(), output_url, {"pretrain": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in asdict(cfg).items()},
                                            "class_names": pool.class_names, "group_names": pool.group_names,
                                            "joint_groups": cfg.joint_groups,
                                            "final_loss": float(np.mean(losses[-200:]))})
    return {"final_loss": float(np.mean(losses[-200:]))}


def save_generator(unet: UNet2DModel, output_url: str, meta: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(os.path.join(tmp, "unet"))
        DDIMScheduler.from_config(training_scheduler().config).save_pretrained(os.path.join(tmp, "scheduler"))
        for sub in ("unet", "scheduler"):
            for name in os.listdir(os.path.join(tmp, sub)):
                with open(os.path.join(tmp, sub, name), "rb") as f:
                    storage.write_bytes(storage.join(output_url, sub, name), f.read())
    storage.write_json(storage.join(output_url, "generator.json"), meta)


def generator_fidelity(generator_url: str, pool: ImageSet, per_class: int = 50, model: str = "resnet10t",
                       num_inference_steps: int = 20, cfg_scale: float = 2.0, seed: int = 0, *,
                       device: str) -> dict[str, Any]:
    """How recognisable the generator's unguided, purely class-conditional samples are: the accuracy
    of a classifier trained on the balanced generator pool on ``per_class`` samples of each class
    (both on ``device``)."""
    from feedback_synth.config import RetrainConfig
    from feedback_synth.training.evaluate import predict_logits
    from feedback_synth.training.train import train_classifier

    pipe = load_generator(generator_url, device=device)
    judge, _ = train_classifier(pool, RetrainConfig(seed=seed, device=device), model, desc="pool classifier")
    labels = torch.arange(pool.num_classes).repeat_interleave(per_class)
    # a joint (class, group) generator is asked for every group of the class in turn
    joint = pipe.unet.config.num_class_embeds - 1 == pool.num_classes * pool.num_groups and pool.num_groups > 1
    conditions = labels * pool.num_groups + torch.arange(len(labels)) % pool.num_groups if joint else labels
    images = []
    for b in range(0, len(labels), 100):
        cond = conditions[b:b + 100]
        gens = [torch.Generator().manual_seed(seed * 100003 + b + i) for i in range(len(cond))]
        images.append(pipe(class_labels=cond, generators=gens, num_inference_steps=num_inference_steps,
                           cfg_scale=cfg_scale).images)
    x = torch.cat(images)
    samples = ImageSet((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels.numpy(),
                       np.zeros(len(labels), np.int64), np.array([str(i) for i in range(len(labels))]),
                       pool.class_names)
    preds = predict_logits(judge, samples).argmax(1)
    per = [float((preds[labels.numpy() == c] == c).mean()) for c in range(pool.num_classes)]
    return {"fidelity": float((preds == samples.labels).mean()), "per_class": per, "samples_per_class": per_class,
            "judge": model, "num_inference_steps": num_inference_steps, "cfg_scale": cfg_scale}
