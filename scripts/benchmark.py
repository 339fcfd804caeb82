"""Time our textual-inversion training step (and sampling) against diffusers' recipe on the same random weights.

Ours: LatentDiffusion built from one of our configs with random weights, frozen weights stored in the training
precision by the model's own `setup()`, autocast, AdamW over the learned vectors only, VAE posteriors cached (the VAE
waiting in CPU memory on a GPU).
diffusers: our weights converted with `diffusers.loaders.single_file_utils` into UNet2DConditionModel,
AutoencoderKL and transformers' CLIPTextModel, trained as examples/textual_inversion/textual_inversion.py does:
UNet and VAE cast to the mixed-precision dtype and run without autocast, the text encoder kept in float32 and run
under autocast (what accelerate does to the model it prepares), the VAE encoding every step, AdamW over the whole
token-embedding table and every row but the placeholder's copied back after the step. LDM has no diffusers text
encoder, so its diffusers rows use diffusers' UNet and VAE with a float32 copy of our LDM-BERT.

Both steps draw latents, timesteps and noise in the same order from the same generator, so on the same batch they
compute the same loss and the same update of the learned word (tests/test_benchmark.py checks it): the ratio
compares two ways of doing one job. The placeholder is an existing one-token string ("*"), so the diffusers table
keeps its size instead of gaining the one row the example adds.

`--main_loop` also times main.py itself, in a process of its own, on the same weights and images: our step plus
its data loader, Lightning's loop and hooks, logging and progress bar (`ldm.callbacks.StepTimes`).

Timing: `--warmup` untimed steps, then `--steps` steps between two CUDA events (elsewhere time.perf_counter and a
synchronize). Peak memory is torch.cuda.max_memory_allocated over the timed steps while the other implementation's
weights wait on the CPU; other devices do not report it (n/a). Held for backward and step peak are measured on
every device (on the CPU with CUDA's autocast policy emulated, ldm/measure.py): the memory one forward leaves
allocated for its backward, and the most allocated during one step above what was allocated before it; a GPU's
peak is about the weights it holds plus the step peak. FLOP-floor fraction (CUDA, full-size models): the
FLOPs per image the step cannot avoid times images/s, over --peak_tflops; 1.0 would be the GPU doing only that
work at its peak. Sampling runs as the txt2img scripts run it: frozen weights stored in fp16 and fp16 autocast on
a GPU, float32 on the CPU or with --precision fp32; the diffusers pipeline gets the same dtype. `--profile` adds a
table of where one step's time goes, by kind of op (convolution, matmul, attention, normalization, ...), and on
CUDA how busy the GPU is: the kernels' time over the step's wall time.

Examples:
  python scripts/benchmark.py                                   # CPU: tiny SD, batches 1 and 4
  python scripts/benchmark.py --sampling --json bench.json      # GPU: SD v1, batches 1, 8, 16, and sampling
  python scripts/benchmark.py --model ldm --compile --gradient_checkpointing
  python scripts/benchmark.py --model sd --batch_sizes 1 8 --cuda_graphs             # GPU: CUDA graphs
  python scripts/benchmark.py --model sd --batch_sizes 1 16 --cuda_graphs --main_loop # and main.py's own loop
  python scripts/benchmark.py --model sd --batch_sizes 16 --channels_last --profile  # where the time goes
  python scripts/benchmark.py --model sd --cuda_graphs --channels_last --attention_backend cudnn --combined
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.utils import logging as diffusers_logging
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel

from ldm.checkpoint import build_random_model
from ldm.cli import NAMED_CONFIGS, parse_device
from ldm.generate import first_stage_factor, generate, sampling_weights_dtype
from ldm.images import channels_first
from ldm.measure import CudaAutocastOnCPU
from ldm.models.diffusion.ddpm import COMPILE_MODES
from ldm.modules.attention import ATTENTION_BACKENDS
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizers import clip_tokenizer
from ldm.paths import check_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GFLOP per image of the least work a textual-inversion step needs: UNet forward plus the backward to its inputs,
# text encoder forward and backward, no VAE (latents cached): torch.utils.flop_counter.FlopCounterMode's counts for
# SD v1 at 512 px and LDM text2img-large at 256 px.
FLOOR_GFLOP_PER_IMAGE = {"sd": 1669.2 + 26.8, "ldm": 364.8 + 196.7}
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TRAINER_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
IMAGE_COUNT = 5
# --main_loop: a cap well above the warm-up, the steps that fill the latent cache and the timed ones, where
# StepTimes stops the run; and how long its process may take.
MAIN_LOOP_MAX_STEPS = 1000
MAIN_LOOP_TIMEOUT_S = 900
CAPTION = "a photo of {}"
SAMPLING_PROMPT = "a painting of {} in a garden"
SAMPLING_BATCHES = (1, 8)
GUIDANCE_SCALE = 7.5


# --- ours ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_ours(model_name: str, device: torch.device, precision: str, use_checkpoint: bool = False,
               compile_unet: bool | str = False, cuda_graphs: bool = False, offload_unet: bool = False,
               recompute_feedforward: bool = False, channels_last: bool = False, attention_backend: str = "auto",
               seed: int = 0):
    """Our model from its config with random weights (zero-initialised layers too, so every gradient is non-zero),
    the config's speed levers set as a user would set them in the YAML."""
    config = OmegaConf.load(os.path.join(REPO, NAMED_CONFIGS[model_name]))
    config.model.params.unet_config.params.use_checkpoint = use_checkpoint
    config.model.params.unet_config.params.recompute_feedforward = recompute_feedforward
    config.model.params.unet_config.params.attention_backend = attention_backend
    config.model.params.compile_unet = compile_unet
    config.model.params.cuda_graphs = cuda_graphs
    config.model.params.offload_unet = offload_unet
    config.model.params.channels_last = channels_last
    model = build_random_model(config, seed, device)
    model.to(device)  # also tells Lightning's `model.device` where the weights are
    model.prepare_for_training(TRAINER_PRECISION[precision])  # as a Lightning run does: half-precision weights
    model.learning_rate = config.model.base_learning_rate
    return model.train()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=HALF_DTYPES[precision])


def placeholder_of(model) -> str:
    return next(iter(model.embedding_manager.string_to_token_dict))


class OursStep:
    """The work of one training step of ours, what Lightning's loop calls: `shared_step` under autocast, backward,
    AdamW on the learned vectors (the model's `configure_optimizers`), zero_grad; a gradient scaler for fp16 as
    Lightning's. The loop's own cost (data loader, hooks, logging) is in the `--main_loop` rows."""

    def __init__(self, model, precision: str):
        self.model = model
        self.precision = precision
        self.optimizer = model.configure_optimizers()
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=precision == "fp16")

    def fill_latent_cache(self, images: dict):
        """Encode every training image once, as the first epoch of a run does, so timed steps read the cache; the
        VAE and the token table wait in CPU memory, as in a run (`park_idle_weights`)."""
        self.model.park_idle_weights(images)
        with autocast(self.model.device, self.precision):
            self.model.posterior_of_batch(images)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        with autocast(self.model.device, self.precision):
            return self.model.shared_step(batch, generator)[0]

    def update(self, loss: torch.Tensor):
        """Backward and the optimizer step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        loss = self.loss(batch, generator)
        self.update(loss)
        return loss.detach()

    def graph_recorders(self) -> list:
        """The CUDA-graph recorders of the UNet and the text encoder that `cuda_graphs` switched on."""
        recorders = (self.model.model.graphed_unet, self.model.cond_stage_model.graphed_encoder)
        return [recorder for recorder in recorders if recorder is not None]


# --- diffusers ---------------------------------------------------------------------------------------------------
@dataclass
class DiffusersParts:
    """diffusers' modules holding our model's weights, and how the example script encodes text with them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    token_embedding: torch.nn.Embedding
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    noise_scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    text_encoder_label: str

    def to(self, device):
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self


def _clip_text_encoder(model, state: dict):
    # transformers 5's CLIPTextModel has no `text_model` level and no stored position_ids.
    converted = {key.removeprefix("text_model."): value for key, value in convert_ldm_clip_checkpoint(state).items()
                 if not key.endswith("position_ids")}
    text_encoder = CLIPTextModel(copy.deepcopy(model.cond_stage_model.transformer.text_model.config))
    text_encoder.load_state_dict(converted, strict=True)
    return text_encoder, text_encoder.get_input_embeddings(), lambda ids: text_encoder(ids)[0], "CLIPTextModel"


def _our_bert_text_encoder(model):
    bert = copy.deepcopy(model.cond_stage_model).cpu().float()
    return bert, bert.token_embedding, lambda ids: bert.encode_embeddings(bert.embed_tokens(ids)), "our LDM-BERT"


@torch.no_grad()
def convert_to_diffusers(model, model_name: str, precision: str) -> DiffusersParts:
    """Our weights in diffusers' UNet and VAE (and transformers' CLIP text encoder for SD), on the CPU, placed and
    frozen as the example script places and freezes them."""
    original = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, NAMED_CONFIGS[model_name])), resolve=True)
    params = original["model"]["params"]
    state = {key: value.detach().float().cpu() for key, value in model.state_dict().items()
             if not key.startswith("embedding_manager.")}
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    unet_config["sample_size"] = params["image_size"]  # diffusers assumes 512-pixel SD v1 when not told
    vae_config = create_vae_diffusers_config_from_ldm(original, state)
    vae_config["sample_size"] = params["first_stage_config"]["params"]["ddconfig"]["resolution"]
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text_encoder, token_embedding, encode_text, label = (
        _clip_text_encoder(model, state) if isinstance(model.cond_stage_model, FrozenCLIPEmbedder)
        else _our_bert_text_encoder(model))
    weight_dtype = HALF_DTYPES.get(precision, torch.float32)
    unet.requires_grad_(False).to(weight_dtype).eval()
    vae.requires_grad_(False).to(weight_dtype).eval()
    text_encoder.requires_grad_(False).train()
    token_embedding.weight.requires_grad_(True)
    noise_scheduler = DDPMScheduler(num_train_timesteps=model.num_timesteps, beta_start=model.linear_start,
                                    beta_end=model.linear_end, beta_schedule="scaled_linear")
    return DiffusersParts(unet, vae, text_encoder, token_embedding, encode_text, noise_scheduler, weight_dtype, label)


def set_diffusers_gradient_checkpointing(parts: DiffusersParts, enabled: bool):
    """The example's --gradient_checkpointing: UNet in train mode and checkpointed, CLIP checkpointed (our
    LDM-BERT, standing in for a text encoder diffusers lacks, has no such switch)."""
    if enabled:
        parts.unet.enable_gradient_checkpointing()
    else:
        parts.unet.disable_gradient_checkpointing()
    parts.unet.train(enabled)
    action = "enable" if enabled else "disable"
    for name in (f"activation_checkpointing_{action}", f"gradient_checkpointing_{action}"):  # newer, older transformers
        if hasattr(parts.text_encoder, name):
            getattr(parts.text_encoder, name)()
            break


class DiffusersStep:
    """One step of diffusers' examples/textual_inversion/textual_inversion.py on `parts`.

    Differences that cost nothing: random draws come from the step's generator, in our order (latent sample,
    timesteps, noise), and the learning-rate scheduler (constant by default) is left out. Like the example, a step
    reads its loss to the host (for its progress bar), which waits for the GPU.
    """

    def __init__(self, parts: DiffusersParts, precision: str, learning_rate: float, placeholder_id: int,
                 initial_vector: torch.Tensor, gradient_checkpointing: bool = False):
        self.parts = parts
        self.precision = precision
        table = parts.token_embedding.weight
        with torch.no_grad():
            table[placeholder_id] = initial_vector.to(table)
        self.original_table = table.detach().clone()
        self.rows_to_restore = torch.ones(table.shape[0], dtype=torch.bool)
        self.rows_to_restore[placeholder_id] = False
        self.optimizer = torch.optim.AdamW(parts.token_embedding.parameters(), lr=learning_rate)
        self.scaler = torch.amp.GradScaler(table.device.type, enabled=precision == "fp16")
        set_diffusers_gradient_checkpointing(parts, gradient_checkpointing)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        parts = self.parts
        pixels = batch["pixel_values"].to(parts.weight_dtype)
        latents = parts.vae.encode(pixels).latent_dist.sample(generator).detach() * parts.vae.config.scaling_factor
        timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device, generator=generator)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        noisy_latents = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast(latents.device, self.precision):
            encoder_hidden_states = parts.encode_text(batch["input_ids"])
        model_pred = parts.unet(noisy_latents, timesteps, encoder_hidden_states.to(parts.weight_dtype)).sample
        return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")

    def update(self, loss: torch.Tensor):
        """Backward, the optimizer step, and every row but the placeholder's restored."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        with torch.no_grad():
            self.parts.token_embedding.weight[self.rows_to_restore] = self.original_table[self.rows_to_restore]

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        loss = self.loss(batch, generator)
        self.update(loss)
        loss.detach().item()  # the example's progress bar reads it at every step, which waits for the GPU
        return loss.detach()


def diffusers_step_for(parts: DiffusersParts, model, precision: str, gradient_checkpointing: bool = False):
    """A diffusers step that starts where `model` starts: its placeholder row holds our learned vector."""
    placeholder = placeholder_of(model)
    vectors = model.embedding_manager.vectors(placeholder)
    if vectors.shape[0] != 1:
        raise ValueError(f"the benchmark compares one vector per placeholder; this config has {vectors.shape[0]}: "
                         "set num_vectors_per_token: 1")
    placeholder_id = model.embedding_manager.string_to_token_dict[placeholder]
    return DiffusersStep(parts, precision, model.learning_rate, placeholder_id, vectors[0].detach(),
                         gradient_checkpointing)


# --- data and timing ---------------------------------------------------------------------------------------------
def image_size(model) -> int:
    return model.image_size * first_stage_factor(model)


def training_images(model, seed: int = 0) -> dict:
    """IMAGE_COUNT random images and their mirror images as one batch, in both layouts: ours (B, H, W, 3) uint8
    with image_index/flipped, left in host memory as our model's `transfer_batch_to_device` leaves them in a run,
    the example's (B, 3, H, W) pixel_values in [-1, 1] on the device with pre-tokenized input_ids (its data loader
    tokenizes, outside the step)."""
    size = image_size(model)
    pixels = torch.randint(0, 256, (IMAGE_COUNT, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    pixels = torch.cat([pixels, pixels.flip(2)])
    count = 2 * IMAGE_COUNT
    captions = [CAPTION.format(placeholder_of(model))] * count
    return {
        "image": pixels,
        "caption": captions,
        "image_index": torch.arange(count) % IMAGE_COUNT,
        "flipped": torch.arange(count) >= IMAGE_COUNT,
        "pixel_values": channels_first(pixels).to(model.device),
        "input_ids": model.cond_stage_model.tokenize(captions),
    }


def batches_of(images: dict, batch_size: int) -> list[dict]:
    """The distinct batches of a run that cycles through the images `batch_size` at a time."""
    count = len(images["caption"])
    batches = []
    for first in range(0, count * batch_size // math.gcd(count, batch_size), batch_size):
        rows = [(first + offset) % count for offset in range(batch_size)]
        batches.append({key: [value[row] for row in rows] if isinstance(value, list) else value[rows]
                         for key, value in images.items()})
    return batches


def synchronize(device: torch.device):
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def measure(device: torch.device, run: Callable[[], object]) -> tuple[float, float | None, float | None]:
    """Seconds `run()` takes, and the peak GiB allocated and reserved meanwhile where the device reports them
    (CUDA). Reserved counts what CUDA graphs' private pools hold: a replay allocates nothing, so a graphed step's
    allocated peak leaves out the memory its recording keeps."""
    synchronize(device)
    if device.type == "cuda":
        with torch.cuda.device(device):  # events record on the current device's stream
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
        return (start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(device) / 2**30,
                torch.cuda.max_memory_reserved(device) / 2**30)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start, None, None


@contextlib.contextmanager
def native_stderr_silenced():
    """Send what C++ writes to stderr (the CPU profiler's start/stop lines) to /dev/null for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def memory_of_step(step, batch: dict, device: torch.device) -> tuple[float, float]:
    """(held for backward, step peak) in MiB above what was allocated before one training step: what the forward
    leaves allocated until its backward (the activations autograd keeps; with gradient checkpointing, the
    checkpoints' inputs), and the most allocated at any moment of forward, backward and optimizer step. Counted
    by the CUDA allocator, or on the CPU from the profiler's allocation records with CUDA's autocast policy
    emulated (ldm/measure.py), so that the memory levers can be compared on any machine."""
    generator = torch.Generator(device=device).manual_seed(0)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = step.loss(batch, generator)
        held = torch.cuda.memory_allocated(device) - before
        step.update(loss)
        del loss
        return held / 2**20, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    allocated = peak = 0
    with native_stderr_silenced(), CudaAutocastOnCPU():
        for phase in ("forward", "update"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as profile:
                if phase == "forward":
                    loss = step.loss(batch, generator)
                else:
                    step.update(loss)
                    del loss
            for _, change in sorted((event.time_range.end, event.self_cpu_memory_usage) for event in profile.events()):
                allocated += change
                peak = max(peak, allocated)
            if phase == "forward":
                held = allocated
    return held / 2**20, peak / 2**20


# What an aten op's name says it computes; the first match wins, the rest are "other ops".
OP_KINDS = {
    "attention": lambda op: "attention" in op,
    "convolution": lambda op: "conv" in op,
    "matmul": lambda op: op in {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"},
    "normalization": lambda op: "norm" in op,
    "copy and cast": lambda op: op in {"copy_", "_to_copy", "clone", "contiguous", "cat", "stack"},
    "optimizer": lambda op: op.startswith(("_foreach", "_fused_adam")),
}
TIME_KINDS = (*OP_KINDS, "other ops", "outside aten ops")


def kind_of(event_name: str) -> str:
    if not event_name.startswith("aten::"):
        return "outside aten ops"
    op = event_name.removeprefix("aten::")
    return next((kind for kind, matches in OP_KINDS.items() if matches(op)), "other ops")


def time_by_kind(step, batch: dict, device: torch.device) -> dict[str, float]:
    """Milliseconds of one profiled step by kind of op (`milliseconds_by_kind`)."""
    generator = torch.Generator(device=device).manual_seed(0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with native_stderr_silenced(), torch.profiler.profile(activities=activities) as profile:
        step(batch, generator)
        synchronize(device)
    return milliseconds_by_kind(profile.events(), on_cuda=device.type == "cuda")


def milliseconds_by_kind(events, on_cuda: bool) -> dict[str, float]:
    """On CUDA the kernels' time, each kernel counted for the aten op that launched it ("outside aten ops": the
    kernels no aten op launched, e.g. a CUDA graph's replay); on the CPU the ops' own time ("outside aten ops":
    autograd's engine, Python-level functions)."""
    milliseconds = dict.fromkeys(TIME_KINDS, 0.0)
    kernels = 0.0
    for event in events:
        if event.is_async:
            continue
        if event.device_type != torch.autograd.DeviceType.CPU:
            kernels += event.self_device_time_total / 1e3
            continue
        own = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        milliseconds[kind_of(event.name)] += own / 1e3
    if on_cuda:
        in_aten_ops = sum(value for kind, value in milliseconds.items() if kind != "outside aten ops")
        milliseconds["outside aten ops"] = max(0.0, kernels - in_aten_ops)
    return milliseconds


def warm_up(step, batches: list[dict], device: torch.device, warmup: int, seed: int = 0):
    """The untimed first steps: cuDNN's algorithm search, cuBLAS's workspace, CUDA graphs' recording."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for index in range(warmup):
        step(batches[index % len(batches)], generator)


def time_training(step, batches: list[dict], device: torch.device, warmup: int, steps: int, seed: int = 1) -> dict:
    """Times `steps` steps on the batches that follow the `warmup` warm-up steps'."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def timed_steps():
        for index in range(warmup, warmup + steps):
            step(batches[index % len(batches)], generator)

    seconds, peak, reserved = measure(device, timed_steps)
    batch_size = len(batches[0]["caption"])
    return {"ms_per_step": 1e3 * seconds / steps, "images_per_s": batch_size * steps / seconds,
            "peak_memory_gib": peak, "peak_reserved_gib": reserved}


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- main.py's own loop --------------------------------------------------------------------------------------------
UNET_LEVERS = {"use_checkpoint", "recompute_feedforward", "attention_backend"}


def lever_overrides(levers: dict) -> list[str]:
    """A variant's levers (`build_ours`' keywords) as main.py's config overrides."""
    return [f"model.params.{'unet_config.params.' if name in UNET_LEVERS else ''}{name}={value}"
            for name, value in levers.items()]


def main_loop_variant(variants: list[tuple[str, dict]]) -> tuple[str, dict]:
    """The one variant `--main_loop` runs main.py with: the combined levers where given, else CUDA graphs, else
    eager (each run builds and loads the whole model, so one variant per batch size)."""
    for wanted in ("combined", "cuda graphs"):
        for variant, levers in variants:
            if variant.startswith(wanted):
                return variant, levers
    return "eager", {}


@contextlib.contextmanager
def main_loop_files(model, images: dict):
    """`model`'s weights as a safetensors checkpoint and the benchmark's images as PNG files, in a temporary folder
    (written once for all batch sizes: the SD checkpoint is gigabytes)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "model.safetensors")
        save_file({key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()
                   if not key.startswith("embedding_manager.")}, checkpoint)
        data_root = os.path.join(folder, "images")
        os.makedirs(data_root)
        for index in range(IMAGE_COUNT):
            Image.fromarray(images["image"][index].numpy()).save(os.path.join(data_root, f"{index:02}.png"))
        yield checkpoint, data_root


def main_loop_row(files: tuple[str, str], variant: str, levers: dict, batch_size: int, args) -> dict:
    """Ours trained by main.py itself, in a process of its own, on `main_loop_files`: its data loader,
    Lightning's loop and hooks, logging and progress bar included. The mean time from one step's start to the
    next's after the warm-up, leaving out steps that met an image the latent cache did not hold yet
    (`ldm.callbacks.StepTimes`); memory: the most any of those steps allocated and reserved."""
    checkpoint, data_root = files
    with tempfile.TemporaryDirectory() as folder:
        times = os.path.join(folder, "step_times.json")
        device = ["--gpus", f"{args.device.index or 0},"] if args.device.type == "cuda" else []
        command = [
            sys.executable, os.path.join(REPO, "main.py"), "--base", os.path.join(REPO, NAMED_CONFIGS[args.model]),
            "-t", "--actual_resume", checkpoint, "--data_root", data_root, "-l", os.path.join(folder, "logs"), *device,
            "--precision", TRAINER_PRECISION[args.precision], "--max_steps", str(MAIN_LOOP_MAX_STEPS),
            f"data.params.batch_size={batch_size}", "lightning.trainer.limit_val_batches=0",
            "lightning.modelcheckpoint.params.every_n_train_steps=0",
            "lightning.callbacks.image_logger.params.disabled=True",
            "lightning.callbacks.step_times.target=ldm.callbacks.StepTimes",
            f"lightning.callbacks.step_times.params.path={json.dumps(times)}",  # quoted: a dotlist value is YAML
            f"lightning.callbacks.step_times.params.warmup={max(args.warmup, 1)}",
            f"lightning.callbacks.step_times.params.steps={args.steps}", *lever_overrides(levers)]
        try:
            run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=MAIN_LOOP_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:  # its captured output is bytes, text=True or not
            print((error.stderr or b"")[-3000:].decode(errors="replace"), file=sys.stderr)
            raise RuntimeError(f"main.py took over {MAIN_LOOP_TIMEOUT_S} s") from None
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"main.py exited with status {run.returncode}: {last}")
        with open(times) as handle:
            measured = json.load(handle)
    failed = re.findall(r"cuda_graphs: recording (.+?) failed", run.stdout)
    if failed:
        variant = f"{variant} (recording {' and '.join(failed)} failed: eager)"
    seconds = measured["seconds"]
    if len(seconds) < args.steps:
        raise RuntimeError(f"main.py stopped at --max_steps {MAIN_LOOP_MAX_STEPS} with {len(seconds)} of the "
                           f"{args.steps} steps to time")
    per_step = sum(seconds) / len(seconds)
    return {"implementation": "ours, main.py", "batch_size": batch_size, "variant": variant,
            "ms_per_step": 1e3 * per_step, "images_per_s": batch_size / per_step,
            "peak_memory_gib": measured["peak_memory_gib"], "peak_reserved_gib": measured["peak_reserved_gib"],
            "held_for_backward_mib": None, "step_peak_mib": None, "steps_run": measured["steps_run"],
            "floor_fraction": floor_fraction(args.model, args.device, args.precision, batch_size / per_step,
                                             args.peak_tflops)}


# --- the run -------------------------------------------------------------------------------------------------------
def floor_fraction(model_name: str, device: torch.device, precision: str, images_per_s: float,
                   peak_tflops: float) -> float | None:
    """Against the bf16 matmul rate: none for float32 rows, which the tensor cores' half-precision rate does not bound."""
    if device.type != "cuda" or model_name not in FLOOR_GFLOP_PER_IMAGE or precision == "fp32":
        return None
    return FLOOR_GFLOP_PER_IMAGE[model_name] * images_per_s / (peak_tflops * 1e3)


def train_rows(step, label: str, variant: str, images: dict, args, rows: list, measured: Callable[[], None]):
    """Appends a row per batch size to `rows`, calling `measured` after each (a later batch size that fails, or a
    run cut short, keeps the earlier rows)."""
    recorders = step.graph_recorders() if isinstance(step, OursStep) else []
    for batch_size in args.batch_sizes:
        for recorder in recorders:  # another batch size's recording would stay in this row's memory
            recorder.clear()
        release_memory(args.device)
        batches = batches_of(images, batch_size)
        warm_up(step, batches, args.device, max(args.warmup, 1))  # the memory step is never the first one
        if recorders:  # a replay allocates nothing: its memory is the recording's pool, in the reserved peak
            held = step_peak = None
        else:
            held, step_peak = memory_of_step(step, batches[0], args.device)
        timing = time_training(step, batches, args.device, args.warmup, args.steps)
        fraction = floor_fraction(args.model, args.device, args.precision, timing["images_per_s"], args.peak_tflops)
        failed = [recorder.name for recorder in recorders if recorder.failed]
        shown = f"{variant} (recording {' and '.join(failed)} failed: eager)" if failed else variant
        rows.append({"implementation": label, "batch_size": batch_size, "variant": shown, **timing,
                     "held_for_backward_mib": held, "step_peak_mib": step_peak, "floor_fraction": fraction})
        if args.profile:
            rows[-1]["ms_by_kind"] = time_by_kind(step, batches[0], args.device)
        print(f"  {label} {variant} batch {batch_size}: {timing['images_per_s']:.3g} images/s", file=sys.stderr)
        measured()


def add_ratios(rows: list[dict]):
    """ours / diffusers images/s at the same batch size, against diffusers' checkpointing run for a variant with
    checkpointing (none where that run is missing), else its eager run."""
    theirs = {(row["batch_size"], row["variant"]): row["images_per_s"] for row in rows
              if not row["implementation"].startswith("ours")}
    for row in rows:
        variant = "checkpointing" if "checkpointing" in row["variant"] else "eager"
        baseline = theirs.get((row["batch_size"], variant))
        ours = row["implementation"].startswith("ours")
        row["ratio"] = row["images_per_s"] / baseline if ours and baseline else None


def sampling_precision(precision: str) -> str:
    """`generate`'s precision for a benchmark precision: fp32 runs "full", a half precision "autocast"."""
    return "full" if precision == "fp32" else "autocast"


def diffusers_pipeline(parts: DiffusersParts, dtype: torch.dtype):
    """StableDiffusionPipeline from the converted modules, DDIM with SD v1's settings; nothing loaded from the hub."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=clip_tokenizer(),
                                   unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def sampling_rows(model, parts: DiffusersParts | None, args, rows: list, attempt: Callable):
    """DDIM, eta 0, guidance 7.5, one prompt, 1 and 8 images per call: ours through `generate` (also with the UNet
    replayed as CUDA graphs with --cuda_graphs, channels-last with --channels_last, with another attention kernel
    with --attention_backend), diffusers through its pipeline; one short untimed call of each first. Each row goes
    into `rows` as it is measured, each measurement through `attempt` (see run_benchmark)."""
    device, size = args.device, image_size(model)
    dtype = sampling_weights_dtype(device, sampling_precision(args.precision))
    model.store_frozen_weights(dtype)  # as the txt2img scripts load it
    prompt = SAMPLING_PROMPT.format(placeholder_of(model))
    model.eval()
    runners = {"ours": lambda n, steps: generate(
        model, prompt, n_samples=n, n_iter=1, steps=steps, scale=GUIDANCE_SCALE, eta=0.0, seed=0, height=size,
        width=size, precision=sampling_precision(args.precision), progress=False)}
    if parts is not None:
        pipe = diffusers_pipeline(parts, dtype)
        generator = torch.Generator(device=device).manual_seed(0)
        runners["diffusers"] = lambda n, steps: pipe(
            prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, eta=0.0,
            num_images_per_prompt=n, generator=generator, output_type="np")
    ours_variants = {"ours": {}}  # label -> the UNet's levers
    if args.channels_last:
        ours_variants["ours (channels last)"] = {"channels_last": True}
    for backend in args.attention_backend:
        ours_variants[f"ours ({backend} attention)"] = {"attention_backend": backend}
    if args.cuda_graphs:
        ours_variants["ours (cuda graphs)"] = {"cuda_graphs": True}
    if args.combined and len(combined_levers(args, sampling=True)) > 1:
        ours_variants[f"ours ({combined_label(args, sampling=True)})"] = combined_levers(args, sampling=True)
    labels = [*ours_variants, *runners.keys() - {"ours"}]

    def time_call(label: str, n: int, measured: list):
        levers = ours_variants.get(label, {})  # none while diffusers runs: no recorded graphs held meanwhile
        model.model.use_channels_last(levers.get("channels_last", False))
        model.model.diffusion_model.use_attention_backend(levers.get("attention_backend", "auto"))
        model.model.use_cuda_graphs(levers.get("cuda_graphs", False))  # the untimed call records the graphs
        run = runners["ours" if label in ours_variants else label]
        run(n, min(2, args.sampling_steps))
        seconds, _, _ = measure(device, partial(run, n, args.sampling_steps))
        recorder = model.model.graphed_unet
        shown = f"{label} (recording failed: eager)" if recorder is not None and recorder.failed else label
        measured.append({"implementation": shown, "images_per_prompt": n, "s_per_call": seconds,
                         "images_per_s": n / seconds, "ratio": None})
        rows.append(measured[-1])

    for n in SAMPLING_BATCHES:
        measured = []
        for label in labels:
            attempt(f"sampling {label}, {n} per prompt", partial(time_call, label, n, measured))
        theirs = next((row["s_per_call"] for row in measured if row["implementation"] == "diffusers"), None)
        for row in measured:
            if row["implementation"] != "diffusers" and theirs is not None:
                row["ratio"] = theirs / row["s_per_call"]
    model.model.use_channels_last(False)
    model.model.diffusion_model.use_attention_backend("auto")
    model.model.use_cuda_graphs(False)


def combined_levers(args, sampling: bool = False) -> dict:
    """`--combined`: every speed lever given on the command line at once (compile is a training lever only)."""
    levers = {"cuda_graphs": args.cuda_graphs, "channels_last": args.channels_last,
              "attention_backend": args.attention_backend[0] if args.attention_backend else "auto",
              "compile_unet": False if sampling else (args.compile or False)}
    return {name: value for name, value in levers.items() if value not in (False, "auto")}


def combined_label(args, sampling: bool = False) -> str:
    names = {"cuda_graphs": lambda _: "cuda graphs", "channels_last": lambda _: "channels last",
             "attention_backend": lambda backend: f"{backend} attention",
             "compile_unet": lambda mode: "compiled" if mode == "default" else f"compiled {mode}"}
    levers = combined_levers(args, sampling)
    return "combined: " + ", ".join(names[name](value) for name, value in levers.items())


def run_benchmark(args, progress: Callable[[dict], None] = lambda report: None) -> dict:
    """Build, time and return every row, handing the report to `progress` after each measurement (a run cut short
    keeps what it measured). Each model waits on the CPU while another is timed, so a peak is its own. A
    measurement that fails (out of memory, a kernel the device lacks) becomes a note and the run goes on."""
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # for both, as our configs' `trainer: benchmark: True` asks
    notes = []
    rows = []
    report = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat(), "model": args.model,
              "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
              "peak_tflops": args.peak_tflops, "training": rows, "notes": notes}

    def measured():
        add_ratios(rows)
        progress(report)

    def attempt(label: str, measurement: Callable[[], None]):
        try:
            measurement()
        except Exception as error:  # out of memory, a compiler error, a kernel or profiler API the device lacks
            notes.append(f"{label}: failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})")
            print(f"  {label}: failed", file=sys.stderr)
        release_memory(device)
        measured()

    model = build_ours(args.model, device, args.precision)
    images = training_images(model)
    parts = None if args.skip_diffusers else convert_to_diffusers(model, args.model, args.precision)
    # Ours eager and diffusers first, so a run cut short still has the comparison; then the levers, least tried last,
    # so a kernel that fails in a way that poisons the CUDA context costs only the rows after it; then sampling;
    # main.py's own runs last: the slowest rows (a process each, loading a checkpoint), and their own processes.
    variants = []
    if args.gradient_checkpointing:
        variants.append(("checkpointing", {"use_checkpoint": True}))
    if args.recompute_feedforward:
        variants.append(("recomputed feed-forward", {"recompute_feedforward": True}))
    if args.channels_last:
        variants.append(("channels last", {"channels_last": True}))
    if args.cuda_graphs:
        variants.append(("cuda graphs", {"cuda_graphs": True}))
        notes.append("cuda graphs: ours with cuda_graphs: true (the UNet's and the text encoder's passes replayed as "
                     "CUDA graphs); a replay allocates nothing, so its memory, the recordings' pool, shows in the "
                     "reserved peak, and held and step peak are n/a; its ratio is against diffusers' eager step.")
    if args.offload_unet:
        variants.append(("offloaded", {"offload_unet": True}))
        if args.gradient_checkpointing:
            variants.append(("offloaded, checkpointing", {"offload_unet": True, "use_checkpoint": True}))
        notes.append("offloaded: ours with offload_unet (UNet weights in CPU memory, streamed block by block).")
    for backend in args.attention_backend:
        variants.append((f"{backend} attention", {"attention_backend": backend}))
    if args.combined:
        variants.append((combined_label(args), combined_levers(args)))
    if args.compile:
        variants.append(("compiled" if args.compile == "default" else f"compiled {args.compile}",
                         {"compile_unet": args.compile}))
        notes.append(f"compiled: ours with compile_unet: {args.compile}; its ratio is against diffusers' eager step "
                     "(the example script does not compile).")

    def time_ours(variant: str, levers: dict):
        ours = build_ours(args.model, device, args.precision, **levers) if levers else model
        try:
            step = OursStep(ours, args.precision)
            step.fill_latent_cache(images)
            train_rows(step, "ours", variant, images, args, rows, measured)
        finally:
            ours.cpu()

    attempt("ours eager", partial(time_ours, "eager", {}))
    if parts is not None:
        parts.to(device)
        label = f"diffusers ({parts.text_encoder_label})"
        if parts.text_encoder_label != "CLIPTextModel":
            notes.append("LDM: diffusers has no LDM-BERT; its rows run diffusers' UNet and VAE with our LDM-BERT.")
        for variant in ["eager"] + (["checkpointing"] if args.gradient_checkpointing else []):
            attempt(f"{label} {variant}", lambda variant=variant: train_rows(
                diffusers_step_for(parts, model, args.precision, gradient_checkpointing=variant != "eager"),
                label, variant, images, args, rows, measured))
        set_diffusers_gradient_checkpointing(parts, False)
        parts.to("cpu")
    for variant, levers in variants:
        attempt(f"ours {variant}", partial(time_ours, variant, levers))
    with contextlib.ExitStack() as cleanup:
        # main.py's checkpoint is written now, in the training dtype: sampling stores the weights in its own.
        files = cleanup.enter_context(main_loop_files(model, images)) if args.main_loop else None
        model.to(device)
        if parts is not None:
            parts.to(device)
        if args.sampling:
            if parts is not None and parts.text_encoder_label != "CLIPTextModel":
                notes.append("Sampling: StableDiffusionPipeline needs a CLIP text encoder, so LDM sampling is ours only.")
                parts = None
            report["sampling_steps"] = args.sampling_steps
            dtype = sampling_weights_dtype(device, sampling_precision(args.precision))
            report["sampling_dtype"] = str(dtype).removeprefix("torch.")
            report["sampling"] = []
            sampling_rows(model, parts, args, report["sampling"], attempt)
        if files is not None:
            model.cpu()
            if parts is not None:
                parts.to("cpu")
            release_memory(device)
            notes.append("ours, main.py: main.py's own training run, in a process of its own, on the same weights and "
                         "images (its data loader, Lightning's loop and hooks, logging and progress bar included); "
                         "ms/step: the mean time from one step's start to the next's after the warm-up, steps that "
                         "encoded an image new to the latent cache left out; peak: the most one of those steps "
                         "allocated.")
            variant, levers = main_loop_variant(variants)
            for batch_size in args.batch_sizes:
                attempt(f"ours, main.py {variant} batch {batch_size}", lambda batch_size=batch_size: rows.append(
                    main_loop_row(files, variant, levers, batch_size, args)))
    return report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    return str(device)


# --- output --------------------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _table(header: list[str], lines: list[list]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rows += ["| " + " | ".join(_cell(value) for value in line) + " |" for line in lines]
    return "\n".join(rows)


def format_report(report: dict) -> str:
    setting = (f"{report['device']}, torch {report['torch']}, diffusers {report['diffusers']}, {report['date']}; "
               f"{report['steps']} timed steps after {report['warmup']} warm-up steps")
    lines = [f"# Textual-inversion benchmark: {report['model']}, {report['precision']}", setting, ""]
    lines.append(_table(
        ["implementation", "batch", "variant", "images/s", "ms/step", "peak GiB", "peak reserved GiB",
         "held for backward MiB", "step peak MiB", "FLOP-floor fraction", "ours/diffusers"],
        [[row["implementation"], row["batch_size"], row["variant"], row["images_per_s"], row["ms_per_step"],
          row["peak_memory_gib"], row["peak_reserved_gib"], row["held_for_backward_mib"], row["step_peak_mib"],
          row["floor_fraction"], row["ratio"]]
         for row in report["training"]]))
    lines.append("")
    floors = ", ".join(f"{name} {gflop:g}" for name, gflop in FLOOR_GFLOP_PER_IMAGE.items())
    lines.append(f"Peak memory: torch.cuda.max_memory_allocated over the timed steps, and max_memory_reserved "
                 f"(the allocator's cache and CUDA graphs' pools too; n/a off CUDA). Held for backward: what one "
                 f"forward leaves allocated for its backward (activations); step peak: the most allocated during one "
                 f"step after the warm-up above what was allocated before it (CUDA allocator, or the CPU "
                 f"profiler's allocations with CUDA's autocast policy emulated). FLOP-floor "
                 f"fraction: GFLOP/image of UNet forward + input-gradient backward + text encoder ({floors}) "
                 f"x images/s / {report['peak_tflops']:g} TFLOP/s (CUDA, full-size models only).")
    profiled = [row for row in report["training"] if "ms_by_kind" in row]
    if profiled:
        on_cuda = report["device_type"] == "cuda"
        lines += ["", "## Where a step's time goes: " + ("kernel time by the op that launched it" if on_cuda
                                                           else "each op's own CPU time"), ""]
        lines.append(_table(
            ["implementation", "batch", "variant", "profiled ms", "GPU busy", *TIME_KINDS],
            [[row["implementation"], row["batch_size"], row["variant"], sum(row["ms_by_kind"].values()),
              f"{sum(row['ms_by_kind'].values()) / row['ms_per_step']:.0%}" if on_cuda else None,
              *(f"{row['ms_by_kind'][kind] / max(sum(row['ms_by_kind'].values()), 1e-9):.0%}" for kind in TIME_KINDS)]
             for row in profiled]))
        lines.append("")
        lines.append("GPU busy: kernel time of the profiled step over the timed step's wall time (a launch-bound "
                     "step is far below 100%). Percentages: shares of the profiled time.")
    if "sampling" in report:
        heading = (f"## Sampling: DDIM {report['sampling_steps']} steps, guidance {GUIDANCE_SCALE}, "
                   f"{report['sampling_dtype']}")
        lines += ["", heading, ""]
        lines.append(_table(["implementation", "images/prompt", "s/call", "images/s", "ours/diffusers"],
                            [[row["implementation"], row["images_per_prompt"], row["s_per_call"],
                              row["images_per_s"], row["ratio"]] for row in report["sampling"]]))
    lines += [""] + report["notes"]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=NAMED_CONFIGS, help="which config (default: sd on a GPU, tiny-sd on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", help="batch sizes (default: 1 8 16; CPU: 1 4)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: 20; CPU: 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default: 5; CPU: 2)")
    parser.add_argument("--precision", choices=TRAINER_PRECISION, help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="also time ours with the UNet compiled, in torch.compile's MODE (default: default; "
                             "reduce-overhead adds CUDA graphs)")
    parser.add_argument("--recompute_feedforward", action="store_true",
                        help="also time ours with the UNet's recompute_feedforward (GEGLU keeps its input only)")
    parser.add_argument("--offload_unet", action="store_true",
                        help="also time ours with offload_unet (the UNet's weights in CPU memory, streamed per block)")
    parser.add_argument("--channels_last", action="store_true",
                        help="also time ours with channels_last (the UNet's convolutions in NHWC), training and sampling")
    parser.add_argument("--attention_backend", nargs="+", default=[], metavar="BACKEND",
                        choices=[name for name in ATTENTION_BACKENDS if name != "auto"],
                        help="also time ours with the UNet's attention_backend set to each BACKEND, training and "
                             "sampling (flash, efficient, cudnn, math)")
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="also time ours with cuda_graphs (the UNet's and the text encoder's passes replayed as "
                             "CUDA graphs; CUDA only)")
    parser.add_argument("--combined", action="store_true",
                        help="also time ours with all of --cuda_graphs, --channels_last, the first --attention_backend "
                             "and --compile given here at once (sampling: all but --compile)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="also time both with gradient checkpointing (ours: the UNet's use_checkpoint)")
    parser.add_argument("--sampling", action="store_true", help="also time DDIM sampling with guidance")
    parser.add_argument("--sampling_steps", type=int, help="DDIM steps (default: 50; CPU: 10)")
    parser.add_argument("--skip_diffusers", action="store_true", help="time ours only")
    parser.add_argument("--main_loop", action="store_true",
                        help="also time main.py's own training run (data loader, Lightning's loop) on the same weights "
                             "at each batch size, with --combined's levers where given, else --cuda_graphs, else eager")
    parser.add_argument("--peak_tflops", type=float, default=790.0,
                        help="the GPU's bf16 matrix-product rate for the FLOP-floor fraction (default: %(default)s, "
                             "measured on an H100/H200 SXM; their datasheet's dense peak is 989)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per row and print where its time goes, by kind of op")
    parser.add_argument("--json", help="also write the results to this JSON file (after each measurement: a run cut "
                                       "short keeps what it measured)")
    args = parser.parse_args(argv)
    try:
        args.device = parse_device(args.device)
        if args.json:
            check_output(args.json, "--json")
    except ValueError as error:
        parser.error(str(error))
    on_cpu = args.device.type == "cpu"
    if args.cuda_graphs and args.device.type != "cuda":
        parser.error("--cuda_graphs needs a CUDA device: CUDA graphs exist only there")
    if args.combined and args.compile and args.cuda_graphs:
        parser.error("--combined cannot join --compile and --cuda_graphs (the model refuses both): drop one, or give "
                     "--compile reduce-overhead for a compiled UNet replayed as CUDA graphs")
    if args.combined and sum(map(bool, (args.cuda_graphs, args.channels_last, args.attention_backend,
                                        args.compile))) < 2:
        parser.error("--combined joins speed levers: give at least two of --cuda_graphs, --channels_last, "
                     "--attention_backend and --compile")
    defaults = {"model": "tiny-sd" if on_cpu else "sd", "batch_sizes": [1, 4] if on_cpu else [1, 8, 16],
                "steps": 10 if on_cpu else 20, "warmup": 2 if on_cpu else 5,
                "precision": "fp32" if on_cpu else "bf16", "sampling_steps": 10 if on_cpu else 50}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag in ("steps", "sampling_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error("--warmup must be at least 0 and every --batch_sizes entry at least 1")
    return args


def write_json(report: dict, path: str | None):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        os.replace(path + ".tmp", path)  # a run stopped mid-write keeps the previous measurement's file


def main(argv=None) -> int:
    args = parse_args(argv)
    # A time limit's SIGTERM unwinds (temporary folders, e.g. --main_loop's checkpoint, are removed) instead of
    # killing the process where it stands; --json holds what was measured.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    diffusers_logging.set_verbosity_error()  # it warns about every dtype cast the example script also makes
    try:
        report = run_benchmark(args, progress=partial(write_json, path=args.json))  # a run cut short keeps its rows
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called from Python (the tests) leaves no handler behind
    print(format_report(report))
    write_json(report, args.json)
    if args.json:
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
