"""A procedural image world for training and evaluating a small text-to-image model without downloading anything.

Each scene is one to three identical objects (shape, colour, texture) on a plain background, with a caption such as
"two striped green squares on a white background". Every image and caption is a pure function of a seed, and every
attribute can be read back exactly, so a classifier trained on this world can score generated images.

Some concepts are held out of pretraining so that textual inversion has something new to learn: a shape that is
never drawn (so its name is never seen) and a composition of familiar attributes that is never shown together.
`python -m ldm.data.procedural` writes their example images to examples/held_out/<concept>/.
"""
import argparse
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (140, 50, 190),
    "pink": (255, 110, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "heart")
OBJECT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
BACKGROUNDS = ("white", "black", "gray", "blue", "green", "yellow")
TEXTURES = ("plain", "striped", "dotted")
COUNT_WORDS = ("one", "two", "three")

LABEL_NAMES = {
    "shape": SHAPES,
    "color": OBJECT_COLORS,
    "background": BACKGROUNDS,
    "count": COUNT_WORDS,
    "texture": TEXTURES,
}

OMITTABLE = ("texture", "color", "background")
"""Attributes a caption may leave unsaid; the shape and the count are always said."""
SPLITS = ("train", "val")
SUPERSAMPLE = 4
EDGE_MARGIN = 0.04
MIN_GAP = 0.08
PLACEMENT_TRIES = 64
SIZE_RANGE = {1: (0.40, 0.56), 2: (0.30, 0.40), 3: (0.26, 0.32)}


@dataclass(frozen=True)
class HeldOutConcept:
    """A concept kept out of pretraining: every scene whose attributes match all the fields that are set.

    Setting only `shape` removes that shape from pretraining altogether (its name is never captioned); setting
    several fields removes just that combination, so each part stays familiar on its own.
    """

    name: str
    shape: str
    color: str | None = None
    texture: str | None = None

    def matches(self, shape: str, color: str, texture: str) -> bool:
        return shape == self.shape and self.color in (None, color) and self.texture in (None, texture)


HELD_OUT_CONCEPTS = {
    concept.name: concept
    for concept in (
        HeldOutConcept("heart", shape="heart"),
        HeldOutConcept("striped_yellow_cross", shape="cross", color="yellow", texture="striped"),
    )
}


def _star_outline(outer: float, inner: float) -> list:
    points = []
    for k in range(10):
        angle = -math.pi / 2 + k * math.pi / 5
        radius = outer if k % 2 == 0 else inner
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _heart_outline(steps: int = 48) -> list:
    """The classic parametric heart, scaled to the unit box and centred on its bounding box."""
    points = []
    for k in range(steps):
        t = 2 * math.pi * k / steps
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x, y))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [((x - cx) / half, (y - cy) / half) for x, y in points]


ARM = 0.34
OUTLINES = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star_outline(1.0, 0.45),
    "cross": [(-ARM, -1), (ARM, -1), (ARM, -ARM), (1, -ARM), (1, ARM), (ARM, ARM),
              (ARM, 1), (-ARM, 1), (-ARM, ARM), (-1, ARM), (-1, -ARM), (-ARM, -ARM)],
    "diamond": [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)],
    "heart": _heart_outline(),
}
"""Polygons inside the square [-1, 1]^2 (units of half the object's size), y pointing down; the circle is drawn as
an ellipse. Every shape stays inside that square, which is what placement keeps apart."""


def _pluralize(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def texture_color(color: str) -> tuple:
    """The second colour of a striped or dotted object: the object colour half-way to black, the same on every
    background so that a texture always looks the same (it stays clear of every background colour)."""
    return tuple(round(channel / 2) for channel in COLORS[color])


@functools.cache
def texture_mask(texture: str, size: int) -> np.ndarray:
    """(size, size) bool: where the second colour goes. The period is size / 8 so a 64 px image, downscaled to
    32 px, shows the same pattern as one rendered at 32 px."""
    period = max(4, size // 8)
    y, x = np.mgrid[0:size, 0:size]
    if texture == "plain":
        mask = np.zeros((size, size), dtype=bool)
    elif texture == "striped":
        mask = (x + y) % period < period // 2
    elif texture == "dotted":
        mask = (x % period < period // 2) & (y % period < period // 2)
    else:
        raise ValueError(f"texture '{texture}' is unknown; use one of {', '.join(TEXTURES)}")
    mask.flags.writeable = False
    return mask


@dataclass(frozen=True)
class Scene:
    """One image of the world. `positions` are object centres and `object_size` the side of the square each object
    fills, both as fractions of the image side, so one scene renders the same at any resolution."""

    shape: str
    color: str
    background: str
    count: int
    texture: str
    positions: tuple
    object_size: float

    def __post_init__(self):
        for name, value in (("shape", self.shape), ("color", self.color), ("background", self.background),
                            ("texture", self.texture)):
            if value not in LABEL_NAMES[name]:
                raise ValueError(f"{name} '{value}' is unknown; use one of {', '.join(LABEL_NAMES[name])}")
        if not 1 <= self.count <= len(COUNT_WORDS) or len(self.positions) != self.count:
            raise ValueError(f"count {self.count} needs 1 to {len(COUNT_WORDS)} objects and one position per object")

    def caption(self, omit=()) -> str:
        """The scene in words. Attributes named in `omit` ("texture", "color", "background") are left unsaid, as
        people leave them unsaid; the shape and the count are always said."""
        unknown = set(omit) - set(OMITTABLE)
        if unknown:
            raise ValueError(f"cannot omit {', '.join(sorted(unknown))}; only {', '.join(OMITTABLE)}")
        words = [] if self.texture == "plain" or "texture" in omit else [self.texture]
        words += [] if "color" in omit else [self.color]
        place = "" if "background" in omit else f" on a {self.background} background"
        if self.count == 1:
            noun = " ".join(words + [self.shape])
            article = "an" if noun[0] in "aeiou" else "a"
            return f"{article} {noun}{place}"
        return f"{COUNT_WORDS[self.count - 1]} {' '.join(words + [_pluralize(self.shape)])}{place}"

    def labels(self) -> dict:
        """Each attribute as its index into `LABEL_NAMES`, the classifier's targets."""
        values = {"shape": self.shape, "color": self.color, "background": self.background,
                  "count": COUNT_WORDS[self.count - 1], "texture": self.texture}
        return {name: LABEL_NAMES[name].index(value) for name, value in values.items()}

    def coverage(self, size: int) -> np.ndarray:
        """(size, size) float32 in [0, 1]: how much of each pixel the objects cover, antialiased by drawing at
        SUPERSAMPLE times the size and box-filtering down."""
        big = size * SUPERSAMPLE
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        radius = self.object_size * big / 2
        for cx, cy in self.positions:
            x, y = cx * big, cy * big
            if self.shape == "circle":
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
            else:
                draw.polygon([(x + u * radius, y + v * radius) for u, v in OUTLINES[self.shape]], fill=255)
        small = canvas.resize((size, size), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32) / 255

    def render(self, size: int = 32) -> np.ndarray:
        """(size, size, 3) uint8 RGB."""
        alpha = self.coverage(size)[..., None]
        pattern = texture_mask(self.texture, size)[..., None]
        foreground = np.where(pattern, texture_color(self.color), COLORS[self.color])
        background = np.array(COLORS[self.background], dtype=np.float32)
        return np.round(background * (1 - alpha) + foreground * alpha).astype(np.uint8)


def place_objects(rng: np.random.Generator, count: int, object_size: float):
    """Centres for `count` objects, each filling a square of side `object_size`, with the squares inside the image
    and apart from each other, uniform over such layouts (whole layouts are drawn and rejected together). If no
    draw fits, the objects shrink a little, so crowded scenes still come out separated.
    Returns (positions, object_size)."""
    while True:
        low, high = object_size / 2 + EDGE_MARGIN, 1 - object_size / 2 - EDGE_MARGIN
        layouts = rng.uniform(low, high, size=(PLACEMENT_TRIES, count, 2))
        separation = np.abs(layouts[:, :, None] - layouts[:, None, :]).max(axis=-1)
        separation[:, np.arange(count), np.arange(count)] = np.inf
        fits = np.flatnonzero(separation.min(axis=(1, 2)) >= object_size + MIN_GAP)
        if fits.size:
            return tuple((float(x), float(y)) for x, y in layouts[fits[0]]), object_size
        object_size *= 0.9


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def held_out_concept(name: str) -> HeldOutConcept:
    if name not in HELD_OUT_CONCEPTS:
        raise ValueError(f"concept '{name}' is not held out; use one of {', '.join(HELD_OUT_CONCEPTS)}")
    return HELD_OUT_CONCEPTS[name]


def make_scene(rng: np.random.Generator, shape: str, color: str, background: str, count: int, texture: str) -> Scene:
    """A scene with the given attributes and random, non-overlapping positions."""
    positions, object_size = place_objects(rng, count, rng.uniform(*SIZE_RANGE[count]))
    return Scene(shape, color, background, count, texture, positions, object_size)


def sample_scene(rng: np.random.Generator, held_out: bool = True) -> Scene:
    """A scene drawn uniformly over all attribute combinations whose object and background colours differ;
    with `held_out`, uniformly over those that match no held-out concept (the pretraining distribution)."""
    while True:
        shape, color = _choice(rng, SHAPES), _choice(rng, OBJECT_COLORS)
        background, texture = _choice(rng, BACKGROUNDS), _choice(rng, TEXTURES)
        count = int(rng.integers(1, len(COUNT_WORDS) + 1))
        if background == color:
            continue
        if held_out and any(concept.matches(shape, color, texture) for concept in HELD_OUT_CONCEPTS.values()):
            continue
        return make_scene(rng, shape, color, background, count, texture)


def sample_concept_scene(rng: np.random.Generator, concept: HeldOutConcept) -> Scene:
    """One object of a held-out concept; the attributes the concept leaves open are drawn (texture stays plain)."""
    color = concept.color or _choice(rng, OBJECT_COLORS)
    background = _choice(rng, [name for name in BACKGROUNDS if name != color])
    return make_scene(rng, concept.shape, color, background, 1, concept.texture or "plain")


def write_concept_examples(concept, folder, count: int = 5, size: int = 64, seed: int = 0) -> list:
    """Write `count` PNG examples of a held-out concept (an instance or its name) to `folder`; returns the paths.

    The examples are the few images textual inversion learns the concept from."""
    concept = held_out_concept(concept) if isinstance(concept, str) else concept
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, *concept.name.encode()])
    paths = []
    for i in range(count):
        path = folder / f"{i:02d}.png"
        Image.fromarray(sample_concept_scene(rng, concept).render(size)).save(path)
        paths.append(path)
    return paths


class ProceduralCaptions(Dataset):
    """Captioned scenes for pretraining a text-to-image model. Item i is a pure function of (seed, split, i), so
    any number of workers in any order sees the same data; each split draws from its own random stream.

    With `omit_p` > 0 each of texture, colour and background is left out of the caption with that probability,
    so that the model also follows short prompts ("a red star", "two crosses on a blue background"), which the
    inversion's templates and edit prompts are.
    """

    def __init__(self, size: int = 32, length: int = 100_000, seed: int = 0, held_out: bool = True,
                 split: str = "train", omit_p: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split '{split}' is unknown; use 'train' or 'val'")
        if not 0.0 <= omit_p <= 1.0:
            raise ValueError(f"omit_p must be between 0 and 1, got {omit_p}")
        self.size = size
        self.length = length
        self.seed = seed
        self.held_out = held_out
        self.split_index = SPLITS.index(split)
        self.omit_p = omit_p

    def __len__(self):
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        return np.random.default_rng([self.seed, self.split_index, i])

    def scene(self, i: int) -> Scene:
        return sample_scene(self._rng(i), self.held_out)

    def __getitem__(self, i):
        rng = self._rng(i)
        scene = sample_scene(rng, self.held_out)
        omit = [name for name, drop in zip(OMITTABLE, rng.random(len(OMITTABLE)) < self.omit_p) if drop]
        return {
            "image": scene.render(self.size),
            "caption": scene.caption(omit),
            "labels": scene.labels(),
        }


def main():
    parser = argparse.ArgumentParser(description="Write the example images of every held-out concept.")
    parser.add_argument("--out", default="examples/held_out", help="one subfolder per concept is written here")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in HELD_OUT_CONCEPTS:
        for path in write_concept_examples(name, Path(args.out) / name, args.count, args.size, args.seed):
            print(path)


if __name__ == "__main__":
    main()
