"""An exact judge for images of the procedural world: a small CNN that reads back every scene attribute.

Trained on freshly rendered scenes of the whole world, held-out concepts included, it can say whether an image
generated for "a photo of *" shows the held-out shape or composition (fidelity), and whether the colour, background
or count a prompt asked for is there (editability), without any downloaded model.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.data.procedural import LABEL_NAMES, sample_scene
from ldm.images import channels_first
from ldm.paths import GIT_LFS_FIX, is_git_lfs_pointer, require_file

TRAINED_BY = "scripts/train_world_classifier.py"


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), antialiased; the one resize both training and prediction use."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class WorldClassifier(nn.Module):
    """A three-stage convolutional trunk and one linear head per attribute. The trunk ends on a 4 x 4 grid (average
    pooled to it when the classifier reads images larger than 32 px) that is flattened rather than pooled away, so
    the heads still know where things are and can count them."""

    def __init__(self, label_names: dict = LABEL_NAMES, size: int = 32, width: int = 16, hidden: int = 96):
        super().__init__()
        if size < 32 or size % 8:
            raise ValueError(f"classifier size {size} must be a multiple of 8 and at least 32 (the trunk halves it three times)")
        self.label_names = {name: tuple(labels) for name, labels in label_names.items()}
        self.size = size
        self.width = width
        self.hidden = hidden
        self.trunk = nn.Sequential(
            conv_block(3, width), nn.MaxPool2d(2),
            conv_block(width, 2 * width), nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * width * 16, hidden), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(labels)) for name, labels in self.label_names.items()})

    def forward(self, images: torch.Tensor) -> dict:
        """(B, 3, size, size) in [-1, 1] -> {attribute: (B, classes) logits}. Inputs are made contiguous: a
        channels-last batch (what a permuted HWC array gives) runs several times slower on the CPU."""
        features = self.trunk(images.contiguous())
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) in [-1, 1], any square size (resized to the training size) -> {attribute: [label, ...]}."""
        parameter = next(self.parameters())
        images = resize_square(images.to(device=parameter.device, dtype=parameter.dtype), self.size)
        was_training = self.training
        self.eval()
        logits = self(images)
        self.train(was_training)
        return {name: [self.label_names[name][i] for i in out.argmax(dim=1).tolist()] for name, out in logits.items()}


def render_batch(rng: np.random.Generator, count: int, size: int, render_size: int | None = None):
    """`count` fresh scenes of the whole world (held-out concepts included) rendered at `render_size` (default
    `size`) and resized to `size`: (B, 3, size, size) float in [-1, 1] and {attribute: (B,) long labels}."""
    scenes = [sample_scene(rng, held_out=False) for _ in range(count)]
    images = channels_first(torch.from_numpy(np.stack([scene.render(render_size or size) for scene in scenes])))
    scene_labels = [scene.labels() for scene in scenes]
    labels = {name: torch.tensor([each[name] for each in scene_labels]) for name in LABEL_NAMES}
    return resize_square(images, size), labels


def mixed_resolution_batch(rng: np.random.Generator, count: int, size: int):
    """Half the scenes rendered at `size`, half at twice that and resized down, so the judge reads generated images
    of either resolution (fine stripes and dots blur when a larger image is shrunk)."""
    native, native_labels = render_batch(rng, count // 2, size)
    shrunk, shrunk_labels = render_batch(rng, count - count // 2, size, render_size=2 * size)
    labels = {name: torch.cat([native_labels[name], shrunk_labels[name]]) for name in native_labels}
    return torch.cat([native, shrunk]), labels


def train_classifier(size: int = 32, steps: int = 600, seed: int = 0, batch_size: int = 128, lr: float = 3e-3,
                     noise: float = 0.08, log=None) -> WorldClassifier:
    """Train on `steps` batches of never-repeated scenes of the whole world (held-out concepts included), half of
    each batch rendered at twice the size and shrunk.

    Gaussian noise of a random strength up to `noise` is added to the inputs so that the judge tolerates the
    grain of generated images. `log(step, losses)` is called after every step with each head's loss.
    The global torch RNG is left as it was; the run is a function of `seed` alone.
    """
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WorldClassifier(size=size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
        model.train()
        for step in range(steps):
            images, labels = mixed_resolution_batch(rng, batch_size, size)
            images = images + torch.randn_like(images) * torch.rand(batch_size, 1, 1, 1) * noise
            logits = model(images)
            losses = {name: F.cross_entropy(logits[name], labels[name]) for name in logits}
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            schedule.step()
            if log is not None:
                log(step, {name: loss.item() for name, loss in losses.items()})
    return model.eval()


def evaluate_accuracy(model: WorldClassifier, count: int = 500, seed: int = 1, size: int | None = None,
                      batch_size: int = 250) -> dict:
    """Per-attribute accuracy on `count` fresh scenes rendered at `size` (the model's size by default)."""
    rng = np.random.default_rng(seed)
    correct = {name: 0 for name in model.label_names}
    for start in range(0, count, batch_size):
        images, labels = render_batch(rng, min(batch_size, count - start), size or model.size)
        predicted = model.predict(images)
        for name, names in predicted.items():
            truth = [model.label_names[name][i] for i in labels[name].tolist()]
            correct[name] += sum(p == t for p, t in zip(names, truth))
    return {name: hits / count for name, hits in correct.items()}


def label_file(weights_path) -> Path:
    """The JSON beside the weights that names the labels and the architecture."""
    return Path(weights_path).with_suffix(".json")


def save_classifier(model: WorldClassifier, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}, str(path))
    description = {"size": model.size, "width": model.width, "hidden": model.hidden,
                   "labels": {name: list(labels) for name, labels in model.label_names.items()}}
    label_file(path).write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")


def load_classifier(path, device="cpu") -> WorldClassifier:
    """A classifier saved by `save_classifier` (scripts/train_world_classifier.py), in eval mode, on `device`."""
    path = Path(require_file(path, "classifier weights", f"train them with {TRAINED_BY}"))
    labels_path = label_file(path)
    if path == labels_path:
        raise ValueError(f"'{path}' is the classifier's label file: pass its weights, "
                         f"'{path.with_suffix('.safetensors')}'")
    if not labels_path.is_file():
        raise FileNotFoundError(f"label file '{labels_path}' not found beside '{path}'; {TRAINED_BY} writes both")
    if is_git_lfs_pointer(path):
        raise ValueError(f"classifier weights '{path}' are {GIT_LFS_FIX}")
    try:
        description = json.loads(labels_path.read_text(encoding="utf-8"))
        model = WorldClassifier(description["labels"], description["size"], description["width"],
                                description["hidden"])
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(f"classifier '{path}' with labels '{labels_path}' cannot be loaded ({reason}): pass the "
                         f".safetensors weights {TRAINED_BY} writes") from None
    return model.to(device).eval()
