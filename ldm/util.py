"""Small helpers shared by the whole package: config-driven construction and image utilities."""
import difflib
import importlib
import inspect
import textwrap

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
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


def load_yaml(path):
    """An OmegaConf config from a YAML file; a syntax error becomes a one-line ValueError that names the file."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ValueError(f"config '{path}' is not valid YAML: {' '.join(str(error).split())}") from None


def instantiate_from_config(config, **kwargs):
    """Build `config.target(**config.params, **kwargs)`, the LDM idiom for YAML-described modules.

    The special values `__is_first_stage__` and `__is_unconditional__` stand for "no module" and return None.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    target = get_obj_from_str(config["target"])
    check_config_keys(target, params)
    return target(**params, **kwargs)


def config_parameters(target):
    """The keyword names `target` (a class of this package or a function) accepts, following `**kwargs` that an
    __init__ hands to its base class; and whether the last of them takes any other key as well."""
    names, takes_any, found = set(), False, False
    for owner in inspect.getmro(target) if inspect.isclass(target) else [target]:
        function = owner.__dict__.get("__init__") if inspect.isclass(target) else owner
        if function is None:
            continue
        if not owner.__module__.startswith("ldm."):
            break
        found = True
        parameters = inspect.signature(function).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
        if not takes_any:
            break
    return names - {"self"}, takes_any or not found


def check_config_keys(target, params, where: str = "") -> set[str]:
    """Refuse a misspelt config key in one line, naming the key (under `where`, its place in the config) and the
    likely intended one, before it becomes a TypeError traceback or, for classes that take other keys (the original
    configs' unused ones) and only warn, a run trained with a default the user meant to change. Returns the keys
    `target` will be built with (a class of another package: all of them)."""
    if not getattr(target, "__module__", "").startswith("ldm."):
        return set(params)
    names, takes_any = config_parameters(target)
    check_keys(params, names, takes_any, f"{target.__qualname__} ({target.__module__})", where)
    return set(params) & names


def check_keys(keys, names, takes_any: bool, owner: str, where: str = ""):
    """A ValueError for the first of `keys` that is not one of `names`; where `takes_any` (other keys are let
    through), only for a near-miss of a name (a typo, not another repository's key such as CompVis's
    scheduler_config: the cutoff sits above such pairs' similarity)."""
    for key in keys:
        if key in names:
            continue
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.85 if takes_any else 0.6)
        if takes_any and not close:
            continue
        hint = f": did you mean '{close[0]}'?" if close else f"; it takes {', '.join(sorted(names))}"
        raise ValueError(f"config key '{where}{key}' is not a setting of {owner}{hint}")


def check_config_tree(config, where: str = ""):
    """check_config_keys for every `target` in a config (found at `where`, e.g. "model.") that will be built, so
    that a misspelt key fails before any weights load. Keys a class lets through unused (CompVis's
    scheduler_config) are not looked into: their targets may name modules this project does not have, and nothing
    builds them."""
    root = OmegaConf.to_container(config) if OmegaConf.is_config(config) else config
    stack = [(root, where)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((value, f"{where}{index}.") for index, value in enumerate(node))
        if not isinstance(node, dict):
            continue
        children = node
        if isinstance(node.get("target"), str):
            params = node.get("params") or {}
            built = check_config_keys(get_obj_from_str(node["target"]), params, f"{where}params.")
            children = {"params": {key: params[key] for key in built}}
        stack.extend((value, f"{where}{key}.") for key, value in children.items())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def exists(x):
    return x is not None


def default(value, fallback):
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback


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


class BatchPositions:
    """The position of each training batch in a run: its optimizer step times the batches per step, plus its index
    among that step's batches. Under gradient accumulation several batches share a step and each needs its own
    noise; a resumed run restarts at a step boundary, where the index starts again from 0."""

    def __init__(self):
        self._step, self._index = -1, 0

    def next(self, step: int, batches_per_step: int) -> int:
        """The position of the training batch now starting (call once per batch)."""
        self._index = self._index + 1 if step == self._step else 0
        self._step = step
        return step * batches_per_step + self._index


def batches_per_step(module) -> int:
    """The trainer's `accumulate_grad_batches`, 1 for a module used without a trainer."""
    return module._trainer.accumulate_grad_batches if module._trainer is not None else 1


def step_generator(seed: int, step: int, device, rank: int = 0) -> torch.Generator:
    """The random stream of one training batch: a pure function of (seed, its position, rank), so resumed runs
    draw exactly what an uninterrupted run would have drawn."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 101 + rank) % (2**63))
    return generator
