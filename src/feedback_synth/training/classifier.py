"""The classifier: a timm model behind a fixed preprocessing contract.

``Classifier`` takes images in [0, 1] at any size and applies its own resize and mean/std
normalisation, so that guidance (which decodes to [0, 1]) and training share one contract.
Checkpoints are a folder: ``model.safetensors`` (weights, no pickle) + ``config.json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from feedback_synth import storage
from feedback_synth.errors import ConfigError, DataError


@dataclass
class ClassifierSpec:
    """Everything needed to rebuild a classifier, saved as ``config.json`` beside the weights."""

    model: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)
    group_names: list[str] = field(default_factory=lambda: ["all"])
    train_class_counts: list[int] = field(default_factory=list)
    # added to every logit: retraining's calibration (training.calibration); empty = none
    logit_bias: list[float] = field(default_factory=list)


class Classifier(nn.Module):
    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        try:
            self.backbone = timm.create_model(spec.model, pretrained=False, num_classes=spec.num_classes,
                                              in_chans=spec.in_chans)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ConfigError(f"config field 'train.model': {exc}") from None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        bias = spec.logit_bias or [0.0] * spec.num_classes
        if len(bias) != spec.num_classes:
            raise DataError(f"classifier config: logit_bias has {len(bias)} values for {spec.num_classes} classes")
        self.register_buffer("logit_bias", torch.tensor(bias, dtype=torch.float32), persistent=False)

    def set_logit_bias(self, bias: list[float]) -> None:
        """Set the offset added to every logit (saved in the spec, so it travels with the checkpoint)."""
        if len(bias) != self.spec.num_classes:
            raise ValueError(f"logit_bias: {len(bias)} values for {self.spec.num_classes} classes")
        self.spec.logit_bias = [float(b) for b in bias]
        self.logit_bias.copy_(torch.tensor(self.spec.logit_bias, dtype=torch.float32))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the backbone's input (size, channels, mean/std)."""
        if x.shape[1] != self.spec.in_chans:
            if self.spec.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.spec.in_chans, -1, -1)
        if x.shape[-1] != self.spec.image_size or x.shape[-2] != self.spec.image_size:
            x = F.interpolate(x, size=(self.spec.image_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.spec.image_size)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features (the ``hardness`` embedding) and logits."""
        h = self.backbone.forward_features(self.preprocess(x))
        feats = self.backbone.forward_head(h, pre_logits=True)
        return feats, self.backbone.get_classifier()(feats) + self.logit_bias.to(feats.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.backbone(self.preprocess(x))
        return logits + self.logit_bias.to(logits.dtype)


def build_classifier(model: str, num_classes: int, in_chans: int, image_size: int, **meta) -> Classifier:
    """``timm.create_model`` plus the preprocessing that timm's data config prescribes."""
    probe = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans) \
        if model in timm.list_models() else None
    if probe is None:
        raise ConfigError(f"config field 'train.model': unknown timm model '{model}'")
    data_cfg = timm.data.resolve_data_config(model=probe)
    mean, std = list(data_cfg["mean"]), list(data_cfg["std"])
    if in_chans != len(mean):  # grey inputs: one mean/std, the average of the RGB ones
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    spec = ClassifierSpec(model=model, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                          mean=mean, std=std, **meta)
    clf = Classifier(spec)
    clf.backbone.load_state_dict(probe.state_dict())
    return clf


def save_classifier(clf: Classifier, url: str, extra_files: Optional[dict[str, str]] = None, *,
                    half: bool = False) -> None:
    """Write ``model.safetensors`` + ``config.json`` (+ extra text files) under ``url``. ``half``: store
    floating-point tensors as float16 (half the file; ``load_classifier`` casts them back)."""
    state = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    storage.write_bytes(storage.join(url, "model.safetensors"), save_safetensors_bytes(state))
    storage.write_json(storage.join(url, "config.json"), asdict(clf.spec))
    for name, text in (extra_files or {}).items():
        storage.write_text(storage.join(url, name), text)


def load_classifier(url: str, device: str) -> Classifier:
    """Rebuild a saved classifier in eval mode on ``device`` (a torch device, or auto/'' for
    ``devices.resolve_device``)."""
    from feedback_synth.devices import resolve_device

    device = resolve_device(device)
    cfg_url = storage.join(url, "config.json")
    if not storage.exists(cfg_url):
        raise DataError(f"not a classifier checkpoint (no config.json): {url}")
    spec = ClassifierSpec(**storage.read_json(cfg_url))
    try:
        clf = Classifier(spec)
    except DataError as exc:  # e.g. a logit_bias of the wrong length: name the file
        raise DataError(f"{cfg_url}: {exc}") from None
    clf.load_state_dict(load_safetensors_bytes(storage.read_bytes(storage.join(url, "model.safetensors"))))
    return clf.to(device).eval()


def classifier_spec(url: str) -> ClassifierSpec:
    """The spec (model name, classes, input size) of a saved classifier, from its config alone."""
    cfg_url = storage.join(url, "config.json")
    if not storage.exists(cfg_url):
        raise DataError(f"not a classifier checkpoint (no config.json): {url}")
    return ClassifierSpec(**storage.read_json(cfg_url))
