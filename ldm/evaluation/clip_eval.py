"""The Textual Inversion paper's two CLIP scores: how much generated images look like the training images
(image similarity, reconstruction) and how well they follow the prompt (text similarity, editability).

As in the paper's code, images in [-1, 1] go to CLIP without a PIL round trip: to [0, 1], bicubic resize of the short
side to CLIP's input size, centre crop, CLIP's normalisation. The resize antialiases, as CLIP's own PIL
preprocessing does (the paper's torchvision of 2022 did not antialias tensors; at 256 -> 224 px the two agree
closely). Weights come only from a local file: OpenAI's TorchScript `ViT-B-32.pt` (the paper's model; its
architecture is read from the file) or an open_clip state dict (`.bin`, `.pt`, `.safetensors`) of the architecture
named by `model_name`. OpenAI's weights as an open_clip state dict need QuickGELU: name `ViT-B-32-quickgelu`.
"""
import os
import pickle
import struct
import zipfile

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.factory import load_state_dict
from safetensors import SafetensorError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ldm.embeddings import replace_learned_words
from ldm.paths import GIT_LFS_FIX, is_git_lfs_pointer, require_file


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of (N, D) `a` and (M, D) `b`: the mean of the N x M matrix."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean().item()


def remove_placeholders(prompt: str, placeholders) -> str:
    """The prompt the text score compares with: every placeholder removed where generation reads it (so "sks"
    leaves "asks" alone, and "*" goes wherever it occurs, as in the paper's code), whitespace collapsed."""
    return " ".join(replace_learned_words(prompt, dict.fromkeys(placeholders, " ")).split())


def is_torchscript_archive(path: str) -> bool:
    """OpenAI's CLIP files are TorchScript archives: a zip that carries the model's code beside its tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def is_transformers_clip(path: str) -> bool:
    """Hugging Face transformers' CLIP files name their tensors text_model.* and vision_model.*, a layout open_clip
    cannot load; asked only after a load failed, so a file that cannot be read at all is not one."""
    try:
        keys = load_state_dict(path)
    except RuntimeError:
        return False
    return any(key.startswith("text_model.") for key in keys) and any(key.startswith("vision_model.") for key in keys)


def load_clip(weights_path: str, model_name: str = "ViT-B-32", device="cpu"):
    """(model, tokenizer) from a local weights file; never downloads, so a model that needs the hub is refused."""
    require_file(weights_path, "--clip_weights", "pass a local CLIP ViT-B/32 checkpoint")
    if is_git_lfs_pointer(weights_path):
        raise ValueError(f"--clip_weights '{weights_path}' is {GIT_LFS_FIX}")
    if model_name not in open_clip.list_models():
        raise ValueError(f"--clip_model '{model_name}' is not an open_clip architecture; e.g. ViT-B-32")
    text_config = open_clip.get_model_config(model_name).get("text_cfg", {})
    if text_config.get("hf_model_name") or text_config.get("hf_tokenizer_name"):
        raise ValueError(f"--clip_model '{model_name}' needs a Hugging Face text model or tokenizer download; "
                         "use a CLIP model with open_clip's own tokenizer such as ViT-B-32")
    if is_torchscript_archive(weights_path):
        model = open_clip.load_openai_model(weights_path, precision="fp32", device="cpu")
    else:
        try:
            model = open_clip.create_model(model_name, pretrained=os.path.abspath(weights_path),
                                           require_pretrained=True)
        except (pickle.UnpicklingError, EOFError, IndexError, KeyError, struct.error, SafetensorError) as error:
            reason = str(error).rpartition("WeightsUnpickler error:")[2].strip().split("\n")[0]
            raise ValueError(f"--clip_weights '{weights_path}' cannot be read ({type(error).__name__}: {reason}): "
                             "pass OpenAI's ViT-B-32.pt or an open_clip state dict (.bin, .pt, .safetensors)"
                             ) from error
        except (RuntimeError, ValueError, AssertionError) as error:  # open_clip asserts on another text width
            if is_transformers_clip(weights_path):
                raise ValueError(f"--clip_weights '{weights_path}' is a Hugging Face transformers CLIP file "
                                 "(text_model.* and vision_model.* tensors), which open_clip cannot load: pass "
                                 "OpenAI's ViT-B-32.pt or an open_clip state dict of --clip_model") from error
            reason = " ".join(str(error).split())  # load_state_dict's first line only says "Error(s) in ...:"
            reason = reason if len(reason) <= 200 else reason[:200] + "..."
            reason = reason or type(error).__name__
            raise ValueError(f"--clip_weights '{weights_path}' are not {model_name} weights ({reason}); "
                             "pass the matching --clip_model") from error
    tokenizer = open_clip.get_tokenizer(model_name, context_length=model.context_length)
    return model.to(device).eval(), tokenizer


class CLIPEvaluator:
    """CLIP features of images in [-1, 1] and of texts, and the paper's image and text similarities on them."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        settings = open_clip.get_model_preprocess_cfg(model)
        size = settings["size"]
        self.image_size = size if isinstance(size, int) else min(size)
        mean = torch.tensor(settings.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float32)
        std = torch.tensor(settings.get("std", OPENAI_DATASET_STD), dtype=torch.float32)
        self.mean, self.std = mean.view(3, 1, 1).to(self.device), std.view(3, 1, 1).to(self.device)

    def preprocess(self, images) -> torch.Tensor:
        """A (B, 3, H, W) tensor, or (3, H, W) images of any sizes, in [-1, 1] to CLIP's (B, 3, S, S) input."""
        inputs = []
        for image in images:
            pixels = (image.to(self.device, torch.float32) + 1.0) / 2.0
            pixels = TF.resize(pixels, self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
            inputs.append((TF.center_crop(pixels, self.image_size) - self.mean) / self.std)
        return torch.stack(inputs)

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """L2-normalised (B, D) features of images in [-1, 1] (a batch tensor or a list of (3, H, W) tensors)."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        """L2-normalised (B, D) features of a text or a list of texts."""
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def img_to_img_similarity(self, src_images, generated_images) -> float:
        """Mean cosine over every (training image, generated image) pair."""
        return mean_pairwise_cosine(self.image_features(src_images), self.image_features(generated_images))

    def txt_to_img_similarity(self, text: str, generated_images) -> float:
        """Mean cosine between the text and each generated image."""
        return mean_pairwise_cosine(self.text_features(text), self.image_features(generated_images))
