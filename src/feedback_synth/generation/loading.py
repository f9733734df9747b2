"""Loading generators: the bundled one or a diffusers model folder from any fsspec URL."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING

import torch

from feedback_synth import storage
from feedback_synth.devices import resolve_device
from feedback_synth.errors import ConfigError, DataError
from feedback_synth.generation.adapters import GENERATOR_ADAPTERS, adapter_for_folder

if TYPE_CHECKING:  # diffusers is imported where a generator is loaded: pre-flight checks need only the folder
    from diffusers import DiffusionPipeline

BUILTIN_GENERATOR = "builtin"
ADAPTED_JSON = "adapted_generator.json"  # a LoRA-adapted latent generator: its base folder and LoRA file
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for LoRA weights


# built-in datasets that share another's bundled generator (digits-gap: digits-lt's pool, another task style)
SHARED_GENERATORS = {"digits-gap": "digits-lt"}


def builtin_generator_path(name: str = "digits-lt") -> str:
    """The folder of a generator shipped inside the package."""
    name = SHARED_GENERATORS.get(name, name)
    return str(resources.files("feedback_synth") / "weights" / f"{name}-generator")


def generator_path(spec: str, dataset_name: str = "digits-lt") -> str:
    """Where the generator ``spec`` lives: the bundled one's folder, or ``spec`` itself (a URL)."""
    return builtin_generator_path(dataset_name) if spec == BUILTIN_GENERATOR else spec


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


@contextlib.contextmanager
def local_folder(url: str, weights: bool = True) -> Iterator[str]:
    """diffusers loads local folders: a local ``url``'s own path, or a remote (gs://, memory://) model
    folder copied to a temporary folder (without its weight files when ``weights`` is False: configs
    and tokenizers only) that is removed on the way out: a pod or laptop that loads a generator
    again and again keeps no copies of it."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = storage.fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="feedback-synth-model-")
    try:
        if weights:
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        else:
            root = path.rstrip("/")
            for remote in fs.find(root):
                if not remote.endswith(WEIGHT_SUFFIXES):
                    local = os.path.join(tmp, os.path.relpath(remote, root))
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    fs.get(remote, local)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_generator(spec: str, dataset_name: str = "digits-lt", *, device: str,
                   dtype: torch.dtype = torch.float32,
                   weights: bool = True) -> DiffusionPipeline:
    """Load the bundled generator (``builtin``) or a diffusers model folder from any fsspec URL, on
    ``device`` (a torch device, or auto/'' for ``devices.resolve_device``).

    The folder's kind (unCLIP, text, pixel) is decided by the generator adapters
    (``generation.adapters``). ``weights=False`` builds the same pipeline from the configs only
    (``generation.memory.estimate_generation_memory``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub unless the user set it up
    if spec == BUILTIN_GENERATOR:
        path = builtin_generator_path(dataset_name)
        if not os.path.isdir(path):
            raise ConfigError(f"config field 'generate.generator': no bundled generator for dataset "
                              f"'{dataset_name}' (looked in {path}); train one with `feedback-synth pretrain-generator`")
        return _load_folder(path, spec, dataset_name, device, dtype, weights)
    if not storage.exists(spec):
        raise DataError(f"generator model folder not found: {spec}")
    with local_folder(spec, weights) as path:  # the weights are in memory once loaded: the copy can go
        return _load_folder(path, spec, dataset_name, device, dtype, weights)


def _load_folder(path: str, spec: str, dataset_name: str, device: str, dtype: torch.dtype,
                 weights: bool) -> DiffusionPipeline:
    """``load_generator`` on a local folder ``path`` (``spec``: what the user named, for errors)."""
    adapted = os.path.join(path, ADAPTED_JSON)
    if os.path.isfile(adapted):  # a LoRA-adapted latent model: its base folder, then the LoRA over it
        import json

        with open(adapted) as f:
            base = json.load(f)["base"]
        return apply_adapted_lora(load_generator(base, dataset_name, device=device, dtype=dtype, weights=weights), path)
    adapter = adapter_for_folder(path)
    if adapter is None:
        raise DataError(f"not a diffusers model folder this project knows: {spec} (expected unet/ and scheduler/, "
                        f"with vae/ for a latent model and image_encoder/ for unCLIP; kinds: "
                        f"{', '.join(GENERATOR_ADAPTERS)})")
    try:
        pipe = adapter.load(path, dtype, weights)
    except OSError as exc:  # diffusers/transformers: a config or weight file missing or unreadable
        raise DataError(f"generator model folder {spec}: {exc}") from None
    device = resolve_device(device, "generate.device")
    if device != "cpu":  # diffusers loads on the CPU
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_adapted_lora(pipe, folder: str):
    """Load the LoRA of an adapted latent generator folder into ``pipe``'s UNet (diffusers' own
    ``load_lora_adapter``) and fuse it into the weights (``fuse_lora``, then ``unload_lora``), so
    that generation runs a plain UNet at full speed."""
    pipe.unet.load_lora_adapter(os.path.join(folder, LORA_FILE), adapter_name="task", prefix="unet")
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()  # the fused weights stay; the adapter modules go (a plain UNet again)
    return pipe


def generator_meta(folder_url: str) -> dict:
    """A generator folder's ``generator.json`` (the bundled and adapted pixel generators write one:
    its class names, how it was trained), else {}."""
    for name in ("generator.json", "adapted_generator.json"):
        url = storage.join(folder_url, name)
        if storage.exists(url):
            return storage.read_json(url)
    return {}


def class_index(folder_url: str, class_names: list[str], class_map: dict[str, str] | None = None) -> list[int]:
    """The generator's condition index of each task class, matched by *name* (never by position):
    ``class_map`` maps a task class to a generator class where the names differ. A generator that
    lists no class names (a prompt-conditioned model names classes in its prompts) keeps the task's
    order. Refuses with the unmatched names."""
    meta = generator_meta(folder_url)
    names = meta.get("task_class_names") and meta.get("class_names")  # an adapted generator: its base's names
    names = names or meta.get("class_names")
    if not names:
        return list(range(len(class_names)))
    class_map = class_map or {}
    unknown = sorted(set(class_map) - set(class_names))
    if unknown:
        raise ConfigError(f"config field 'generate.class_map': {unknown[:5]} are not classes of the dataset "
                          f"({', '.join(class_names[:10])})")
    wanted = [class_map.get(c, c) for c in class_names]
    missing = [f"{c!r}" + (f" (mapped to {w!r})" if w != c else "") for c, w in zip(class_names, wanted) if w not in names]
    if missing:
        raise ConfigError(f"the generator {folder_url} has no class {', '.join(missing[:5])}"
                          f"{' and more' if len(missing) > 5 else ''}: its classes are {', '.join(map(repr, names[:12]))}. "
                          f"Name the dataset's class folders as the generator's classes, or map them with "
                          f"--set generate.class_map='{{\"<dataset class>\": \"<generator class>\"}}'")
    return [names.index(w) for w in wanted]
