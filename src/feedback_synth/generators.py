"""Generators: the bundled digits generator (pretraining, loading) and diffusers models from URLs."""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from . import io
from .data import ImageSet
from .errors import ConfigError, DataError
from .diffusion import ClassConditionalFeedbackPipeline, TextFeedbackPipeline

BUILTIN_GENERATOR = "builtin"


@dataclass
class PretrainConfig:
    steps: int = 3000  # optimiser steps (~12 min on 2 idle CPU cores)
    batch_size: int = 64
    lr: float = 1e-3  # AdamW peak lr, cosine-decayed
    class_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    block_out_channels: tuple = (32, 64, 64)
    seed: int = 0
    device: str = "cpu"
    joint_groups: bool = False  # condition on (class, group) pairs (group-imbalanced data)

    def validate(self, prefix: str = "pretrain") -> None:
        if self.steps < 1:
            raise ConfigError(f"config field '{prefix}.steps': must be >= 1, got {self.steps}")
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"config field '{prefix}.class_dropout': must be in [0, 1)")


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
    cfg.validate()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    h, _, c = pool.images.shape[1:]
    cond = condition_index(pool.labels, pool.groups, pool.num_groups, cfg.joint_groups)
    num_conditions = pool.num_classes * (pool.num_groups if cfg.joint_groups else 1)
    unet = UNet2DModel(**unet_config(h, c, num_conditions, cfg.block_out_channels)).to(device)
    sched = training_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
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
                    io.write_bytes(io.join(output_url, sub, name), f.read())
    io.write_json(io.join(output_url, "generator.json"), meta)


def builtin_generator_path(name: str = "digits-lt") -> str:
    """The folder of a generator shipped inside the package."""
    return str(resources.files("feedback_synth") / "weights" / f"{name}-generator")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def _local_copy(url: str, weights: bool = True) -> str:
    """diffusers loads local folders: copy a remote (gs://, memory://) model folder to a temp dir
    (without its weight files when ``weights`` is False: configs and tokenizers only)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = io.fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        return path
    tmp = tempfile.mkdtemp(prefix="feedback-synth-model-")
    if weights:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        return tmp
    root = path.rstrip("/")
    for remote in fs.find(root):
        if not remote.endswith(WEIGHT_SUFFIXES):
            local = os.path.join(tmp, os.path.relpath(remote, root))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get(remote, local)
    return tmp


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside get their weights in ``dtype`` directly: no float32 copy first, and no
    ``.to()`` afterwards (which FakeTensorMode cannot do to a module)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_part(cls, path: str, subfolder: str, dtype: torch.dtype = torch.float32, weights: bool = True):
    """One model component of a diffusers folder, in ``dtype``: from its weights, or with
    ``weights=False`` from its config alone (random weights; for sizing under FakeTensorMode)."""
    from diffusers import ModelMixin

    diffusers_model = issubclass(cls, ModelMixin)
    if weights:
        return cls.from_pretrained(path, subfolder=subfolder, **{"torch_dtype" if diffusers_model else "dtype": dtype})
    with default_dtype(dtype):
        if diffusers_model:
            return cls.from_config(cls.load_config(path, subfolder=subfolder))
        return cls(cls.config_class.from_pretrained(path, subfolder=subfolder))


def load_generator(spec: str, dataset_name: str = "digits-lt", device: str = "cpu",
                   dtype: torch.dtype = torch.float32,
                   weights: bool = True) -> Union[ClassConditionalFeedbackPipeline, TextFeedbackPipeline]:
    """Load the bundled generator (``builtin``) or a diffusers model folder from any fsspec URL.

    A folder with ``image_encoder/`` (and ``vae/``) is a stable unCLIP image-conditioned model; one
    with ``vae/`` and ``text_encoder/`` is a latent text-conditioned model; one with only ``unet/``
    and ``scheduler/`` is a pixel class-conditional model. ``weights=False`` builds the same
    pipeline from the configs only (``generate.estimate_generation_memory``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub unless the user set it up
    if spec == BUILTIN_GENERATOR:
        path = builtin_generator_path(dataset_name)
        if not os.path.isdir(path):
            raise ConfigError(f"config field 'generate.generator': no bundled generator for dataset "
                              f"'{dataset_name}' (looked in {path}); train one with `feedback-synth pretrain-generator`")
    else:
        if not io.exists(spec):
            raise DataError(f"generator model folder not found: {spec}")
        path = _local_copy(spec, weights)
    try:
        pipe = _assemble(path, spec, dtype, weights)
    except OSError as exc:  # diffusers/transformers: a config or weight file missing or unreadable
        raise DataError(f"generator model folder {spec}: {exc}") from None
    if device != "cpu":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assemble(path: str, spec: str, dtype: torch.dtype,
              weights: bool) -> Union[ClassConditionalFeedbackPipeline, TextFeedbackPipeline]:
    """The pipeline of a local model folder, on the CPU, by the folder's layout (``load_generator``)."""
    from .unclip import is_unclip_folder, load_unclip_pipeline

    if is_unclip_folder(path):
        return load_unclip_pipeline(path, "cpu", dtype, weights)
    if os.path.isdir(os.path.join(path, "vae")):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return TextFeedbackPipeline(
            vae=load_part(AutoencoderKL, path, "vae", torch.float32, weights),  # in the gradient path: float32
            text_encoder=load_part(CLIPTextModel, path, "text_encoder", dtype, weights),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            unet=load_part(UNet2DConditionModel, path, "unet", dtype, weights),
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"))
    if not os.path.isdir(os.path.join(path, "unet")):
        raise DataError(f"not a diffusers model folder (no unet/): {spec}")
    return ClassConditionalFeedbackPipeline(
        unet=load_part(UNet2DModel, path, "unet", dtype, weights),
        scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"))


def generator_meta(spec: str, dataset_name: str = "digits-lt") -> dict[str, Any]:
    path = builtin_generator_path(dataset_name) if spec == BUILTIN_GENERATOR else spec
    url = io.join(path, "generator.json")
    return io.read_json(url) if io.exists(url) else {}


def generator_fidelity(generator_url: str, pool: ImageSet, per_class: int = 50, model: str = "resnet10t",
                       num_inference_steps: int = 20, cfg_scale: float = 2.0, seed: int = 0) -> dict[str, Any]:
    """How recognisable the generator's unguided, purely class-conditional samples are: the accuracy
    of a classifier trained on the balanced generator pool on ``per_class`` samples of each class."""
    from .config import RetrainConfig
    from .evaluate import predict_logits
    from .train import train_classifier

    pipe = load_generator(generator_url)
    judge, _ = train_classifier(pool, RetrainConfig(seed=seed), model, desc="pool classifier")
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
