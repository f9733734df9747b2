"""One model component of a diffusers folder, with or without its weights."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


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
