"""The text encoders whose files users bring, told apart by the width of their token vectors.

Embedding files and checkpoints name no model, only tensor shapes, so every "which model is this for?" guess and
message starts from this one table.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoderFamily:
    name: str
    model_family: str | None  # what embedding files record as "model_family"; None where this project cannot train
    configs: str | None  # where this project's configs for it are


FAMILIES_BY_WIDTH = {
    768: TextEncoderFamily("SD v1 CLIP ViT-L/14", "sd-v1", "configs/stable-diffusion/"),
    1024: TextEncoderFamily("SD 2.x OpenCLIP ViT-H", None, None),
    1280: TextEncoderFamily("LDM-BERT", "ldm", "configs/latent-diffusion/txt2img-1p4B-*.yaml"),
}
# This project's own small models (random-weight test models, the shipped toy model), which no embedding file
# from elsewhere is for: named only in the message that a config does not fit a checkpoint.
SMALL_CONFIGS_BY_WIDTH = {32: "configs/tiny/ (sd-tiny-*.yaml or ldm-tiny-*.yaml)", 128: "configs/toy/"}
SD_V1_WIDTH = 768
MODEL_FAMILIES = ("sd-v1", "ldm")  # those with a stock tokenizer here (`family_tokenizer`)


def width_label(width: int) -> str:
    """'768-wide (SD v1 CLIP ViT-L/14)', so a width mismatch says which model each side was made for."""
    family = FAMILIES_BY_WIDTH.get(width)
    return f"{width}-wide ({family.name})" if family else f"{width}-wide"


def model_family_of_width(width: int) -> str | None:
    """"sd-v1" or "ldm" when the width alone says which model a file is for, else None."""
    family = FAMILIES_BY_WIDTH.get(width)
    return family.model_family if family else None


def model_family(width: int, named: str | None, width_decides: bool = True) -> str | None:
    """"sd-v1" or "ldm": the model, and so the stock tokenizer, that embeddings this wide are for; None if unknown.

    `named` is the family a file records or a tokenizer belongs to; it counts where the width names the same family
    or none (tiny test models, SD 2.x's 1024). Where the width names another, a file's record is the stale one, so
    the width decides; a live tokenizer (`width_decides=False`) is not, so no stock model fits and the answer is None.
    """
    by_width = model_family_of_width(width)
    if by_width not in (None, named):
        return by_width if width_decides else None
    return named if named in MODEL_FAMILIES else by_width


def configs_for_width(width: int) -> str:
    """Where the configs for a model of this width are, for the message that a config does not fit a checkpoint."""
    family = FAMILIES_BY_WIDTH.get(width)
    if family and family.configs:
        return family.configs
    return SMALL_CONFIGS_BY_WIDTH.get(width, "the matching model family")
