"""Small helpers shared by the whole package: config-driven construction and image utilities."""
import importlib
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# The training configs that the benchmark and the diagnostics build random-weight models from, by short name,
# relative to the repository root.
NAMED_CONFIGS = {
    "sd": "configs/stable-diffusion/v1-finetune.yaml",
    "ldm": "configs/latent-diffusion/txt2img-1p4B-finetune.yaml",
    "tiny-sd": "configs/tiny/sd-tiny-finetune.yaml",
    "tiny-ldm": "configs/tiny/ldm-tiny-finetune.yaml",
}


def get_obj_from_str(dotted_path: str):
    """Import `package.module.Name` and return `Name`."""
    module, _, name = dotted_path.rpartition(".")
    if not module:
        raise ValueError(f"target '{dotted_path}' is not a dotted path such as 'ldm.models.autoencoder.AutoencoderKL'")
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config, **kwargs):
    """Build `config.target(**config.params, **kwargs)`, the LDM idiom for YAML-described modules.

    The special values `__is_first_stage__` and `__is_unconditional__` stand for "no module" and return None.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    return get_obj_from_str(config["target"])(**params, **kwargs)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def exists(x):
    return x is not None


def default(value, fallback):
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def log_txt_as_img(wh, captions, size=10):
    """Render each caption as black text on a white (w, h) canvas; returns (B, 3, h, w) in [-1, 1].

    Uses PIL's built-in font so it works on every platform (the original needed a TTF file).
    """
    w, h = wh
    font = ImageFont.load_default()
    chars_per_line = max(1, int(40 * (w / 256)))
    images = []
    for caption in captions:
        canvas = Image.new("RGB", (w, h), color="white")
        lines = "\n".join(textwrap.wrap(str(caption), chars_per_line))
        ImageDraw.Draw(canvas).text((0, 0), lines, fill="black", font=font)
        images.append(np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images))


def make_grid(images: torch.Tensor, nrow: int = 4, padding: int = 2) -> torch.Tensor:
    """Tile (B, C, H, W) images into one (C, H', W') grid, `nrow` images per row."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = images.new_zeros(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i in range(b):
        row, col = divmod(i, ncol)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] to a PIL image."""
    array = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def step_generator(seed: int, step: int, device, rank: int = 0) -> torch.Generator:
    """The random stream of one training step: a pure function of (seed, step, rank), so resumed runs
    draw exactly what an uninterrupted run would have drawn."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 101 + rank) % (2**63))
    return generator
