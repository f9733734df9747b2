"""Tiny models built from config (no download), shared by the tests: a pixel class-conditional
generator, a latent text-to-image model, a stable unCLIP model and a timm classifier; and
``shared_by_workers``, for what the xdist workers of one run make once; ``wait_for_stage_run``, for
tests that interrupt a run while a stage is at work."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

EMBED_DIM = 16


def run_temp_folder(tmp_path_factory) -> Path:
    """This test run's temp folder, which its xdist workers share: the parent of a worker's base
    temp folder (the controller's own), or the base temp folder without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_by_workers(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name``, made by ``make(folder)`` once per test run: the xdist workers of one run
    share it (the base temp folder's parent is the run's); the first to ask makes it under a file
    lock, the others wait for it. Tests must not change what is in it."""
    import filelock

    root = run_temp_folder(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with filelock.FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def wait_for_stage_run(output: Path, stage: str, proc, timeout: float = 300) -> None:
    """Wait until the run in ``output`` has an MLflow run named ``stage`` that is RUNNING (the stage
    is at work and its run is open), while ``proc`` (the run's process) lives. Reads the store's
    SQLite file read-only, so it never creates or migrates it beside the run."""
    import sqlite3
    import time

    db, deadline = output / "mlflow" / "mlflow.db", time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                    if con.execute("SELECT 1 FROM runs WHERE name = ? AND status = 'RUNNING'", (stage,)).fetchone():
                        return
            except sqlite3.OperationalError:  # the run is still creating the store's tables
                pass
        time.sleep(0.1)
    raise AssertionError(f"{stage} was never at work with its MLflow run open (process exit code {proc.poll()})")


def build_tiny_pixel_generator(path: str, channels: int = 1, num_conditions: int = 10, seed: int = 0) -> str:
    """A random-weight class-conditional pixel generator folder (the bundled generator's layout)."""
    from diffusers import UNet2DModel

    from feedback_synth.generation.bundled import save_generator, unet_config

    torch.manual_seed(seed)
    save_generator(UNet2DModel(**unet_config(16, channels, num_conditions, (8, 16))), path,
                   {"note": "random weights for tests"})
    return path


def build_small_classifier(train, path: str, epochs: int = 8, model: str = "test_resnet"):
    """A small timm classifier trained briefly on ``train``, saved as a checkpoint folder at ``path``."""
    from feedback_synth.config import RetrainConfig
    from feedback_synth.training.classifier import save_classifier
    from feedback_synth.training.train import train_classifier

    clf, _ = train_classifier(train, RetrainConfig(epochs=epochs, seed=0), model)
    save_classifier(clf, path)
    return clf


def build_tiny_text_model(path: str) -> None:
    """A tiny latent text-to-image model folder in the diffusers layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(chars) + sorted(c + "</w>" for c in chars))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                                num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False)
    for name, part in (("tokenizer", tokenizer), ("text_encoder", text_encoder), ("vae", vae), ("unet", unet),
                       ("scheduler", scheduler)):
        part.save_pretrained(os.path.join(path, name))


def build_tiny_unclip_model(path: str, prediction_type: str = "v_prediction") -> None:
    """A tiny stable unCLIP folder in the layout of ``StableUnCLIPImg2ImgPipeline.save_pretrained``.

    The tokenizer, text encoder and VAE are the tiny text model's; SD 2.1 unCLIP predicts v.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    build_tiny_text_model(path)
    torch.manual_seed(1)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBED_DIM)
    with torch.no_grad():  # non-trivial statistics, so that scale/unscale are exercised
        normalizer.mean.normal_(0, 0.1)
        normalizer.std.uniform_(0.5, 1.5)
    parts = {
        "unet": UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                     norm_num_groups=8, attention_head_dim=4, class_embed_type="projection",
                                     projection_class_embeddings_input_dim=2 * EMBED_DIM),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8, projection_dim=EMBED_DIM)),
        "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "image_normalizer": normalizer,
        "image_noising_scheduler": DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        "scheduler": DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   prediction_type=prediction_type),
    }
    for name, part in parts.items():
        part.save_pretrained(os.path.join(path, name))


# -- image files for dataset tests ----------------------------------------------------------------


def png(value: int, size: int | tuple[int, int] = 12, mode: str = "L") -> bytes:
    """A small grey PNG: ``value`` with a lighter patch (distinct values give distinct files),
    saved in ``mode``; ``size``: a side or ``(width, height)``."""
    import io

    import numpy as np
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    arr = np.full((h, w), value, np.uint8)
    arr[2:6, 3:9] = 255 - value
    buf = io.BytesIO()
    Image.fromarray(arr, "L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def colour_png(size: int = 12, mode: str = "RGB") -> bytes:
    """A small red-ish PNG (its bands differ), saved in ``mode``."""
    import io

    import numpy as np
    from PIL import Image

    arr = np.zeros((size, size, 3), np.uint8)
    arr[..., 0], arr[..., 2] = 200, 40
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def class_folders(root: str, counts: dict[str, dict[str, int]], size: int = 12) -> None:
    """``root/<split>/<class>/<i>.png`` (any fsspec URL) with ``counts[split][class]`` images; every
    file differs from every other (identical files would warn of leakage)."""
    from feedback_synth import storage

    n = 0
    for split, per_class in counts.items():
        for cls, count in per_class.items():
            for i in range(count):
                n += 1
                storage.write_bytes(storage.join(str(root), split, cls, f"{i}.png"), png((3 * n) % 250, size))
