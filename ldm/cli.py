"""Checks of command-line values shared by the scripts (devices, counts, configs), in one light module so that a
script that needs only these does not import the model stack with ldm.generate."""
import torch

from ldm.paths import require_file
from ldm.util import check_config_tree, load_yaml

# The training configs that the benchmark and the diagnostics build random-weight models from, by short name,
# relative to the repository root.
NAMED_CONFIGS = {
    "sd": "configs/stable-diffusion/v1-finetune.yaml",
    "ldm": "configs/latent-diffusion/txt2img-1p4B-finetune.yaml",
    "tiny-sd": "configs/tiny/sd-tiny-finetune.yaml",
    "tiny-ldm": "configs/tiny/ldm-tiny-finetune.yaml",
}


def default_device() -> str:
    """The machine's accelerator (CUDA, MPS, XPU, ...) when one is usable, else the CPU."""
    return str(torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu"))


def parse_device(name: str, flag: str = "--device") -> torch.device:
    """The device `name` when this machine has it; otherwise a one-line error naming `flag`, not the traceback
    (or the silent fallback) a later `.to(device)` would give."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} '{name}' is not a device: use e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "cpu":
        return device
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != device.type:
        raise ValueError(f"{flag} '{name}': this machine has no usable {device.type} device: use {flag} "
                         f"{default_device()}")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        names = f"{device.type}:0" if count == 1 else f"{device.type}:0 to {device.type}:{count - 1}"
        raise ValueError(f"{flag} '{name}': this machine's {device.type} devices are {names}: pass one of them")
    return device


def require_at_least(minimum, **flags) -> None:
    """A one-line error naming the first flag below `minimum` (keywords are flag names; None means unset)."""
    for flag, value in flags.items():
        if value is not None and value < minimum:
            raise ValueError(f"--{flag} must be at least {minimum}, got {value}")


def read_config(config_path, flag: str = "--config"):
    """The config at `config_path`, given with `flag`; a missing file, a folder, bad YAML or a config without
    model.params is a one-line error."""
    require_file(config_path, flag, "check the path")
    config = load_yaml(config_path)
    if "model" not in config or "params" not in config.model:
        raise ValueError(f"config '{config_path}' has no model.params section: pass an inference config")
    check_config_tree(config.model, "model.")
    return config
