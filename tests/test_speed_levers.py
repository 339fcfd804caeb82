"""Each speed and memory lever leaves training unchanged: cached latents, the VAE parked in CPU memory, the lean
UNet layers, half-precision frozen weights, the channels-last layout, torch.compile.

The compile test takes about a minute on a CPU (inductor builds C++ kernels), so it is marked slow."""
import copy
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

import ldm.modules.attention
from ldm.checkpoint import build_random_model
from ldm.images import channels_first
from ldm.models.diffusion.ddpm import fused_adamw
from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.modules.lean_ops import LayerNorm, LeanConv
from ldm.util import instantiate_from_config
from tests.conftest import REPO, TINY_SD
from tests.test_lean_ops import stock_gated_gelu


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
    assert set(cached._latent_cache) == {(True, 0, False), (True, 1, True), (True, 2, False)}
    posterior = fresh.encode_first_stage(fresh.get_input(batches[0], "image"))
    assert torch.allclose(cached._latent_cache[(True, 1, True)], posterior.parameters[1], rtol=1e-5, atol=1e-6)


def test_validation_images_do_not_share_the_training_images_cached_latents(dataset):
    """A validation folder of its own numbers its images from 0 too (Lightning validates before training)."""
    model = build_random_model(TINY_SD)
    validation = batch_of(dataset, [0], [False])
    training = dict(validation, image=validation["image"].flip(-1))  # another picture under the same index
    model.eval()
    validation_posterior = model.posterior_of_batch(validation)
    model.train()
    training_posterior = model.posterior_of_batch(training)
    expected = model.encode_first_stage(model.get_input(training, "image"))
    assert torch.allclose(training_posterior.mean, expected.mean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(training_posterior.mean, validation_posterior.mean)


class MovesRecorded:
    """Stands in for the VAE's `.to`/`.cpu` on a CPU-only machine: records each move and only pretends to make
    it (the VAE reports the device it was last moved to, `waits_on` at first)."""

    def __init__(self, model, monkeypatch, waits_on):
        self.moves = []
        self.waits_on = waits_on
        vae = model.first_stage_model
        monkeypatch.setattr(vae, "to", lambda target: self.move(str(target)) or vae)
        monkeypatch.setattr(vae, "cpu", lambda: self.move("cpu") or vae)
        parameter = next(vae.parameters())
        where = type("Where", (), {"device": property(lambda _: torch.device(self.waits_on))})()
        monkeypatch.setattr(vae, "parameters", lambda: iter([where, parameter]))

    def move(self, device: str):
        self.moves.append(device)
        self.waits_on = device


def test_lightning_leaves_the_cache_keys_and_pixels_on_the_host(dataset):
    model = build_random_model(TINY_SD)
    batch = {**batch_of(dataset, [0, 1], [False, True]), "weight": torch.ones(2)}
    moved = model.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert [moved[key].device.type for key in ("image_index", "flipped", "image", "weight")] == ["cpu"] * 3 + ["meta"]
    assert moved["caption"] == batch["caption"]
    uncached = {"image": batch["image"], "caption": batch["caption"]}  # no cache keys: the pixels go to the device
    assert model.transfer_batch_to_device(uncached, torch.device("meta"), 0)["image"].device.type == "meta"


def test_a_waiting_vae_visits_the_model_device_once_per_batch_of_new_images(dataset, monkeypatch):
    model = build_random_model(TINY_SD)
    recorded = MovesRecorded(model, monkeypatch, waits_on="meta")  # the model is on the CPU, the VAE elsewhere
    batch = batch_of(dataset, [0, 1, 2], [False, True, False])
    model.posterior_of_batch(batch)
    assert recorded.moves == ["cpu", "meta"]  # three images encoded in one visit
    model.posterior_of_batch(batch)
    assert recorded.moves == ["cpu", "meta"]  # all cached: the VAE stays where it waits
    model.decode_first_stage(torch.zeros(1, 4, 4, 4))
    assert recorded.moves == ["cpu", "meta"] * 2


def test_vae_is_parked_in_cpu_memory_only_where_the_cache_serves_the_batches(dataset, monkeypatch):
    model = build_random_model(TINY_SD)
    monkeypatch.setattr(type(model), "device", property(lambda _: torch.device("cuda")))
    recorded = MovesRecorded(model, monkeypatch, waits_on="cuda")
    uncached = {key: value for key, value in batch_of(dataset, [0], [False]).items() if key != "image_index"}
    model.park_idle_first_stage(uncached)  # e.g. pretraining data: every step encodes, so it stays
    assert recorded.moves == []
    model.park_idle_first_stage(batch_of(dataset, [0], [False]))
    assert recorded.moves == ["cpu"]
    model.park_idle_first_stage(batch_of(dataset, [0], [False]))
    assert recorded.moves == ["cpu"]  # already parked
    recorded.waits_on = "cuda"
    model.park_first_stage = False
    model.park_idle_first_stage(batch_of(dataset, [0], [False]))
    assert recorded.moves == ["cpu"]


def test_the_token_table_is_parked_on_a_gpu_and_trains_as_the_resident_one(dataset, monkeypatch):
    resident = build_random_model(TINY_SD)
    model = copy.deepcopy(resident)
    batch = batch_of(dataset, [0, 1], [False, True])
    model.park_idle_weights(batch)
    assert not model.cond_stage_model.token_table_parked  # on the CPU there is nowhere better to wait
    monkeypatch.setattr(type(model), "device", property(lambda _: torch.device("cuda")))
    model.park_token_table = False
    model.park_idle_weights(batch)
    assert not model.cond_stage_model.token_table_parked
    model.park_token_table = True
    model.cond_stage_model.token_embedding.requires_grad_(True)  # e.g. pretraining a text encoder
    model.park_idle_weights(batch)
    assert not model.cond_stage_model.token_table_parked
    model.cond_stage_model.token_embedding.requires_grad_(False)
    model.park_idle_weights(batch)
    assert model.cond_stage_model.token_table_parked
    monkeypatch.undo()
    for step in range(2):  # the second step reads the remembered rows
        parked_loss = model.shared_step(batch, torch.Generator().manual_seed(step))[0]
        loss = resident.shared_step(batch, torch.Generator().manual_seed(step))[0]
        assert torch.equal(parked_loss, loss)
        (parked_grad,) = torch.autograd.grad(parked_loss, model.embedding_manager.embedding_parameters())
        (grad,) = torch.autograd.grad(loss, resident.embedding_manager.embedding_parameters())
        assert torch.equal(parked_grad, grad)


def with_stock_layers(model):
    """`model` with nn.Conv; the test patches in the two-step GEGLU, LDM's GroupNorm and SiLU, and float32
    LayerNorms."""
    stock = copy.deepcopy(model)
    for module in stock.modules():
        if isinstance(module, LeanConv):
            module.__class__ = module.__class__.__mro__[2]  # LeanConv2d -> LeanConv -> nn.Conv2d
    return stock


def stock_group_norm(self, x):
    """LDM's GroupNorm32 (float32, cast back), then the separate SiLU where ours fuses it."""
    normed = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)
    return F.silu(normed) if self.silu else normed


def float32_layer_norm(self, x):
    """nn.LayerNorm as CUDA autocast runs it: float32 input and weights, a float32 output."""
    return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def stock_layers_patched(patch):
    patch.setattr(ldm.modules.attention, "gated_gelu", stock_gated_gelu)
    patch.setattr(GroupNorm32, "forward", stock_group_norm)
    patch.setattr(LayerNorm, "forward", float32_layer_norm)


def vector_gradient(model, batch, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        loss = losses(model, [batch])[0]
    return loss, torch.autograd.grad(loss, model.embedding_manager.vectors("*"))[0]


def test_lean_layers_give_the_stock_loss_and_gradient(dataset, monkeypatch):
    lean = build_random_model(TINY_SD)
    generator = torch.Generator().manual_seed(0)
    for parameter in lean.model.parameters():  # the zero-initialised output layers would hide the UNet's inside
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05, generator=generator)
    stock = with_stock_layers(lean)
    assert type(stock.model.diffusion_model.input_blocks[0][0]) is torch.nn.Conv2d
    batch = batch_of(dataset, [0, 1], [False, True])
    lean_loss, lean_grad = vector_gradient(lean, batch, torch.float32)
    with monkeypatch.context() as patch:
        stock_layers_patched(patch)
        stock_loss, stock_grad = vector_gradient(stock, batch, torch.float32)
    # The same arithmetic up to the order of a few sums (a fused SiLU, autograd adding a tensor's gradients):
    # float32 rounding, not an approximation.
    torch.testing.assert_close(lean_loss, stock_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(lean_grad, stock_grad, rtol=1e-5, atol=1e-8)

    for model in (lean, stock):
        for module in (model.model, model.first_stage_model, model.cond_stage_model):
            module.to(torch.bfloat16)
    lean_loss, lean_grad = vector_gradient(lean, batch, torch.bfloat16)
    with monkeypatch.context() as patch:
        stock_layers_patched(patch)  # in bf16, LayerNorm as CUDA autocast runs it
        stock_loss, stock_grad = vector_gradient(stock, batch, torch.bfloat16)
    assert abs(lean_loss.item() - stock_loss.item()) < 0.01 * stock_loss.item()
    assert F.cosine_similarity(lean_grad.flatten(), stock_grad.flatten(), dim=0) > 0.99


def test_recomputing_the_feedforward_projection_gives_the_same_loss_and_gradient(dataset, monkeypatch):
    kept_projection = build_random_model(TINY_SD)
    config = OmegaConf.load(TINY_SD)
    config.model.params.unet_config.params.recompute_feedforward = True  # the YAML switch, as a user sets it
    recomputed = build_random_model(config)
    geglus = [m for m in recomputed.model.diffusion_model.modules() if isinstance(m, ldm.modules.attention.GEGLU)]
    assert geglus and all(geglu.recompute_projection for geglu in geglus)
    recomputations = []
    recompute = ldm.modules.attention.projected_gated_gelu
    monkeypatch.setattr(ldm.modules.attention, "projected_gated_gelu",
                        lambda *args: recomputations.append(1) or recompute(*args))
    batch = batch_of(dataset, [0, 1], [False, True])
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16:
            for model in (kept_projection, recomputed):
                model.store_frozen_weights(torch.bfloat16)
        loss, grad = vector_gradient(kept_projection, batch, dtype)
        assert not recomputations
        recomputed_loss, recomputed_grad = vector_gradient(recomputed, batch, dtype)
        assert len(recomputations) == len(geglus)  # the lean path ran, once per block
        recomputations.clear()
        assert torch.equal(loss, recomputed_loss)
        torch.testing.assert_close(recomputed_grad, grad, rtol=1e-5, atol=1e-8)


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


def test_frozen_parts_stay_in_eval_mode_and_the_model_pickles():
    """Lightning switches the whole model to training; the frozen parts must not follow (dropout), and the model
    must pickle, as `--strategy ddp_spawn` needs."""
    model = build_random_model(TINY_SD)
    model.train()
    assert model.training and model.embedding_manager.training
    assert not any(module.training for part in (model.model, model.first_stage_model, model.cond_stage_model)
                   for module in part.modules())
    assert not any(p.requires_grad for p in model.model.parameters())
    copy = pickle.loads(pickle.dumps(model))
    copy.train()
    assert not copy.cond_stage_model.training


def test_logged_images_run_in_the_stored_half_precision(dataset):
    """The image logger calls `log_images` from a callback, outside the trainer's autocast: float32 pixels and
    half weights must still meet (a GPU run with the bf16 default used to fail at its first logging step)."""
    model = build_random_model(TINY_SD)
    model.prepare_for_training("bf16-mixed")
    logs = model.log_images(batch_of(dataset, [0, 1], [False, True]), N=2, ddim_steps=2)
    assert set(logs) == {"inputs", "reconstruction", "conditioning", "samples", "samples_scaled"}
    assert all(torch.isfinite(images.float()).all() for images in logs.values())
    # what each name says: samples are sampled (not the reconstruction), and the guided ones are guided
    assert not torch.equal(logs["samples"], logs["reconstruction"])
    assert not torch.equal(logs["samples_scaled"], logs["samples"])


def test_a_half_frozen_weights_dtype_needs_a_mixed_precision():
    model = build_random_model(TINY_SD)
    model.frozen_weights_dtype = "bfloat16"
    with pytest.raises(ValueError, match="frozen_weights_dtype: bfloat16 needs a mixed precision"):
        model.prepare_for_training("32-true")
    model.prepare_for_training("bf16-mixed")
    assert next(model.model.parameters()).dtype == torch.bfloat16


def test_compile_unet_takes_true_or_a_torch_compile_mode(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: modes.append(mode))
    model = build_random_model(TINY_SD)
    for setting in (False, True, "reduce-overhead"):
        model.compile_unet = setting
        model.prepare_for_training("32-true")
    assert modes == [None, "reduce-overhead"]
    config = OmegaConf.load(TINY_SD)
    config.model.params.compile_unet = "fast"
    with pytest.raises(ValueError, match="compile_unet 'fast' is not true, false or a torch.compile mode"):
        instantiate_from_config(config.model)


def test_channels_last_unet_gives_the_same_loss_and_gradient(dataset):
    """Every convolution gets its input channels-last: no layer (a GroupNorm, as CUDA's native one would) hands
    back NCHW for the next convolution to convert back."""
    contiguous = build_random_model(TINY_SD)
    config = OmegaConf.load(TINY_SD)
    config.model.params.channels_last = True
    channels_last = instantiate_from_config(config.model)
    channels_last.load_state_dict(contiguous.state_dict())
    unet = channels_last.model.diffusion_model
    inputs = []
    unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    batch = batch_of(dataset, [0, 1], [False, True])
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16:
            for model in (channels_last, contiguous):
                model.prepare_for_training("bf16-mixed")  # the cast keeps the layout
        kernels = [p for p in unet.parameters() if p.ndim == 4]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        assert not unet.input_blocks[0][0].weight.is_contiguous()
        vector_gradient(channels_last, batch, dtype)  # fills the latent cache: the next step runs the UNet alone
        with ConvolutionLayouts() as convolutions:
            loss, grad = vector_gradient(channels_last, batch, dtype)
        assert convolutions.layouts == {"channels_last"}
        reference_loss, reference_grad = vector_gradient(contiguous, batch, dtype)
        assert inputs[-1].is_contiguous(memory_format=torch.channels_last) and not inputs[-1].is_contiguous()
        # The same products summed in another order: they agree to the activations' rounding.
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert abs(loss.item() - reference_loss.item()) < tolerance * reference_loss.item()
        assert F.cosine_similarity(grad.flatten(), reference_grad.flatten(), dim=0) > 1 - tolerance
    channels_last.model.use_channels_last(False)
    assert all(p.is_contiguous() for p in unet.parameters())


class ConvolutionLayouts(TorchDispatchMode):
    """The memory layout of every convolution's input."""

    def __init__(self):
        super().__init__()
        self.layouts = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.convolution:
            x = args[0]
            self.layouts.add("nchw" if x.is_contiguous() else
                             "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided")
        return func(*args, **(kwargs or {}))


def test_every_convolution_of_an_nchw_network_gets_an_nchw_input(dataset):
    """A channels-last view leaving an attention block (UNet or VAE) would spread to every later layer, each
    convolution then converting its weights and input at every call, unless the block lays out its output as its
    input."""
    model = build_random_model(TINY_SD)
    batch = batch_of(dataset, [0, 1], [False, True])
    vector_gradient(model, batch, torch.float32)  # fills the latent cache: the next step runs the UNet alone
    with ConvolutionLayouts() as unet:
        vector_gradient(model, batch, torch.float32)
    with ConvolutionLayouts() as vae, torch.no_grad():
        model.decode_first_stage(model.encode_first_stage(channels_first(batch["image"])).mode())
    assert unet.layouts == vae.layouts == {"nchw"}


def test_attention_backend_puts_its_kernel_first_in_every_attention_of_the_unet(dataset, monkeypatch):
    auto = build_random_model(TINY_SD)
    config = OmegaConf.load(TINY_SD)
    config.model.params.unet_config.params.attention_backend = "cudnn"
    cudnn = instantiate_from_config(config.model)
    cudnn.load_state_dict(auto.state_dict())
    batch = batch_of(dataset, [0, 1], [False, True])
    auto_loss, auto_grad = vector_gradient(auto, batch, torch.float32)
    orders = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: orders.append(torch._C._get_sdp_priority_order()) or sdpa(*args, **kwargs))
    loss, grad = vector_gradient(cudnn, batch, torch.float32)
    # The CPU has neither cuDNN attention nor a priority order: the same kernel, the same values, here.
    torch.testing.assert_close(loss, auto_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, auto_grad, rtol=1e-6, atol=0)
    unet_attentions = sum(isinstance(m, ldm.modules.attention.CrossAttention) for m in cudnn.modules())
    first_choices = [order[0] for order in orders if order != torch._C._get_sdp_priority_order()]
    assert first_choices == [int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)] * unet_attentions
    with pytest.raises(ValueError, match="attention_backend 'fast' is not one of auto, flash, efficient, cudnn, math"):
        cudnn.model.diffusion_model.use_attention_backend("fast")


def test_cudnn_attention_is_put_first_only_for_heads_its_backward_serves():
    """SD v1's heads are 40, 80 and 160 channels wide; cuDNN's backward may lack the 160-channel one."""
    with torch.device("meta"):
        unet = instantiate_from_config(OmegaConf.load(os.path.join(REPO, "configs/stable-diffusion/v1-inference.yaml"))
                                       .model.params.unet_config)
    for backend in ("cudnn", "efficient"):
        unet.use_attention_backend(backend)
        first = {}
        for module in unet.modules():
            if isinstance(module, ldm.modules.attention.CrossAttention):
                first.setdefault(module.dim_head, set()).add(module.kernel_order and module.kernel_order[0])
        chosen = torch.nn.attention.SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else \
            torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION
        assert first == {40: {chosen}, 80: {chosen}, 160: {None if backend == "cudnn" else chosen}}


@pytest.mark.parametrize("levers, memory_format", [
    ({}, torch.contiguous_format),
    pytest.param({"recompute_feedforward": True, "attention_backend": "math"}, torch.channels_last,
                 marks=pytest.mark.slow)])
def test_the_unet_compiles_to_one_graph_with_its_lean_backward(levers, memory_format):
    """A graph break (e.g. an op torch.compile cannot trace in a lean layer's backward) would split the compiled
    UNet into dozens of graphs, and the speed of compile_unet with it."""
    config = OmegaConf.load(TINY_SD).model.params.unet_config
    config.params.update(levers)
    unet = instantiate_from_config(config).to(memory_format=memory_format)
    x, t = torch.randn(2, 4, 16, 16).to(memory_format=memory_format), torch.tensor([10, 500])
    context = torch.randn(2, 77, 32, requires_grad=True)
    explanation = torch._dynamo.explain(lambda x, t, context: unet(x, t, context=context))(x, t, context)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


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


def test_adamw_is_fused_on_a_gpu_unless_gradients_are_clipped():
    """Lightning's mixed precision refuses gradient clipping for a fused optimizer, at the first step."""
    on_gpu = [SimpleNamespace(is_cuda=True)] * 2
    assert fused_adamw(on_gpu, None) and fused_adamw(on_gpu, SimpleNamespace(gradient_clip_val=None))
    assert not fused_adamw(on_gpu, SimpleNamespace(gradient_clip_val=1.0))
    assert not fused_adamw([SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)], None)
