"""What only a GPU can check: the CUDA paths of the speed and memory levers compute what the eager, resident,
stock paths compute. Skipped where there is no CUDA; on a GPU machine: `python -m pytest tests/test_cuda.py`."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.checkpoint import build_random_model
from ldm.generate import generate
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.modules.lean_ops import LayerNorm, LeanConv2d
from tests.conftest import TINY_SD
from tests.test_lean_ops import kept_for_backward
from tests.test_speed_levers import batch_of, dataset  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model_on_cuda():
    model = build_random_model(TINY_SD).cuda()
    model.prepare_for_training("bf16-mixed")
    return model


def cuda_batch(dataset, indices):  # noqa: F811
    batch = batch_of(dataset, indices, [False] * len(indices))
    return {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}


def step(model, batch, seed):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.shared_step(batch, torch.Generator(device="cuda").manual_seed(seed))[0]
    return loss, torch.autograd.grad(loss, model.embedding_manager.vectors("*"))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_conv_backward_on_cudnn_matches_the_stock_conv(dtype, channels_last):
    torch.manual_seed(0)
    stock = nn.Conv2d(32, 64, 3, padding=1).cuda().to(dtype).requires_grad_(False)
    lean = LeanConv2d(32, 64, 3, padding=1).cuda().to(dtype).requires_grad_(False)
    lean.load_state_dict(stock.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 24, 24, device="cuda", dtype=dtype).to(memory_format=memory_format).requires_grad_(True)
    # The two may take different cuDNN engines (their inputs' gradients differ in layout): in float32 both without
    # TF32, whose rounding (about 1e-3) would otherwise decide the comparison.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        grads = [torch.autograd.grad(conv(x).float().square().sum(), x)[0] for conv in (stock, lean)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("offset", [0.0, 8.0])
def test_native_group_norm_on_cuda_is_within_the_rounding_of_its_half_statistics(silu, offset):
    """The CUDA kernel normalises with its mean and scale rounded to bf16: the output may differ from the float32
    path by about (1 + |mean|/std) bf16 ulps, the gradient likewise."""
    torch.manual_seed(0)
    norm = GroupNorm32(8, 64, silu=silu).cuda()
    nn.init.normal_(norm.weight, 1.0, 0.2), nn.init.normal_(norm.bias, 0.0, 0.2)
    reference = copy.deepcopy(norm)
    norm.bfloat16().requires_grad_(False), reference.requires_grad_(False)
    x = (torch.randn(2, 64, 16, 16, device="cuda") * 2.0 + offset).bfloat16()
    gradient = torch.randn(2, 64, 16, 16, device="cuda").bfloat16()
    outputs, grads = [], []
    for module, inputs in ((norm, x), (reference, x.float())):
        inputs = inputs.detach().requires_grad_(True)
        output = module(inputs)
        outputs.append(output.float())
        grads.append(torch.autograd.grad(output, inputs, gradient.to(output.dtype))[0].float())
    bound = 4 * 2.0 ** -8 * (1 + offset / 2.0)
    assert (outputs[0] - outputs[1]).abs().max() <= bound * outputs[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= bound * grads[1].abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_channels_last_group_norm_on_cuda_matches_the_native_kernel(dtype, silu):
    """CUDA's native kernel hands a channels-last input back NCHW; GroupNorm32's own keeps the layout, within the
    native kernel's rounding (bf16: about (1 + |mean|/std) ulps, here |mean|/std = 4)."""
    torch.manual_seed(0)
    norm = GroupNorm32(8, 64, silu=silu).cuda().to(dtype).requires_grad_(False)
    nn.init.normal_(norm.weight, 1.0, 0.2), nn.init.normal_(norm.bias, 0.0, 0.2)
    x = (torch.randn(2, 64, 16, 16, device="cuda") * 2.0 + 8.0).to(dtype)
    gradient = torch.randn(2, 64, 16, 16, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    outputs, grads = [], []
    for memory_format in (torch.channels_last, torch.contiguous_format):
        inputs = x.to(memory_format=memory_format).requires_grad_(True)
        output = norm(inputs)
        assert output.is_contiguous(memory_format=memory_format)
        outputs.append(output.float())
        grads.append(torch.autograd.grad(output, inputs, gradient)[0].float())
    bound = 4 * 2.0 ** -8 * 5 if dtype == torch.bfloat16 else 1e-5
    assert (outputs[0] - outputs[1]).abs().max() <= bound * outputs[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= bound * grads[1].abs().max()


def test_layer_norm_under_cuda_autocast_stays_in_bf16_where_nn_layer_norm_goes_float32():
    norm = LayerNorm(64).cuda().bfloat16().requires_grad_(False)
    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert F.layer_norm(x, (64,), norm.weight, norm.bias).dtype == torch.float32  # the policy this avoids
        kept, output = kept_for_backward(lambda: norm(x))
    assert output.dtype == torch.bfloat16
    assert all(t.dtype != torch.float32 or t.numel() < x.numel() for t in kept)


def test_cuda_graphs_train_as_the_eager_unet(dataset):  # noqa: F811
    eager = tiny_model_on_cuda()
    graphed = copy.deepcopy(eager)
    graphed.model.use_cuda_graphs()
    graphed.cond_stage_model.use_cuda_graphs()
    for seed in range(3):
        batch = cuda_batch(dataset, [seed % 4, (seed + 1) % 4])
        (loss, grad), (eager_loss, eager_grad) = step(graphed, batch, seed), step(eager, batch, seed)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-2, atol=1e-5)
    assert not graphed.model.graphed_unet.failed and len(graphed.model.graphed_unet.graphed) == 1
    encoder = graphed.cond_stage_model.graphed_encoder
    assert not encoder.failed and len(encoder.graphed) == 1


def test_cuda_graphs_sample_as_the_eager_unet():
    eager = build_random_model(TINY_SD).cuda().eval()
    eager.store_frozen_weights(torch.float16)
    graphed = copy.deepcopy(eager)
    graphed.model.use_cuda_graphs()
    settings = dict(n_samples=2, n_iter=2, steps=5, scale=7.5, eta=0.0, seed=0, height=32, width=32,
                    precision="autocast", progress=False)
    images = generate(graphed, "a photo of *", **settings)
    for image, eager_image in zip(images, generate(eager, "a photo of *", **settings)):
        torch.testing.assert_close(image, eager_image, rtol=0, atol=2e-2)
    assert not graphed.model.graphed_unet.failed and len(graphed.model.graphed_unet.graphed) == 1


@pytest.mark.parametrize("graphed", [False, True])
def test_a_sampling_loop_never_waits_for_the_gpu(graphed):
    """The steps' timesteps and coefficients are made and read on the device, so the CPU queues the whole loop
    ahead of the GPU (at a few images per prompt a step is bound by launches)."""
    model = build_random_model(TINY_SD).cuda().eval()
    model.store_frozen_weights(torch.float16)
    model.model.use_cuda_graphs(graphed)
    sampler = DDIMSampler(model)
    with torch.no_grad(), torch.autocast("cuda"):
        cond, uc = model.get_learned_conditioning(["a photo of *", ""]).chunk(2)
        settings = dict(conditioning=cond, unconditional_conditioning=uc, unconditional_guidance_scale=7.5)
        sampler.sample(5, 1, (4, 4, 4), **settings)  # the schedule's first build copies it to the GPU; graphs record
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler._denoise(torch.randn(1, 4, 4, 4, device="cuda"), cond, sampler.ddim_schedule, 5,
                             unconditional_guidance_scale=7.5, unconditional_conditioning=uc)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_offloaded_unet_trains_as_the_resident_one_and_leaves_its_weights_off_the_gpu(dataset):  # noqa: F811
    resident = tiny_model_on_cuda()
    before = torch.cuda.memory_allocated()
    offloaded = copy.deepcopy(resident)
    offloaded.model.offload_weights()
    unet_bytes = sum(p.numel() * p.element_size() for p in offloaded.model.diffusion_model.parameters())
    added = torch.cuda.memory_allocated() - before  # the copy's text encoder and VAE only
    assert all(p.device.type == "cpu" and p.is_pinned() for p in offloaded.model.diffusion_model.parameters())
    other_bytes = sum(p.numel() * p.element_size() for p in offloaded.parameters()) - unet_bytes
    assert added <= other_bytes + 2**20
    batch = cuda_batch(dataset, [0, 1])
    (loss, grad), (resident_loss, resident_grad) = step(offloaded, batch, 0), step(resident, batch, 0)
    torch.testing.assert_close(loss, resident_loss, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grad, resident_grad, rtol=1e-2, atol=1e-5)


def test_channels_last_trains_as_nchw_also_offloaded_and_graphed(dataset):  # noqa: F811
    nchw = tiny_model_on_cuda()
    batch = cuda_batch(dataset, [0, 1])
    loss, grad = step(nchw, batch, 0)
    for lever in ("use_cuda_graphs", "offload_weights"):
        channels_last = copy.deepcopy(nchw)
        channels_last.model.use_channels_last()
        getattr(channels_last.model, lever)()
        kernels = [p for p in channels_last.model.diffusion_model.parameters() if p.ndim == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        for _ in range(2):  # a graph records on the first step and replays on the second
            other_loss, other_grad = step(channels_last, batch, 0)
            torch.testing.assert_close(other_loss, loss, rtol=1e-2, atol=1e-4)
            assert F.cosine_similarity(other_grad.flatten(), grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("graphed", [False, True])
def test_a_cached_training_step_never_waits_for_the_gpu(dataset, graphed):  # noqa: F811
    """Latent cache keys, token ids, the parked token table's rows and placeholder widths are read without a copy
    between host and device, so the CPU can queue the next step while the GPU runs this one."""
    model = tiny_model_on_cuda()
    model.model.use_cuda_graphs(graphed, sampling=False)
    model.cond_stage_model.use_cuda_graphs(graphed)
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()
    assert optimizer.defaults["fused"]  # one AdamW kernel
    batch = model.transfer_batch_to_device(batch_of(dataset, [0, 1], [False, True]), torch.device("cuda"), 0)
    model.park_idle_weights(batch)  # as each training step does: the token table waits in CPU memory
    assert model.cond_stage_model.token_embedding.weight.device.type == "cpu"

    def training_step(seed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.shared_step(batch, torch.Generator(device="cuda").manual_seed(seed))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.embedding_manager.apply_norm_cap()

    training_step(0)  # encodes the images, tokenizes the captions, looks their token rows up, records graphs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_attention_backend_runs_its_kernel_and_trains_as_the_default(dataset, backend):  # noqa: F811
    default = tiny_model_on_cuda()
    chosen = copy.deepcopy(default)
    chosen.model.diffusion_model.use_attention_backend(backend)
    batch = cuda_batch(dataset, [0, 1])
    loss, grad = step(default, batch, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        chosen_loss, chosen_grad = step(chosen, batch, 0)
    kernel = {"cudnn": "aten::_scaled_dot_product_cudnn_attention",
              "efficient": "aten::_scaled_dot_product_efficient_attention"}[backend]
    assert kernel in {event.key for event in profile.key_averages()}
    torch.testing.assert_close(chosen_loss, loss, rtol=1e-2, atol=1e-4)
    assert F.cosine_similarity(chosen_grad.flatten(), grad.flatten(), dim=0) > 0.99
