"""Conversions between dataset images, network tensors and PIL images, and the grids and captions of logged
samples."""
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def channels_first(images: torch.Tensor) -> torch.Tensor:
    """Dataset images, (B, H, W, C) ((B, H, W) for one channel), uint8 or float in [-1, 1], as the contiguous
    float32 (B, C, H, W) in [-1, 1] the networks take.

    Datasets hand out uint8, a quarter of float32's bytes through worker processes, collation and pinning; the
    conversion is the float32 arithmetic they used to do, so where it happens changes no value."""
    if images.ndim == 3:
        images = images[..., None]
    images = images.permute(0, 3, 1, 2)
    return (images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()).contiguous()


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
        images.append(np.asarray(canvas))
    return channels_first(torch.from_numpy(np.stack(images)))


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
