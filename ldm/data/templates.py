"""Caption templates for textual-inversion datasets.

The object and style lists are the ones the original code trained with (the object list keeps its repeats,
which weight the sampling). The template-file reader follows AUTOMATIC1111's format, so its template files
(`[name]` = the placeholder, `[filewords]` = the image's caption) can be reused as they are.
"""
import re
from pathlib import Path

_photo_templates = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

imagenet_templates_small = _photo_templates + [
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
]

# Filled as .format(placeholder, per_image_token): the concept, then what sets this image apart.
imagenet_dual_templates_small = [template + " with {}" for template in _photo_templates]

imagenet_style_templates_small = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

# Filled as .format(placeholder, per_image_token) like the object list. The original's "a painting of one {}
# in the style of {}" put the style placeholder in the object slot; explicit field numbers keep the style
# placeholder after "in the style of" in every entry.
imagenet_dual_style_templates_small = [
    "a painting in the style of {} with {}",
    "a rendering in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "the painting in the style of {} with {}",
    "a clean painting in the style of {} with {}",
    "a dirty painting in the style of {} with {}",
    "a dark painting in the style of {} with {}",
    "a cool painting in the style of {} with {}",
    "a close-up painting in the style of {} with {}",
    "a bright painting in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "a good painting in the style of {} with {}",
    "a painting of one {1} in the style of {0}",
    "a nice painting in the style of {} with {}",
    "a small painting in the style of {} with {}",
    "a weird painting in the style of {} with {}",
    "a large painting in the style of {} with {}",
]

# One extra pseudo-word per training image (the 22 Hebrew letters): rare single tokens in BERT's tokenizer (CLIP's
# splits each in two, so per-image tokens work with LDM only).
per_img_token_list = [
    "א", "ב", "ג", "ד", "ה", "ו", "ז", "ח", "ט", "י", "כ",
    "ל", "מ", "נ", "ס", "ע", "פ", "צ", "ק", "ר", "ש", "ת",
]


def read_template_file(path) -> list:
    """The non-blank lines of an AUTOMATIC1111-style template file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"template file '{path}' does not exist; pass a text file with one caption template per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"template file '{path}' has no templates; write one per line, e.g. 'a photo of [name], [filewords]'")
    if not any("[name]" in line for line in lines):
        slot = "[name] (not the built-in lists' '{}')" if any("{}" in line for line in lines) else "[name]"
        raise ValueError(f"template file '{path}' has no line with [name], the placeholder's slot, so no caption would "
                         f"name the learned word; write {slot} where it goes, e.g. 'a photo of [name], [filewords]'")
    return lines


def fill_template_line(line: str, name: str, filewords: str) -> str:
    """Replace `[name]` by the placeholder and `[filewords]` by the image's caption.

    `[name]` goes first so a caption that happens to contain "[name]" is kept literally.
    """
    return line.replace("[name]", name).replace("[filewords]", filewords)


# What a template leaves for the caption-specific text: the built-in lists' `{}` / `{0}` and a file's `[name]` /
# `[filewords]`.
_SLOTS = re.compile(r"\{\d*\}|\[name\]|\[filewords\]")


def template_holding(placeholder: str, templates) -> str | None:
    """The first of `templates` that already holds `placeholder` outside its slots, else None.

    The text encoder swaps every occurrence of the placeholder's token for the learned vectors, so a placeholder
    such as "a" or "photo" would turn that word of every caption into the concept. Both tokenizers lowercase and
    split letters and digits from punctuation: a placeholder with letters or digits is matched as a whole word,
    one made of punctuation anywhere (the EmbeddingManager spaces it out of a run of punctuation).
    """
    if any(c.isalnum() for c in placeholder):
        pattern = re.compile(rf"(?<![^\W_]){re.escape(placeholder)}(?![^\W_])", re.IGNORECASE)
    else:
        pattern = re.compile(re.escape(placeholder))
    return next((t for t in templates if pattern.search(_SLOTS.sub(" ", t))), None)
