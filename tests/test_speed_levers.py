"""Each speed lever leaves training unchanged: cached latents, half-precision frozen weights, torch.compile.

The compile test takes about a minute on a CPU (inductor builds C++ kernels), so it is marked slow."""
import copy

import pytest
import torch

from ldm.checkpoint import build_random_model
from tests.conftest import TINY_SD


def batch_of(images, indices, flipped):
    pixels = torch.stack([torch.from_numpy(images[i]["image"]) for i in indices])
    flips = torch.tensor(flipped)
    pixels = torch.where(flips[:, None, None, None], pixels.flip(2), pixels)
    return {"image": pixels, "caption": ["a photo of *"] * len(indices), "image_index": torch.tensor(indices), "flipped": flips}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from ldm.data.personalized import PersonalizedBase
    from tests.conftest import draw_images

    return PersonalizedBase(draw_images(tmp_path_factory.mktemp("imgs")), size=32, set="val", flip_p=0.0)


def losses(model, batches, seed=0):
    return [model.shared_step(batch, torch.Generator().manual_seed(seed + i))[0] for i, batch in enumerate(batches)]


def test_cached_latents_draw_exactly_what_per_step_encoding_draws(dataset):
    cached = build_random_model(TINY_SD)
    fresh = copy.deepcopy(cached)
    fresh.cache_latents = False
    batches = [batch_of(dataset, [0, 1], [False, True]), batch_of(dataset, [1, 2], [True, False]), batch_of(dataset, [0, 1], [False, True])]
    # Same draws; the only difference is encoding a sub-batch, which may change float rounding in the last bit.
    for a, b in zip(losses(cached, batches), losses(fresh, batches)):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert set(cached._latent_cache) == {(0, False), (1, True), (2, False)}
    posterior = fresh.encode_first_stage(fresh.get_input(batches[0], "image"))
    assert torch.allclose(cached._latent_cache[(1, True)], posterior.parameters[1], rtol=1e-5, atol=1e-6)


def test_half_precision_frozen_weights_stay_close_to_float32(dataset):
    reference = build_random_model(TINY_SD)
    half = copy.deepcopy(reference)
    for module in (half.model, half.first_stage_model, half.cond_stage_model):
        module.to(torch.bfloat16)
    batch = batch_of(dataset, [0, 1, 2, 3], [False] * 4)
    loss32 = losses(reference, [batch])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = losses(half, [batch])[0]
    assert half.embedding_manager.vectors("*").dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    grad32 = torch.autograd.grad(loss32, reference.embedding_manager.vectors("*"))[0]
    grad16 = torch.autograd.grad(loss16, half.embedding_manager.vectors("*"))[0]
    assert torch.nn.functional.cosine_similarity(grad32.flatten(), grad16.float().flatten(), dim=0) > 0.98


def test_preparation_casts_frozen_weights_to_the_trainer_precision():
    model = build_random_model(TINY_SD)
    model.prepare_for_training("bf16-mixed")
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert next(model.first_stage_model.parameters()).dtype == torch.bfloat16
    assert model.embedding_manager.vectors("*").dtype == torch.float32


@pytest.mark.slow
def test_compiled_unet_equals_eager(dataset):
    eager = build_random_model(TINY_SD)
    compiled = copy.deepcopy(eager)
    compiled.model.diffusion_model.compile()
    batch = batch_of(dataset, [0, 1], [False, False])
    loss_eager, loss_compiled = losses(eager, [batch])[0], losses(compiled, [batch])[0]
    assert torch.allclose(loss_eager, loss_compiled, rtol=1e-4)
    grad_eager = torch.autograd.grad(loss_eager, eager.embedding_manager.vectors("*"))[0]
    grad_compiled = torch.autograd.grad(loss_compiled, compiled.embedding_manager.vectors("*"))[0]
    assert torch.allclose(grad_eager, grad_compiled, rtol=1e-3, atol=1e-7)
