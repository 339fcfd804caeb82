"""Text-to-image and image-to-image generation with a LatentDiffusion model and learned words.

The one core behind scripts/txt2img.py (LDM), scripts/stable_txt2img.py (SD v1) and scripts/img2img.py; the
scripts differ only in their defaults. Deliberate departures from the original scripts:
- Every random draw (start codes, DDIM eta noise, img2img noise) comes from one `torch.Generator` seeded with
  `seed` on the model's device, so a seed reproduces its images on that device; LDM txt2img gains `--seed`.
- The unconditional batch of classifier-free guidance matches each batch, so the shorter last chunk of
  `--from-file` works (the original crashed on it).
- img2img noises the latent to the step its first denoising step starts from (the original noised one DDIM step
  further than it denoised), starts strength 1 from pure noise (the original indexed past its schedule) and
  encodes the init image with the posterior mean, so strength 0 is the autoencoder's round trip.
- Images are PNG; sample numbers continue after the highest one already saved and grids never overwrite.
- The init image is read as training images are (`load_upright_rgb`: EXIF rotation, 16-bit grey, alpha on
  white), and a prompt without the learned words or longer than the text encoder reads is warned about.
- Several `--embedding_path` files are merged in memory, and a config without personalization gets an
  EmbeddingManager for them (the original crashed on `txt2img-1p4B-eval.yaml`, issue #138).
"""
import contextlib
import os
import re
import sys
import warnings
from functools import partial

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.checkpoint import load_checkpoint
from ldm.cli import default_device, parse_device, read_config, require_at_least
from ldm.data.personalized import load_upright_rgb
from ldm.embeddings import Embeddings, load_embeddings, merge_embeddings
from ldm.images import channels_first, make_grid, tensor_to_pil
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import DEFAULT_TIMESTEPS, LatentDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_util import make_ddim_timesteps
from ldm.modules.attention import ATTENTION_BACKENDS
from ldm.modules.diffusionmodules.openaimodel import Downsample
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.tokenizers import text_token_ids
from ldm.paths import check_output, require_file
from ldm.util import instantiate_from_config

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler}
PRECISIONS = ("autocast", "full")
IMG2IMG_NEEDS_DDIM = "img2img needs the DDIM sampler (PLMS cannot start partway): drop --plms"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
# File names are limited to 255 bytes; the rest of a long prompt is dropped from the grid's name.
GRID_NAME_MAX_BYTES = 150
UNSAFE_FILENAME_CHARACTERS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
SAMPLE_NAME = re.compile(r"(\d{5,})\.png")


# --- model and learned words ---------------------------------------------------------------------------------
def load_model(config_path, ckpt_path, device, embedding_paths=(), use_ema=None,
               weights_dtype: torch.dtype = torch.float32, cuda_graphs: bool = False,
               channels_last: bool = False, attention_backend: str | None = None) -> LatentDiffusion:
    """Build the config's LatentDiffusion restored from `ckpt_path`, with the learned words of `embedding_paths`,
    on `device` in eval mode, its frozen weights in `weights_dtype` (see `sampling_weights_dtype`), its UNet
    replayed as CUDA graphs with `cuda_graphs` (ldm/modules/cuda_graphs.py), run channels-last (NHWC) with
    `channels_last`, its attention kernel chosen by `attention_backend` (None: the config's). `use_ema` overrides
    the config's choice of the checkpoint's EMA UNet weights."""
    config = read_config(config_path)
    learned_words = read_learned_words(embedding_paths)  # before the model: a bad file is named in a second
    checkpoint = load_checkpoint(ckpt_path)
    if checkpoint.global_step is not None:
        print(f"Global step of '{ckpt_path}': {checkpoint.global_step}")
    params = config.model.params
    params.pop("ckpt_path", None)
    if use_ema is not None:
        params.use_ema = use_ema
    model = instantiate_from_config(config.model, ckpt_path=checkpoint)
    if not isinstance(model, LatentDiffusion):
        raise ValueError(f"config '{config_path}' builds a {type(model).__name__}, not a LatentDiffusion model")
    load_learned_words(model, learned_words)
    model.store_frozen_weights(weights_dtype)
    if channels_last:
        model.model.use_channels_last()
    if attention_backend is not None:
        model.model.diffusion_model.use_attention_backend(attention_backend)
    if cuda_graphs:
        model.model.use_cuda_graphs()
    model.to(device).park_idle_token_table()
    return model.eval()


def sampling_weights_dtype(device, precision: str) -> torch.dtype:
    """The dtype to keep frozen weights in for `generate(precision=...)` on `device`: autocast's half dtype on an
    accelerator, where autocast would otherwise cast every weight at every call into it (half the memory, the same
    products), float32 on the CPU (where "autocast" runs in float32) or with "full"."""
    device = torch.device(device)
    if precision == "autocast" and device.type != "cpu":
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def check_ddim_steps(steps: int, num_timesteps: int):
    """A one-line error when no `steps`-step sampling schedule can be cut from the model's `num_timesteps`."""
    require_at_least(1, ddim_steps=steps)
    try:
        make_ddim_timesteps("uniform", steps, num_timesteps)
    except ValueError as error:
        raise ValueError(f"--ddim_steps {steps} does not suit this model: {error}") from None


def config_timesteps(config_path) -> int:
    """How many diffusion timesteps the config's model will have."""
    return int(read_config(config_path).model.params.get("timesteps", DEFAULT_TIMESTEPS))


def read_learned_words(embedding_paths) -> list[tuple[str, Embeddings]]:
    """Each `--embedding_path` file's path and contents; files that cannot share a prompt are refused here."""
    for path in embedding_paths:
        require_file(path, "--embedding_path", "check the path")
    loaded = [(os.fspath(path), load_embeddings(path)) for path in embedding_paths]
    if len(loaded) > 1:
        merge_embeddings(loaded)
    return loaded


def load_learned_words(model: LatentDiffusion, loaded: list[tuple[str, Embeddings]]) -> None:
    """Put the words of the `read_learned_words` files into the model's EmbeddingManager, building one if the config
    has none."""
    if not loaded:
        if model.embedding_manager is not None:
            print(f"No --embedding_path: the config's placeholders {describe_learned_words(model.embedding_manager)} "
                  "hold initial vectors, not learned ones")
        return
    for path, embeddings in loaded:
        embeddings.check_width(model.cond_stage_model.token_dim, f"embedding file '{path}'")
    # One file is used as it is, so its recorded training step still decides a progressive config's active vectors.
    embeddings = loaded[0][1] if len(loaded) == 1 else merge_embeddings(loaded)
    if model.embedding_manager is None:
        model.embedding_manager = EmbeddingManager(model.cond_stage_model)
    files = ", ".join(f"'{path}'" for path, _ in loaded)
    one = len(loaded) == 1
    model.embedding_manager.set_embeddings(embeddings, source=f"embedding file{'' if one else 's'} {files}",
                                           path=loaded[0][0] if one else None)
    print(f"Learned words: {describe_learned_words(model.embedding_manager)}")


def describe_learned_words(manager: EmbeddingManager) -> str:
    """'* (1 vector), @ (2 vectors)'."""
    counts = {p: manager.vectors(p).shape[0] for p in manager.string_to_token_dict}
    return ", ".join(f"{p} ({n} vector{'s' if n != 1 else ''})" for p, n in counts.items())


def prompt_token_ids(model: LatentDiffusion, prompt: str) -> list[int]:
    """The token ids the text encoder is fed for `prompt` before they are cut to its length, start and end tokens
    left out, each learned word as the EmbeddingManager reads it and repeated once per active vector it fills."""
    manager, tokenizer = model.embedding_manager, model.cond_stage_model.tokenizer
    text = prompt if manager is None else manager.prompt_for_tokenizer(prompt)
    ids = text_token_ids(tokenizer, text)
    if manager is None:
        return ids
    widths = {token: manager.num_active_vectors(manager.vectors(word).shape[0])
              for word, token in manager.string_to_token_dict.items()}
    return [token for token in ids for _ in range(widths.get(token, 1))]


def prompt_warnings(model: LatentDiffusion, prompt: str, label: str, learned_words=()) -> list[str]:
    """One-line warnings for a prompt that the model reads otherwise than it looks: it holds none of
    `learned_words` (allowed, to compare with and without them), or it is longer than the text encoder reads, which
    drops the rest without a word. `label` names the prompt, e.g. "--prompt 'a photo of *'"."""
    ids = prompt_token_ids(model, prompt)
    tokens = model.embedding_manager.string_to_token_dict if learned_words else {}
    word_of = {tokens[word]: word for word in learned_words}
    messages = []
    if learned_words and not any(token in word_of for token in ids):
        messages.append(f"{label} holds none of the learned words ({', '.join(learned_words)}), so the "
                        f"images show none of them; write one in it to use it, e.g. 'a photo of {learned_words[0]}'")
    limit = model.cond_stage_model.max_length
    if len(ids) + 2 > limit:  # the start and end tokens take two places
        dropped = dict.fromkeys(word_of[token] for token in ids[limit - 2:] if token in word_of)
        words = f", learned word {', '.join(dropped)} included," if dropped else ""
        messages.append(f"{label} is {len(ids) + 2} tokens, but the text encoder reads {limit} (start and end "
                        f"included): the rest{words} is dropped; shorten the prompt")
    return messages


# --- generation ------------------------------------------------------------------------------------------------
def first_stage_factor(model: LatentDiffusion) -> int:
    """How many pixels one latent cell spans per side: the autoencoder halves the size at every level but the last."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)


def pixel_multiple(model: LatentDiffusion) -> int:
    """Image sides must be multiples of this: the latent is downsampled once more per UNet level."""
    unet_downsamples = sum(
        any(isinstance(m, Downsample) for m in block.modules()) for block in model.model.diffusion_model.input_blocks
    )
    return first_stage_factor(model) * 2 ** unet_downsamples


def _check_latent_format(model, latent_channels, downsampling_factor):
    if latent_channels is not None and latent_channels != model.channels:
        raise ValueError(f"--C {latent_channels} does not match this model's {model.channels} latent channels: "
                         f"pass --C {model.channels}")
    factor = first_stage_factor(model)
    if downsampling_factor is not None and downsampling_factor != factor:
        raise ValueError(f"--f {downsampling_factor} does not match this model's autoencoder, which downsamples by "
                         f"{factor}: pass --f {factor}")


def _check_image_size(model, height, width):
    multiple = pixel_multiple(model)
    for flag, value in (("--H", height), ("--W", width)):  # None: not given (img2img takes the image's)
        if value is not None and (value <= 0 or value % multiple):
            raise ValueError(f"{flag} {value} must be a positive multiple of {multiple} for this model")


def read_init_image(path) -> Image.Image:
    """The init image read as training reads its images (EXIF rotation, 16-bit grey, alpha on white), so img2img
    starts from the picture the learned words were trained on; a one-line error naming --init_img otherwise."""
    try:
        return load_upright_rgb(path)
    except ValueError as error:  # unreadable, or too large to decode safely
        raise ValueError(f"--init_img: {error}") from None


def load_init_image(image, multiple: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """A (1, 3, H, W) RGB tensor in [-1, 1] from a path or PIL image.

    Resized to `height` x `width` when given, else to its own size rounded down to `multiple`, as the UNet needs.
    """
    image = image.convert("RGB") if isinstance(image, Image.Image) else read_init_image(image)
    size = (width or image.width - image.width % multiple, height or image.height - image.height % multiple)
    if min(size) <= 0:
        raise ValueError(f"init image of {image.width}x{image.height} px is smaller than the {multiple} px this "
                         "model needs per side")
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.LANCZOS)
    return channels_first(torch.from_numpy(np.array(image))[None])


def encode_image(model: LatentDiffusion, image: torch.Tensor) -> torch.Tensor:
    """The scaled latent of an image in [-1, 1]; a Gaussian posterior contributes its mean, so it is deterministic."""
    posterior = model.encode_first_stage(image)
    if isinstance(posterior, DiagonalGaussianDistribution):
        posterior = posterior.mode()
    return model.get_first_stage_encoding(posterior)


def _prompt_batches(prompts, n_samples: int) -> list[list[str]]:
    """One prompt repeats n_samples times; a list is cut into batches of n_samples (the last may be shorter)."""
    if isinstance(prompts, str):
        return [[prompts] * n_samples]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("there are no prompts: pass --prompt or a --from-file with one prompt per line")
    return [prompts[i:i + n_samples] for i in range(0, len(prompts), n_samples)]


def _check_strength(strength) -> None:
    if strength is None or not 0 <= strength <= 1:
        raise ValueError(f"--strength must be between 0 and 1 (0 keeps the init image, 1 ignores it), got {strength}")


def check_generation_settings(*, n_samples: int, n_iter: int, steps: int, num_timesteps: int, sampler: str,
                              img2img: bool, strength: float | None) -> None:
    """The checks of plain values that both the command line (before the model loads) and `generate` make: the
    sampler, the counts, the step count against the model's `num_timesteps` and the img2img rules."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler '{sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
    require_at_least(1, n_samples=n_samples, n_iter=n_iter)
    check_ddim_steps(steps, num_timesteps)
    if img2img:
        if sampler != "ddim":
            raise ValueError(IMG2IMG_NEEDS_DDIM)
        _check_strength(strength)
    elif strength is not None:
        raise ValueError("strength applies only to img2img: pass an init image too")


def _sample_from_noise(sampler, noise, cond, uc, *, steps, scale, eta, generator, progress):
    samples, _ = sampler.sample(steps, noise.shape[0], tuple(noise.shape[1:]), cond, eta=eta, x_T=noise,
                                unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                generator=generator, progress=progress)
    return samples


def _sample_from_image(sampler, noise, cond, uc, *, init_latent, strength, steps, scale, eta, generator, progress):
    """Noise the init latent to the step the first of int(strength * S) denoising steps starts from, then denoise;
    strength 1 denoises pure noise over the whole schedule. S is the schedule's length, which exceeds `steps` where
    `steps` does not divide the model's timesteps (30 of 1000 runs 31), so strength keeps its meaning there."""
    sampler.make_schedule(steps, ddim_eta=eta)
    total = len(sampler.ddim_timesteps)
    t_start = total if strength == 1 else int(strength * total)
    init_latent = init_latent.expand(noise.shape[0], -1, -1, -1)
    if t_start == total:
        latent = noise
    elif t_start > 0:
        step = torch.full((noise.shape[0],), t_start - 1, dtype=torch.long, device=noise.device)
        latent = sampler.stochastic_encode(init_latent, step, noise=noise)
    else:
        latent = init_latent
    return sampler.decode(latent, cond, t_start, unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                          generator=generator, progress=progress)


@torch.no_grad()
def generate(model: LatentDiffusion, prompts, *, n_samples: int, n_iter: int, steps: int, scale: float, eta: float,
             seed: int, height: int | None = None, width: int | None = None, sampler: str = "ddim",
             fixed_code: bool = False, init_image=None, strength: float | None = None, precision: str = "autocast",
             latent_channels: int | None = None, downsampling_factor: int | None = None,
             progress: bool = True) -> list[torch.Tensor]:
    """Images as (3, H, W) float tensors in [0, 1] on the CPU, in the order they are made.

    `prompts` is one prompt (each batch is n_samples copies) or a list (cut into batches of n_samples); all batches
    run n_iter times. H and W default to the size the model was trained at, with `init_image` (path or PIL image,
    img2img) to the image's size.
    `fixed_code` reuses the first batch's start noise for every batch. "autocast" runs under
    `torch.autocast` in fp16 on a GPU; on the CPU, where half precision is slower, it stays fp32 like "full". `latent_channels` and
    `downsampling_factor` (--C, --f) are checked against the model, which alone decides the latent shape.
    """
    check_generation_settings(n_samples=n_samples, n_iter=n_iter, steps=steps, num_timesteps=model.num_timesteps,
                              sampler=sampler, img2img=init_image is not None, strength=strength)
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is unknown: use one of {', '.join(PRECISIONS)}")
    stored = next(model.model.parameters()).dtype
    if precision == "full" and stored != torch.float32:
        raise ValueError(f"precision 'full' needs float32 weights, but the model's are stored in {stored}: load it "
                         "with load_model(..., weights_dtype=torch.float32) or sample with precision 'autocast'")
    batches = _prompt_batches(prompts, n_samples)
    _check_latent_format(model, latent_channels, downsampling_factor)
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast(device.type) if precision == "autocast" and device.type != "cpu" else contextlib.nullcontext()
    settings = dict(steps=steps, scale=scale, eta=eta, generator=generator, progress=progress)
    with autocast:
        if init_image is None:
            factor = first_stage_factor(model)
            height, width = height or model.image_size * factor, width or model.image_size * factor
            _check_image_size(model, height, width)
            latent_shape = (model.channels, height // factor, width // factor)
            denoise = partial(_sample_from_noise, SAMPLERS[sampler](model), **settings)
        else:
            _check_image_size(model, height, width)
            image = load_init_image(init_image, pixel_multiple(model), height, width).to(device)
            init_latent = encode_image(model, image)
            latent_shape = tuple(init_latent.shape[1:])
            denoise = partial(_sample_from_image, DDIMSampler(model), init_latent=init_latent, strength=strength,
                              **settings)
        uc = model.get_learned_conditioning([""]) if scale != 1.0 else None
        start_code = torch.randn((n_samples, *latent_shape), generator=generator, device=device) if fixed_code else None
        images = []
        for batch in tqdm([b for _ in range(n_iter) for b in batches], desc="Sampling", disable=not progress):
            cond = model.get_learned_conditioning(batch)
            batch_uc = None if uc is None else uc.expand(len(batch), -1, -1)
            if start_code is not None:
                noise = start_code[:len(batch)]
            else:
                noise = torch.randn((len(batch), *latent_shape), generator=generator, device=device)
            decoded = model.decode_first_stage(denoise(noise, cond, batch_uc)).float().cpu()
            if not torch.isfinite(decoded).all():  # they would be saved as black images
                warnings.warn("sampling gave NaN or infinite pixels, saved as black: half-precision overflow is the "
                              "usual cause; sample with --precision full", stacklevel=2)
            images.extend(((decoded + 1.0) / 2.0).clamp(0.0, 1.0))
    return images


# --- saving ----------------------------------------------------------------------------------------------------
def grid_stem(prompt: str) -> str:
    """The prompt as a file name: whitespace runs become dashes, characters some file systems refuse become '_'."""
    name = UNSAFE_FILENAME_CHARACTERS.sub("_", "-".join(prompt.split()))
    name = name.encode("utf-8")[:GRID_NAME_MAX_BYTES].decode("utf-8", errors="ignore").strip(".-")
    return name or "grid"


def _next_index(folder: str, pattern: re.Pattern) -> int:
    indices = [int(m.group(1)) for m in map(pattern.fullmatch, os.listdir(folder)) if m]
    return max(indices, default=-1) + 1


def _save_new_png(image: Image.Image, path_for, index: int) -> tuple[str, int]:
    """Save under the first free `path_for(index)` from `index` on, creating the file exclusively (no overwrite)."""
    while True:
        path = path_for(index)
        try:
            with open(path, "xb") as handle:
                image.save(handle, format="PNG")
            return path, index
        except FileExistsError:
            index += 1


def save_outputs(images, outdir, prompt: str, n_rows: int, skip_grid: bool = False,
                 skip_save: bool = False) -> list[str]:
    """Write `outdir/samples/NNNNN.png` per image and the grid `outdir/<prompt-with-dashes>-NNNN.png`, `n_rows`
    images per row; numbering continues after the files already there. Returns the paths written."""
    paths = []
    if not skip_save:
        sample_dir = os.path.join(outdir, "samples")
        os.makedirs(sample_dir, exist_ok=True)
        index = _next_index(sample_dir, SAMPLE_NAME)
        for image in images:
            path, index = _save_new_png(tensor_to_pil(image), lambda i: os.path.join(sample_dir, f"{i:05}.png"), index)
            paths.append(path)
            index += 1
    if not skip_grid:
        if n_rows < 1:
            raise ValueError(f"--n_rows must be at least 1 (0 means n_samples), got {n_rows}")
        os.makedirs(outdir, exist_ok=True)
        stem = grid_stem(prompt)
        index = _next_index(outdir, re.compile(re.escape(stem) + r"-(\d{4,})\.png"))
        grid = tensor_to_pil(make_grid(torch.stack(list(images)), nrow=n_rows))
        path, _ = _save_new_png(grid, lambda i: os.path.join(outdir, f"{stem}-{i:04}.png"), index)
        paths.append(path)
    return paths


# --- command line shared by scripts/txt2img.py, stable_txt2img.py and img2img.py -----------------------------
def add_generation_arguments(parser, *, img2img: bool = False) -> None:
    """The flags every generation script takes, with the defaults of the original stable_txt2img.py (SD v1).

    Scripts change defaults with `parser.set_defaults`; `img2img` adds --init_img and --strength and lets --H/--W
    default to the init image's size.
    """
    add = parser.add_argument
    add("--prompt", type=str, default=DEFAULT_PROMPT, help="the prompt to render")
    add("--outdir", type=str, default="outputs/txt2img-samples", help="folder to write results to (default: %(default)s)")
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples (e.g. for speed measurements)")
    add("--ddim_steps", type=int, default=50, help="number of sampling steps (default: %(default)s)")
    add("--plms", action="store_true", help="use PLMS sampling (txt2img only; needs --ddim_eta 0)")
    add("--fixed_code", action="store_true", help="use the same start code for every batch")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 is deterministic DDIM)")
    add("--n_iter", type=int, default=2, help="how often to sample each batch (default: %(default)s)")
    add("--H", type=int, default=None,
        help="image height in pixels (default: the size the model was trained at, 512 for SD v1, 256 for LDM; "
             "img2img: the init image's)")
    add("--W", type=int, default=None,
        help="image width in pixels (default: the size the model was trained at; img2img: the init image's)")
    add("--C", type=int, default=None, help="latent channels (default: the model's); checked against the model")
    add("--f", type=int, default=None,
        help="autoencoder downsampling factor (default: the model's); checked against the model")
    add("--n_samples", type=int, default=3, help="batch size: images per prompt per iteration (default: %(default)s)")
    add("--n_rows", type=int, default=0, help="images per grid row (default: 0, meaning n_samples)")
    add("--scale", type=float, default=7.5,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)) "
             "(default: %(default)s)")
    add("--from-file", type=str, help="read prompts from this file, one per line, in batches of n_samples")
    add("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml",
        help="model config (default: %(default)s)")
    add("--ckpt", "--ckpt_path", dest="ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
        help="model checkpoint (default: %(default)s)")
    add("--seed", type=int, default=42, help="seed of all sampling noise (default: %(default)s)")
    add("--precision", type=str, choices=PRECISIONS, default="autocast", help="autocast: fp16 on a GPU (fp32 on the CPU, where it is faster); full: fp32 (default: %(default)s)")
    add("--embedding_path", type=str, nargs="+", action="extend", default=[],
        help="embedding file(s) with learned words; repeat or list several to use their words together")
    add("--device", type=str, default=default_device(), help="device to run on (default: %(default)s)")
    add("--cuda_graphs", action="store_true",
        help="replay the UNet as CUDA graphs, recorded once per batch shape (CUDA only; elsewhere it runs as usual)")
    add("--channels_last", action="store_true",
        help="run the UNet's convolutions channels-last (NHWC); the same images up to rounding")
    add("--attention_backend", choices=ATTENTION_BACKENDS,
        help="the attention kernel the UNet tries first (default: the config's, else PyTorch's own choice)")
    if img2img:
        add("--init_img", type=str, required=True, help="path to the input image")
        add("--strength", type=float, default=0.75,
            help="how much to change the init image: 0 keeps it, 1 ignores it (default: %(default)s)")
        parser.set_defaults(H=None, W=None, outdir="outputs/img2img-samples")
    else:
        parser.set_defaults(init_img=None, strength=None)


def _read_prompts(args) -> tuple[list[str] | str, str]:
    """The prompts and the name of their grid: the prompt itself, or the stem of the --from-file."""
    if not args.from_file:
        return args.prompt, args.prompt
    try:
        with open(args.from_file, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--from-file '{args.from_file}' cannot be read ({error})") from None
    if not prompts:
        raise ValueError(f"--from-file '{args.from_file}' holds no prompts: write one prompt per line")
    return prompts, os.path.splitext(os.path.basename(args.from_file))[0]


def _sampler_name(args) -> str:
    return "plms" if args.plms else "ddim"


def _check_arguments(args) -> None:
    """What can be checked before the model loads: the numbers, the config, the init image and the output folder."""
    check_generation_settings(n_samples=args.n_samples, n_iter=args.n_iter, steps=args.ddim_steps,
                              num_timesteps=config_timesteps(args.config), sampler=_sampler_name(args),
                              img2img=args.init_img is not None, strength=args.strength)
    require_at_least(1, H=args.H, W=args.W)
    require_at_least(0, n_rows=args.n_rows, ddim_eta=args.ddim_eta)
    if args.plms and args.ddim_eta != 0:
        raise ValueError(f"--plms is deterministic: drop --ddim_eta {args.ddim_eta}, or drop --plms to sample with DDIM")
    if args.init_img is not None:
        require_file(args.init_img, "--init_img", "check the path")
    check_output(args.outdir, "--outdir", folder=True)


def run_command_line(parser, argv=None) -> int:
    """Parse `argv`, generate and save; bad input is reported as one line on stderr with exit status 1, before
    the model loads wherever it can be."""
    args = parser.parse_args(argv)
    try:
        _check_arguments(args)
        prompts, grid_name = _read_prompts(args)
        device = parse_device(args.device)
        # Every step has the same shapes: cuDNN tries its convolution algorithms once and keeps the fastest, as
        # training does (`trainer: benchmark: True` in the configs) and as scripts/benchmark.py times sampling.
        torch.backends.cudnn.benchmark = device.type == "cuda"
        if args.cuda_graphs and device.type != "cuda":
            print(f"{parser.prog}: note: --cuda_graphs has no effect with --device {args.device} (CUDA graphs exist "
                  "only on CUDA devices); sampling runs as usual", file=sys.stderr)
        init_image = None if args.init_img is None else read_init_image(args.init_img)
        model = load_model(args.config, args.ckpt, device, embedding_paths=args.embedding_path,
                           weights_dtype=sampling_weights_dtype(device, args.precision), cuda_graphs=args.cuda_graphs,
                           channels_last=args.channels_last, attention_backend=args.attention_backend)
        learned_words = list(model.embedding_manager.string_to_token_dict) if args.embedding_path else []
        for prompt in dict.fromkeys([prompts] if isinstance(prompts, str) else prompts):
            label = f"prompt '{prompt}' of --from-file '{args.from_file}'" if args.from_file else f"--prompt '{prompt}'"
            for message in prompt_warnings(model, prompt, label, learned_words):
                print(f"{parser.prog}: warning: {' '.join(message.split())}", file=sys.stderr)
        images = generate(
            model, prompts, n_samples=args.n_samples, n_iter=args.n_iter, steps=args.ddim_steps, scale=args.scale,
            eta=args.ddim_eta, seed=args.seed, height=args.H, width=args.W, sampler=_sampler_name(args),
            fixed_code=args.fixed_code, init_image=init_image, strength=args.strength, precision=args.precision,
            latent_channels=args.C, downsampling_factor=args.f,
        )
        save_outputs(images, args.outdir, grid_name, args.n_rows or args.n_samples, skip_grid=args.skip_grid,
                     skip_save=args.skip_save)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"Your samples are ready and waiting for you here: {args.outdir}")
    return 0
