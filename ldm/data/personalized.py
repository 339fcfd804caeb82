"""Textual-inversion training data: a handful of images of one concept, each paired with a random caption
that contains the placeholder word being learned."""
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.templates import (
    fill_template_line,
    imagenet_dual_templates_small,
    imagenet_templates_small,
    per_img_token_list,
    read_template_file,
    template_holding,
)

__all__ = ["PersonalizedBase", "per_img_token_list"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

SPLITS = ("train", "val")


def list_images(data_root, name: str = "data_root", content: str = "3-5 images of your concept") -> list:
    """Image files directly inside `data_root`, sorted by name so runs see the same order on every system.

    Hidden files (`.DS_Store`, `._x.jpg` from macOS), caption `.txt` files and subfolders are not images.
    Errors call the folder `name` (the config key or flag it came from) and say it should hold `content`.
    """
    root = Path(data_root)
    if not root.exists():
        raise FileNotFoundError(f"{name} '{root}' does not exist; point {name} at a folder of {content}")
    if not root.is_dir():
        raise ValueError(f"{name} '{root}' is not a folder; point {name} at a folder of {content}")
    paths = sorted(
        path for path in root.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise ValueError(f"{name} '{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); point {name} at a folder "
                         f"of {content}")
    return paths


def load_upright_rgb(path) -> Image.Image:
    """Decode an image as the camera meant it: EXIF rotation applied, transparency composited on white.

    Phone photos are stored sideways with an orientation tag, and a transparent background converted
    naively keeps whatever colour the hidden pixels had; both would teach the embedding the wrong thing.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit grey: Pillow clips it to 8 bits
                grey = (np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255)
                image = Image.fromarray(grey.astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            return image.convert("RGB")
    except Image.DecompressionBombError:  # not an OSError: Pillow refuses to decode it at all
        raise ValueError(f"image '{path}' has more pixels than Pillow decodes safely ({2 * Image.MAX_IMAGE_PIXELS}); "
                         "resize it (training uses a few hundred pixels a side) or remove it") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image '{path}' ({error}); re-save it as PNG or JPEG, or remove it") from error


def is_count(value) -> bool:
    """A whole number of at least 1 (not a bool, a float or a string that YAML left as text)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_probability(value) -> bool:
    """A number from 0 to 1 (not a bool or a string that YAML left as text)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def square_pixels(image: Image.Image, size, center_crop: bool, resample) -> np.ndarray:
    """(size, size, 3) uint8 pixels; the central square is cut first unless `center_crop` is False (squash)."""
    if center_crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if size is not None:
        image = image.resize((size, size), resample=resample)
    return np.asarray(image, dtype=np.uint8)


def caption_from_filename(path) -> str:
    """`01-red_mug-front.jpg` -> "red mug front": the stem without leading numbering, separators as spaces."""
    stem = re.sub(r"^[\d_-]+", "", Path(path).stem)
    return " ".join(re.sub(r"[_-]", " ", stem).split())


def read_image_caption(path, use_caption_files: bool) -> str:
    """The text of the `.txt` file beside the image (same stem), else the filename caption."""
    caption_file = Path(path).with_suffix(".txt")
    if use_caption_files and caption_file.is_file():
        try:
            return caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise ValueError(f"caption file '{caption_file}' is not UTF-8 text ({error.reason} at byte "
                             f"{error.start}): re-save it as UTF-8") from error
    return caption_from_filename(path)


class PersonalizedBase(Dataset):
    """Images of one object, each returned with a caption that names it by the placeholder.

    Captions come from the built-in templates ("a photo of a {}"), or, with `template_file`, from a random
    line of that AUTOMATIC1111-style file where `[name]` becomes the placeholder and `[filewords]` the
    image's caption. An image's caption is its `<stem>.txt` beside it (when `captions` is True) or else
    its filename; caption files are used only through `[filewords]`, never appended to built-in templates,
    so the built-in captions stay exactly the original ones.

    `coarse_class_text` prefixes the placeholder ("cat *"). `per_image_tokens` adds, with probability
    `mixing_prob`, a per-image letter through the dual templates; it needs fewer than 22 images.
    `center_crop` (default True, unlike the original) cuts the central square before resizing so
    non-square photos are not squashed; False squashes as the original did.

    Images are decoded, cropped and resized once here (unreadable files fail now, not mid-run); each item
    draws its caption and flip from Python's `random`, which Lightning's `seed_everything` seeds and
    PyTorch re-seeds per DataLoader worker. Items carry `image_index` and `flipped` so a trainer can
    cache latents per image and orientation.
    """

    templates = imagenet_templates_small
    dual_templates = imagenet_dual_templates_small
    accepts_coarse_class = True

    def __init__(self, data_root, size=None, repeats=100, interpolation="bicubic", flip_p=0.5, set="train",
                 placeholder_token="*", per_image_tokens=False, center_crop=True, mixing_prob=0.25,
                 coarse_class_text=None, template_file=None, captions=True):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation '{interpolation}' is unknown; use one of {', '.join(INTERPOLATIONS)}")
        if set not in SPLITS:
            raise ValueError(f"set '{set}' is unknown; use 'train' (repeats the images) or 'val'")
        if coarse_class_text is not None and not self.accepts_coarse_class:
            raise ValueError(f"coarse_class_text is for object datasets; {type(self).__module__} captions a style, remove it")
        if per_image_tokens and template_file is not None:
            raise ValueError("per_image_tokens works with the built-in templates only; drop template_file or per_image_tokens")
        key = f"data.params.{'train' if set == 'train' else 'validation'}.params."
        if size is not None and not is_count(size):
            raise ValueError(f"{key}size {size!r} is not a number of pixels: set it to the model's image size, "
                             "e.g. 512")
        if set == "train" and not is_count(repeats):
            raise ValueError(f"{key}repeats {repeats!r} is not a count of at least 1: set how many times an epoch "
                             "shows each image, e.g. 100")
        for name, value in (("flip_p", flip_p), ("mixing_prob", mixing_prob)):
            if not is_probability(value):
                raise ValueError(f"{key}{name} {value!r} is not a probability: set it between 0 and 1")
        if not placeholder_token:
            raise ValueError("the captions' placeholder is empty: give the new word, e.g. --placeholder_string '*'")

        self.image_paths = [str(path) for path in list_images(data_root)]
        self.num_images = len(self.image_paths)
        if per_image_tokens and self.num_images >= len(per_img_token_list):
            raise ValueError(f"per_image_tokens needs fewer than {len(per_img_token_list)} images, "
                             f"'{data_root}' has {self.num_images}; use fewer images or set per_image_tokens false")

        self.flip_p = flip_p
        self.per_image_tokens = per_image_tokens
        self.mixing_prob = mixing_prob
        self.placeholder_phrase = placeholder_token if coarse_class_text is None else f"{coarse_class_text} {placeholder_token}"
        self.template_lines = read_template_file(template_file) if template_file is not None else None
        self.refuse_template_words([placeholder_token])
        # Image captions are read only through a template file's [filewords].
        self.image_captions = ([read_image_caption(path, captions) for path in self.image_paths]
                               if self.template_lines is not None else None)
        self.pixels = [square_pixels(load_upright_rgb(path), size, center_crop, INTERPOLATIONS[interpolation])
                       for path in self.image_paths]
        self._length = self.num_images * repeats if set == "train" else self.num_images

    def __len__(self):
        return self._length

    def refuse_template_words(self, placeholders):
        """Refuse a placeholder that the caption templates already hold as a word ("a", "photo"): the text encoder
        would read that word of every caption as the learned vectors."""
        templates = self.template_lines
        if templates is None:
            templates = [*self.templates, *(self.dual_templates if self.per_image_tokens else ())]
        for placeholder in placeholders:
            template = template_holding(placeholder, templates)
            if template is not None:
                raise ValueError(f"placeholder '{placeholder}' is already a word of the training captions "
                                 f"(\"{template}\"), so every such word would become the learned vector: use a rare "
                                 "string such as '*' or 'sks' (--placeholder_string)")

    def possible_captions(self) -> list[str]:
        """Every caption `caption` can draw, once each."""
        if self.template_lines is not None:
            captions = [fill_template_line(line, self.placeholder_phrase, filewords)
                        for line in self.template_lines for filewords in self.image_captions]
            return list(dict.fromkeys(captions))
        mixing = self.mixing_prob if self.per_image_tokens else 0
        captions = [template.format(self.placeholder_phrase) for template in self.templates] if mixing < 1 else []
        if mixing > 0:
            captions += [template.format(self.placeholder_phrase, per_img_token_list[index])
                         for template in self.dual_templates for index in range(self.num_images)]
        return list(dict.fromkeys(captions))

    def caption(self, image_index: int) -> str:
        """A freshly drawn caption for one image."""
        if self.template_lines is not None:
            line = random.choice(self.template_lines)
            return fill_template_line(line, self.placeholder_phrase, self.image_captions[image_index])
        if self.per_image_tokens and random.random() < self.mixing_prob:
            return random.choice(self.dual_templates).format(self.placeholder_phrase, per_img_token_list[image_index])
        return random.choice(self.templates).format(self.placeholder_phrase)

    def __getitem__(self, i):
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a dataset of length {self._length}")
        image_index = i % self.num_images
        flipped = random.random() < self.flip_p
        pixels = self.pixels[image_index][:, ::-1] if flipped else self.pixels[image_index]
        return {
            "image": np.array(pixels),  # a contiguous copy: the dataset's own pixels are never handed out
            "caption": self.caption(image_index),
            "image_index": image_index,
            "flipped": flipped,
        }
