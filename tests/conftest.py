"""Shared fixtures: training images drawn by the tests and tiny random-weight checkpoints of our configs."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import write_random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SD = os.path.join(REPO, "configs", "tiny", "sd-tiny-finetune.yaml")
TINY_LDM = os.path.join(REPO, "configs", "tiny", "ldm-tiny-finetune.yaml")


def draw_images(folder, count=4, size=40, seed=0):
    """A few distinct, structured RGB images (a coloured disc on a gradient) so the model has something to learn."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        cx, cy, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 4]
        image = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 80)], axis=-1).astype(np.uint8)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (230, 40, 40)
        Image.fromarray(image).save(os.path.join(folder, f"img_{i}.png"))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Ops on tiny tensors are far shorter than a thread-pool handoff, which a busy CPU makes slower still."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_ckpt(tmp_path_factory):
    return write_random_checkpoint(TINY_SD, tmp_path_factory.mktemp("ckpt") / "tiny-sd.ckpt")


@pytest.fixture(scope="session")
def tiny_ldm_ckpt(tmp_path_factory):
    return write_random_checkpoint(TINY_LDM, tmp_path_factory.mktemp("ckpt") / "tiny-ldm.ckpt")


@pytest.fixture
def images(tmp_path):
    return draw_images(tmp_path / "my_cat")
