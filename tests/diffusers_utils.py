"""diffusers as an independent reference for our models, built offline from the same original-format checkpoint.

A Stable Diffusion v1 user holds one CompVis-format file; diffusers converts it with `from_single_file`. Writing our
tiny model to such a file and letting diffusers convert it checks our module and key names against a second
implementation. No weights come from anywhere but the file: the local config folder holds configs and the tokenizer.
"""
import contextlib
import json
import os
import socket

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm.modules.encoders.modules import SD_V1_CLIP_TEXT_CONFIG

# runwayml/stable-diffusion-v1-5's scheduler_config.json: its PNDM scheduler, whose betas every SD v1 sampler shares.
SD_V1_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
)
SD_V1_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@torch.no_grad()
def randomise_constant_parameters(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Add noise to parameters that start as one repeated value (norm weights of ones), so that a converter that
    swapped two of them would change the outputs; the tiny-model fixture already randomised the zero ones."""
    for name, parameter in model.named_parameters():
        constant = parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all())
        if constant and not name.startswith("embedding_manager."):
            parameter.add_(torch.randn_like(parameter) * std)
    return model


def original_state_dict(model: torch.nn.Module) -> dict:
    """The tensors an SD v1 release file holds: everything but the textual-inversion vectors."""
    return {key: value for key, value in model.state_dict().items() if not key.startswith("embedding_manager.")}


def write_original_checkpoint(state: dict, path) -> str:
    """`.safetensors` as a flat dict, anything else as a Lightning-style `{"state_dict": ...}` pickle."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def write_diffusers_config_folder(yaml_path: str, folder, state: dict) -> str:
    """The configs-only folder `from_single_file(config=...)` needs offline, derived from our YAML.

    UNet and VAE configs come from diffusers' own YAML readers (the checkpoint is only inspected for key names);
    the text encoder is SD v1's CLIP config with the YAML's overrides, and the tokenizer is ours, saved.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig

    from ldm.modules.encoders.tokenizers import clip_tokenizer

    folder = os.fspath(folder)
    with open(yaml_path) as handle:
        original = yaml.safe_load(handle)
    params = original["model"]["params"]
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    unet_config["sample_size"] = params["image_size"]  # diffusers assumes 512-pixel SD v1 when not told
    vae_config = create_vae_diffusers_config_from_ldm(original, state)
    vae_config["sample_size"] = params["first_stage_config"]["params"]["ddconfig"]["resolution"]
    with torch.device("meta"):
        UNet2DConditionModel(**unet_config).save_config(os.path.join(folder, "unet"))
        AutoencoderKL(**vae_config).save_config(os.path.join(folder, "vae"))
    text_overrides = params["cond_stage_config"]["params"].get("text_config") or {}
    text_config = CLIPTextConfig(**{**SD_V1_CLIP_TEXT_CONFIG, **text_overrides})
    text_config.save_pretrained(os.path.join(folder, "text_encoder"))
    PNDMScheduler(**SD_V1_SCHEDULER_CONFIG).save_config(os.path.join(folder, "scheduler"))
    clip_tokenizer().save_pretrained(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(SD_V1_MODEL_INDEX, handle)
    return folder


def load_converted_pipeline(checkpoint_path, config_folder: str, yaml_path: str | None = None):
    """diffusers' whole-file conversion of an original-format checkpoint, without hub access.

    With `yaml_path` diffusers derives the UNet and VAE configs from our YAML itself; without, it reads the folder's.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        os.fspath(checkpoint_path),
        config=config_folder,
        original_config=None if yaml_path is None else os.fspath(yaml_path),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _refuse_network(*args, **kwargs):
    raise OSError("a test that must run offline tried to use the network")


@contextlib.contextmanager
def offline_hub():
    """HF_HUB_OFFLINE=1 and no sockets, so any attempt to reach the hub fails loudly.

    huggingface_hub reads HF_HUB_OFFLINE once at import, which an earlier test may already have done, so its
    constant is set as well as the variable.
    """
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(socket, "getaddrinfo", _refuse_network)
        patch.setattr(socket.socket, "connect", _refuse_network)
        yield
