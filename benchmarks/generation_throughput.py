"""Generation throughput: images per second and peak memory, unguided vs feedback-guided.

Rows per batch size: unguided; guided at every step, every 5th, every 10th, each with the gradient
through the UNet (the reference code) and without it (eps held constant in the guided step).

- CPU: the bundled digits generator (its shipped weights if present, else random weights of the
  same config) with the default baseline classifier (resnet10t, 16x16), 20 DDIM steps, CFG 2.
- GPU (when CUDA is available): Stable Diffusion 2.1 (text) and SD 2.1 unCLIP (image-conditioned)
  sized components with random weights, built from the published configs written out below (no
  download); 512 px, batch 8, 30 DDIM steps, CFG 5, UNet and encoders in bfloat16, VAE decode +
  classifier (ResNet-50, 224 px, 1000 classes) in float32 or bfloat16 in the gradient path.

- Any machine: the estimated peak memory of the SD-sized pipelines at batch 8, 512 px, for each
  gradient path and memory lever (checkpointing, chunked guidance), from FakeTensorMode (no kernels
  run): which settings fit a 24 GB card, before a GPU is at hand.

Peak memory: ``torch.cuda.max_memory_allocated`` on the GPU; on the CPU the peak growth of the
memory malloc'ed by the process during the run (glibc ``mallinfo2``), sampled every 2 ms.

    python benchmarks/generation_throughput.py                 # CPU part ~5-8 min on 2 cores
    python benchmarks/generation_throughput.py --smoke         # the GPU code path, tiny, on the CPU

The table is printed and written to benchmarks/results/generation_throughput.md with the command.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from feedback_synth.generation.performance import ensure_sdpa  # noqa: E402
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, guided_step_indices  # noqa: E402

IMAGENET_LT_IMAGES = 1_184_154  # the reference rule's full plan on ImageNet-LT (docs/method.md: how many to generate)
SCHEDULES = ((None, None), (1, True), (1, False), (5, True), (5, False), (10, True), (10, False))
# --smoke checks the code paths, not the timings: unguided, and guided with and without the gradient
# through the UNet (how often a step is guided does not change the code that runs)
SMOKE_SCHEDULES = SCHEDULES[:3]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generation_throughput.md")

# ---------------------------------------------------------------- published configs (SD 2.1, no download)
# stabilityai/stable-diffusion-2-1-base unet/config.json (512 px, epsilon); SD 2.1 (768 px) differs
# only in sample_size 96 and v-prediction.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    norm_num_groups=32, norm_eps=1e-5, use_linear_projection=True, upcast_attention=False,
)
# stabilityai/stable-diffusion-2-1-unclip unet/config.json: the same UNet plus the image-embedding
# input (CLIP ViT-H/14 image embedding 1024 + noise-level embedding 1024), 768 px, v-prediction.
SD21_UNCLIP_UNET = dict(SD21_UNET, sample_size=96, class_embed_type="projection",
                        projection_class_embeddings_input_dim=2048, upcast_attention=True)
SD2_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215,
)
# OpenCLIP ViT-H/14 text tower (SD 2.x text_encoder/config.json; penultimate layer kept: 23 layers)
SD2_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# OpenCLIP ViT-H/14 image tower (SD 2.1 unCLIP image_encoder/config.json)
SD21_UNCLIP_IMAGE_ENCODER = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
SD21_UNCLIP_SCHEDULER = dict(SD21_SCHEDULER, prediction_type="v_prediction")
SD21_UNCLIP_NOISING = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)

# --smoke: the same code path with every width cut down, to check the GPU branch on a CPU
SMOKE = {
    "unet": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32,
                 layers_per_block=1, norm_num_groups=8),
    "unclip_unet": dict(projection_class_embeddings_input_dim=32),
    "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, layers_per_block=1),
    "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
    "image": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=16),
}


@dataclass
class Row:
    model: str
    device: str
    precision: str
    batch: int
    steps: int
    every: Optional[int]
    through_unet: Optional[bool]
    seconds: float = float("nan")  # wall-clock per batch (fastest of the repeats)
    cpu_seconds: float = float("nan")  # CPU time of this process per batch (CPU rows; robust to other jobs)
    peak_mib: float = float("nan")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def schedule(self) -> str:
        return "unguided" if self.every is None else ("every step" if self.every == 1 else f"every {self.every}th")

    @property
    def per_image(self) -> float:
        return self.seconds / self.batch

    @property
    def cost(self) -> float:
        """Per-image cost used for ratios: CPU time on the CPU (other jobs inflate wall time), else wall."""
        return (self.cpu_seconds if self.device == "cpu" else self.seconds) / self.batch


# ---------------------------------------------------------------- measuring


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Callable[[], int]:
    """Bytes malloc'ed and not freed (glibc ``mallinfo2``: heap + mmapped), else the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def in_use() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        in_use()
        return in_use
    except (OSError, AttributeError):
        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        return rss


class PeakCPUMemory:
    """Peak growth of this process's allocated memory while the block runs, sampled every 2 ms."""

    in_use = staticmethod(_heap_in_use())

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.in_use() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.in_use()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use() - self.base)


def measure(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Fastest of ``repeats`` calls: wall seconds, process CPU seconds (other jobs on a shared machine
    only add time), and the peak memory in MiB."""
    times, cpu_times, peak = [], [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
        else:
            with PeakCPUMemory() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            peak = max(peak, mem.peak / 2**20)
    return min(times), min(cpu_times) if cpu_times else float("nan"), peak


def run_rows(model: str, device: torch.device, precision: str, batch: int, steps: int, repeats: int,
             sample: Callable[[Optional[FeedbackGuidance], list[int], bool], Any], make_feedback: Callable[[], FeedbackGuidance],
             schedules=SCHEDULES) -> list[Row]:
    """One row per schedule. The repeats are interleaved (all schedules, then all again), so that a
    busy spell of other jobs on the machine does not fall on one row only; each row keeps its fastest."""
    rows = [Row(model, device.type, precision, batch, steps, every, through) for every, through in schedules]
    for _ in range(repeats):
        for row in rows:
            if row.note:
                continue
            fb = make_feedback() if row.every is not None else None
            guide = guided_step_indices(steps, row.every) if row.every is not None else []
            try:
                wall, cpu, peak = measure(lambda: sample(fb, guide, bool(row.through_unet)), device, 1)
            except torch.OutOfMemoryError:
                row.note = "out of memory"
                torch.cuda.empty_cache()
                continue
            row.seconds = wall if row.seconds != row.seconds else min(row.seconds, wall)
            row.cpu_seconds = cpu if row.cpu_seconds != row.cpu_seconds else min(row.cpu_seconds, cpu)
            row.peak_mib = peak if row.peak_mib != row.peak_mib else max(row.peak_mib, peak)
    for row in rows:
        print(f"  {model:<34} batch {batch:>3} {row.schedule:<12} unet-grad {str(row.through_unet):<5} "
              f"{row.seconds:8.3f} s/batch (CPU {row.cpu_seconds:8.3f} s) {row.peak_mib:9.1f} MiB {row.note}", flush=True)
    return rows


# ---------------------------------------------------------------- CPU: the bundled generator


def cpu_rows(batch_sizes: list[int], steps: int, repeats: int) -> tuple[list[Row], str]:
    from diffusers import DDIMScheduler, UNet2DModel

    from feedback_synth.generation.bundled import training_scheduler, unet_config
    from feedback_synth.generation.diffusion import ClassConditionalFeedbackPipeline
    from feedback_synth.generation.loading import builtin_generator_path, load_generator
    from feedback_synth.training.classifier import build_classifier

    device = torch.device("cpu")
    path = builtin_generator_path("digits-lt")
    if os.path.isdir(path):
        pipe, source = load_generator("builtin", "digits-lt", device="cpu"), "shipped weights"
    else:
        torch.manual_seed(0)
        pipe = ClassConditionalFeedbackPipeline(UNet2DModel(**unet_config(16, 1, 10)),
                                                DDIMScheduler.from_config(training_scheduler().config))
        source = "random weights, the shipped config"
    pipe.set_progress_bar_config(disable=True)
    ensure_sdpa(pipe.unet)
    torch.manual_seed(0)
    clf = build_classifier("resnet10t", 10, 1, 16).eval()
    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    model = f"digits generator ({n_params:.1f} M, 16 px)"

    rows = []
    for batch in batch_sizes:
        labels = torch.arange(batch) % 10

        def sample(fb, guide, through, labels=labels):
            gens = [torch.Generator().manual_seed(i) for i in range(len(labels))]
            return pipe(class_labels=labels, generators=gens, num_inference_steps=steps, cfg_scale=2.0,
                        cond_dropout=0.1, feedback=fb, guide_steps=guide, grad_through_unet=through)

        sample(FeedbackGuidance(clf, "entropy", 0.02), [0], True)  # warm-up (allocator, kernels)
        rows += run_rows(model, device, "float32", batch, steps, repeats, sample,
                         lambda: FeedbackGuidance(clf, "entropy", 0.02))
    return rows, f"{model}: {source}; classifier resnet10t (random weights); {steps} DDIM steps, CFG 2"


# ---------------------------------------------------------------- GPU: SD-sized latent components


def _char_tokenizer(max_length: int):
    """A byte-level CLIP tokenizer without merges: fine for timing (ids < the encoder's vocab)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(chars) + sorted(c + "</w>" for c in chars))}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_latent_pipeline(kind: str, device: torch.device, dtype: torch.dtype, smoke: bool):
    """Random-weight SD 2.1 (``text``) or SD 2.1 unCLIP (``unclip``) pipeline from the configs above."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from feedback_synth.generation.diffusion import TextFeedbackPipeline
    from feedback_synth.generation.parts import default_dtype
    from feedback_synth.generation.unclip import UnCLIPFeedbackPipeline

    def cfg(base, key):
        return dict(base, **SMOKE[key]) if smoke else dict(base)

    torch.manual_seed(0)
    with torch.device(device):
        text_cfg = cfg(SD2_TEXT_ENCODER, "text")
        unet_cfg = cfg(SD21_UNCLIP_UNET if kind == "unclip" else SD21_UNET, "unet")
        if kind == "unclip" and smoke:
            unet_cfg.update(SMOKE["unclip_unet"])
        unet_cfg["cross_attention_dim"] = text_cfg["hidden_size"]
        with default_dtype(torch.float32):  # the VAE is in the gradient path
            vae = AutoencoderKL(**cfg(SD2_VAE, "vae"))
        with default_dtype(dtype):
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
            unet = UNet2DConditionModel(**unet_cfg)
        scheduler = DDIMScheduler(**(SD21_UNCLIP_SCHEDULER if kind == "unclip" else SD21_SCHEDULER))
        parts = dict(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                     tokenizer=_char_tokenizer(text_cfg["max_position_embeddings"]))
        if kind == "unclip":
            image_cfg = cfg(SD21_UNCLIP_IMAGE_ENCODER, "image")
            with default_dtype(dtype):
                image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**image_cfg))
            parts.update(
                image_encoder=image_encoder,
                feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
                image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=image_cfg["projection_dim"]),
                image_noising_scheduler=DDPMScheduler(**SD21_UNCLIP_NOISING))
    pipe = (UnCLIPFeedbackPipeline if kind == "unclip" else TextFeedbackPipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    ensure_sdpa(pipe.unet, pipe.vae)
    return pipe


def count_params(kind: str) -> dict[str, float]:
    """Parameter counts (millions) of the full-size configs, built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**(SD21_UNCLIP_UNET if kind == "unclip" else SD21_UNET)),
                 "vae": AutoencoderKL(**SD2_VAE), "text_encoder": CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER))}
        if kind == "unclip":
            parts["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**SD21_UNCLIP_IMAGE_ENCODER))
    return {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in parts.items()}


def gpu_rows(device: torch.device, batch: int, resolution: int, steps: int, repeats: int, smoke: bool,
             estimate: bool = True) -> tuple[list[Row], list[str]]:
    from feedback_synth.config import GenerateConfig
    from feedback_synth.generation.performance import apply_performance_options
    from feedback_synth.training.classifier import build_classifier

    dtype = torch.bfloat16
    torch.manual_seed(0)
    clf = build_classifier("resnet18" if smoke else "resnet50", 1000, 3, 64 if smoke else 224).to(device).eval()
    prompts = ["a photo of a goldfish"] * batch
    labels = torch.full((batch,), 1)
    notes, rows = [], []
    for kind, name in (("text", "SD 2.1 (text)"), ("unclip", "SD 2.1 unCLIP (image)")):
        pipe = build_latent_pipeline(kind, device, dtype, smoke)
        n = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None))
                if m is not None for p in m.parameters()) / 1e6
        label = f"{name}, {resolution} px" + (" [smoke]" if smoke else "")
        notes.append(f"{label}: {n:.0f} M parameters (random weights), {steps} DDIM steps, CFG 5")
        cond = torch.rand(batch, 3, 256, 256)

        def sample(fb, guide, through, pipe=pipe, kind=kind):
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            extra = dict(condition_images=cond, noise_level=0) if kind == "unclip" else {}
            return pipe(prompts=prompts, criterion_labels=labels, generators=gens, height=resolution, width=resolution,
                        num_inference_steps=steps, cfg_scale=5.0, cond_dropout=0.1, feedback=fb, guide_steps=guide,
                        grad_through_unet=through, **extra)

        def feedback(precision=torch.float32):
            return FeedbackGuidance(clf, "entropy", 0.03, precision=precision)

        # the estimate of every row (``feedback-synth estimate-memory``, no kernel run), beside the measurement
        folder = config_folder(kind, smoke=smoke) if estimate else None

        def estimated(measured: list[Row], guidance_dtype: str = "float32", **lever) -> list[Row]:
            for r in measured if folder else ():
                r.extra["estimate_gib"] = estimate_memory(folder, batch, resolution,
                                                          None if r.every is None else r.through_unet,
                                                          guidance_dtype, **lever)[1]
            return measured

        sample(feedback(), [0], True)  # warm-up: cuDNN autotuning, allocator
        rows += estimated(run_rows(label, device, "bf16 UNet, fp32 decode+clf", batch, steps, repeats, sample, feedback,
                                   schedules=SMOKE_SCHEDULES if smoke else SCHEDULES))
        # memory levers at the reference schedule (every 5th step, gradient through the UNet)
        rows += estimated(run_rows(label, device, "bf16 UNet, bf16 decode+clf", batch, steps, repeats, sample,
                                   lambda: feedback(torch.bfloat16), schedules=((5, True),)), "bfloat16")
        for chunk in (2, 1):
            rows += estimated(run_rows(label, device, f"bf16 UNet, fp32 decode+clf, chunks of {chunk}", batch, steps,
                                       repeats, sample, lambda: FeedbackGuidance(clf, "entropy", 0.03, chunk_size=chunk),
                                       schedules=((5, True),)), chunk=chunk)
        apply_performance_options(pipe, GenerateConfig(gradient_checkpointing=True))
        rows += estimated(run_rows(label, device, "bf16 UNet, bf16 decode+clf, ckpt", batch, steps, repeats, sample,
                                   lambda: feedback(torch.bfloat16), schedules=((5, True),)), "bfloat16",
                          checkpointing=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


# ---------------------------------------------------------------- estimated memory (any machine)

CARD_GIB, HEADROOM_GIB = 24, 4  # "fits a 24 GB card": peak <= 20 GiB, room for the CUDA context,
# kernel workspaces and allocator fragmentation, which the estimate leaves out
LEVERS = (("-", dict()), ("checkpointing", dict(checkpointing=True)), ("chunks of 2", dict(chunk=2)),
          ("chunks of 1", dict(chunk=1)), ("checkpointing + chunks of 1", dict(checkpointing=True, chunk=1)))


@dataclass
class MemoryRow:
    model: str
    schedule: str  # unguided | guided (a guided step is the peak: how many there are does not matter)
    through_unet: Optional[bool]
    gradient_path: str
    lever: str
    weights_gib: float
    peak_gib: float


def config_folder(kind: str, dtype: torch.dtype = torch.bfloat16, smoke: bool = False) -> str:
    """A model folder with the configs of the SD-sized components and no weights: what
    ``feedback-synth estimate-memory`` reads (its models are built on the meta device here)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    folder = tempfile.mkdtemp(prefix=f"sd21-{kind}-configs-")
    pipe = build_latent_pipeline(kind, torch.device("meta"), dtype, smoke=smoke)
    for name, part in pipe.components.items():
        where = os.path.join(folder, name)
        if isinstance(part, ModelMixin):
            part.save_config(where)
        elif isinstance(part, PreTrainedModel):
            part.config.save_pretrained(where)
        else:  # tokenizer, schedulers, image processor
            part.save_pretrained(where)
    return folder


def estimate_memory(folder: str, batch: int, resolution: int, through_unet: Optional[bool],
                    guidance_dtype: str = "float32", checkpointing: bool = False, chunk: int = 0) -> tuple[float, float]:
    """Weights and peak GiB of one SD-sized batch (bf16 UNet and encoders, float32 VAE, ResNet-50
    classifier at 224 px), by ``feedback_synth.generate.estimate_generation_memory`` (what
    ``feedback-synth estimate-memory`` prints). ``through_unet=None``: unguided."""
    from feedback_synth.config import GenerateConfig
    from feedback_synth.generation.memory import estimate_generation_memory

    cfg = GenerateConfig(generator=folder, dtype="bfloat16", criterion="none" if through_unet is None else "entropy",
                         scale=0.03, grad_through_unet=bool(through_unet), strength=1.0, cfg_scale=5.0,
                         cond_dropout=0.1, batch_size=batch, guidance_dtype=guidance_dtype,
                         gradient_checkpointing=checkpointing, guidance_chunk_size=chunk)
    est = estimate_generation_memory(cfg, "resnet50", 1000, 224, height=resolution, width=resolution)
    return est.weights / 2**30, (est.unguided if est.guided is None else est.guided) / 2**30


def memory_rows(batch: int, resolution: int) -> list[MemoryRow]:
    rows = []
    for kind, name in (("text", "SD 2.1 (text)"), ("unclip", "SD 2.1 unCLIP (image)")):
        folder = config_folder(kind)
        w, p = estimate_memory(folder, batch, resolution, None)
        rows.append(MemoryRow(name, "unguided", None, "-", "-", w, p))
        for through in (True, False):
            for pname in ("float32", "bfloat16"):
                for lever, kw in LEVERS:
                    w, p = estimate_memory(folder, batch, resolution, through, pname, **kw)
                    rows.append(MemoryRow(name, "guided", through, pname, lever, w, p))
                    print(f"  {name:<24} guided unet-grad {str(through):<5} {pname:<8} {lever:<28} peak {p:6.2f} GiB",
                          flush=True)
    return rows


def memory_table(rows: list[MemoryRow]) -> str:
    lines = ["| generator | schedule | grad through UNet | gradient path (decode + classifier) | memory lever "
             f"| weights (GiB) | estimated peak (GiB) | fits a {CARD_GIB} GB card |",
             "|---|---|---|---|---|---:|---:|---|"]
    for r in rows:
        through = "-" if r.through_unet is None else ("yes" if r.through_unet else "no")
        fits = "yes" if r.peak_gib <= CARD_GIB - HEADROOM_GIB else "no"
        lines.append(f"| {r.model} | {r.schedule} | {through} | {r.gradient_path} | {r.lever} | {r.weights_gib:.2f} "
                     f"| {r.peak_gib:.1f} | {fits} |")
    return "\n".join(lines)


def memory_section(rows: list[MemoryRow], batch: int, resolution: int) -> str:
    return (f"## Estimated GPU memory: SD-sized, batch {batch}, {resolution} px\n\n"
            "Not measured on a GPU: estimated by `feedback-synth estimate-memory` "
            "(`feedback_synth.generate.estimate_generation_memory`) on folders holding the configs above and no "
            "weights. It runs the real pipeline code under PyTorch's FakeTensorMode (shapes, dtypes and autograd graphs, no kernels) and "
            "counts the bytes of every tensor alive, weights included: what `torch.cuda.max_memory_allocated` "
            "reports, less allocator rounding and kernel workspaces. A test checks it against a real CPU run of a "
            "tiny unCLIP model (within 1%). bf16 UNet and encoders, float32 VAE weights, ResNet-50 classifier at "
            "224 px; the peak is that of a guided step (or of the final decode when unguided), so it does not "
            "depend on how many steps are guided. "
            f"\"Fits\" means an estimated peak of at most {CARD_GIB - HEADROOM_GIB} GiB, leaving {HEADROOM_GIB} GiB "
            "for the CUDA context, workspaces and fragmentation.\n\n" + memory_table(rows))


# ---------------------------------------------------------------- report


def unguided_cost(rows: list[Row], row: Row) -> Optional[float]:
    """Per-image cost of the unguided row of the same generator and batch (same precision if measured)."""
    refs = [r for r in rows if r.model == row.model and r.batch == row.batch and r.every is None and not r.note]
    same = [r for r in refs if r.precision == row.precision]
    return (same or refs)[0].cost if refs else None


def table(rows: list[Row]) -> str:
    lines = ["| generator | device | precision | batch | guided steps | grad through UNet | s / batch | images / s "
             "| ms / image | CPU ms / image | cost vs unguided | peak memory (MiB) | estimate (MiB) | measured / estimate |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        through = "-" if r.through_unet is None else ("yes" if r.through_unet else "no")
        head = f"| {r.model} | {r.device} | {r.precision} | {r.batch} | {r.schedule} | {through} "
        if r.note:
            lines.append(head + f"| {r.note} | | | | | | | |")
            continue
        ref = unguided_cost(rows, r)
        ratio = f"{r.cost / ref:.2f}x" if ref else "-"
        cpu = f"{1000 * r.cpu_seconds / r.batch:.1f}" if r.cpu_seconds == r.cpu_seconds else "-"
        est = r.extra.get("estimate_gib")
        versus = f"| {1024 * est:.0f} | {r.peak_mib / (1024 * est):.2f} |" if est else "| - | - |"
        lines.append(head + f"| {r.seconds:.3f} | {r.batch / r.seconds:.1f} | {1000 * r.per_image:.1f} | {cpu} "
                     f"| {ratio} | {r.peak_mib:.0f} " + versus)
    return "\n".join(lines)


def projection(rows: list[Row], gpus: list[int]) -> str:
    """GPU-hours for the full ImageNet-LT plan from the measured per-image times of the GPU rows."""
    gpu = [r for r in rows if r.device == "cuda" and not r.note and r.precision.startswith("bf16 UNet, fp32")]
    if not gpu:
        return ("**GPU rows: pending.** No CUDA device was available when this file was written, so the "
                "SD-sized rows and the GPU-hours projection are not measured. On a GPU machine run\n"
                "`python benchmarks/generation_throughput.py` (it adds them): GPU-hours = "
                f"{IMAGENET_LT_IMAGES:,} images x seconds per image / 3600; wall-clock hours on N GPUs = "
                "GPU-hours / N (shards are independent).")
    lines = ["| generator | guided steps | grad through UNet | s / image | GPU-hours | "
             + " | ".join(f"hours on {n} GPUs" for n in gpus) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(gpus)]
    for r in gpu:
        hours = IMAGENET_LT_IMAGES * r.per_image / 3600
        through = "-" if r.through_unet is None else ("yes" if r.through_unet else "no")
        lines.append(f"| {r.model} | {r.schedule} | {through} | {r.per_image:.3f} | {hours:,.0f} | "
                     + " | ".join(f"{hours / n:,.1f}" for n in gpus) + " |")
    return (f"Full ImageNet-LT plan: {IMAGENET_LT_IMAGES:,} images (docs/method.md: how many to generate), from the "
            "measured batch-8 per-image times above:\n\n" + "\n".join(lines))


def ratios(rows: list[Row]) -> str:
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and not r.note]
        for batch in sorted({r.batch for r in mine}):
            ref = next((r for r in mine if r.batch == batch and r.every is None), None)
            if ref is None:
                continue
            parts = [f"{r.schedule}{' (UNet grad)' if r.through_unet else ''}: {r.cost / ref.cost:.2f}x"
                     for r in mine if r.batch == batch and r.every is not None and r.precision == ref.precision]
            out.append(f"- {model}, batch {batch}: " + "; ".join(parts))
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,16,64", help="CPU batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the CPU rows")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (the fastest is reported)")
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--gpu-resolution", type=int, default=512)
    ap.add_argument("--gpu-steps", type=int, default=30)
    ap.add_argument("--gpus", default="1,8,64", help="GPU counts for the projection")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads for the CPU rows (1: per-image CPU time is not inflated by thread spinning)")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU rows only")
    ap.add_argument("--skip-estimate", action="store_true",
                    help="leave out the estimated SD-sized memory (the table, and the estimate beside each measured "
                         "GPU row; FakeTensorMode, ~2 min on a CPU)")
    ap.add_argument("--smoke", action="store_true",
                    help="run the SD-sized code path with tiny widths on this device and do not write the results")
    ap.add_argument("--output", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.cpu_threads)
    load_before = os.getloadavg()[0]
    command = " ".join(["python benchmarks/generation_throughput.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    rows, notes = [], []
    if not args.skip_cpu and not args.smoke:
        print("CPU rows")
        r, note = cpu_rows([int(b) for b in args.batch_sizes.split(",")], args.steps, args.repeats)
        rows, notes = rows + r, notes + [note]
    cuda = torch.cuda.is_available()
    if cuda or args.smoke:
        device = torch.device("cuda" if cuda else "cpu")
        print(f"latent rows on {device}")
        res = 64 if args.smoke and not cuda else args.gpu_resolution
        batch = 2 if args.smoke and not cuda else args.gpu_batch
        steps = 4 if args.smoke and not cuda else args.gpu_steps
        r, note = gpu_rows(device, batch, res, steps, 1 if args.smoke else args.repeats, args.smoke,
                           estimate=not args.skip_estimate)
        rows, notes = rows + r, notes + note
    memory = []
    if not args.skip_estimate and not args.smoke:
        print(f"estimated memory, SD-sized, batch {args.gpu_batch}, {args.gpu_resolution} px (FakeTensorMode)")
        memory = memory_rows(args.gpu_batch, args.gpu_resolution)
    sizes = {k: count_params(k) for k in ("text", "unclip")}
    size_note = "; ".join(f"{'SD 2.1' if k == 'text' else 'SD 2.1 unCLIP'}: " + ", ".join(f"{n} {v:.0f} M" for n, v in s.items())
                          for k, s in sizes.items())
    device_note = torch.cuda.get_device_name(0) if cuda else f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), no CUDA device"
    report = "\n\n".join([
        "# Generation throughput: unguided vs feedback-guided",
        f"Command: `{command}`  \nDate: {time.strftime('%Y-%m-%d %H:%M')}; device: {device_note}; torch {torch.__version__}; "
        f"1-min load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (a shared machine: "
        "other jobs slow every row alike, so read ratios rather than absolute CPU times).",
        "Setup:\n\n" + "\n".join(f"- {n}" for n in notes),
        "Full-size configs written in the script (parameters, built on the meta device): " + size_note + ".",
        table(rows),
        "Guided / unguided cost per image, same batch:\n\n" + ratios(rows),
        "Cost ratios use CPU time per image on the CPU rows (wall time there includes waiting for other "
        "jobs on a shared machine) and wall time on the GPU rows. CPU rows run with "
        f"{args.cpu_threads} torch thread(s). CPU peak memory is the growth of malloc'ed memory during a run "
        "(glibc `mallinfo2`, sampled every 2 ms: a lower bound for short-lived peaks); GPU peak memory is "
        "`torch.cuda.max_memory_allocated` (weights included).",
        "## Projection: GPU-hours for ImageNet-LT\n\n" + projection(rows, [int(n) for n in args.gpus.split(",")]),
    ] + ([memory_section(memory, args.gpu_batch, args.gpu_resolution)] if memory else [])) + "\n"
    print("\n" + report)
    if not args.smoke:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(report)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
