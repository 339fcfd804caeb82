"""`offload_unet` keeps the UNet's weights in CPU memory, uploads each block's for its forward, keeps none of the
uploaded copies for backward, and computes exactly what the resident UNet computes. Here the device is the CPU
too: every upload is still a separate copy, so what outlives a block is visible, and the CPU copies are filled
with NaN (uploads give the true values) so that a computation reading one, a device mismatch on a GPU, shows."""
import gc
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import build_random_model
from ldm.generate import generate
from ldm.modules.weight_offload import WeightOffload
from ldm.util import instantiate_from_config
from tests.conftest import TINY_SD
from tests.test_speed_levers import batch_of, dataset, vector_gradient  # noqa: F401 (the fixture)


def offloaded_model(monkeypatch=None):
    """The tiny SD model with its UNet offloaded; with `monkeypatch`, its CPU copies poisoned with NaN."""
    model = build_random_model(TINY_SD)
    model.model.offload_weights()
    if monkeypatch is not None:
        offload = model.model.weight_offload
        true_values = {}
        for host in offload.host.values():
            true_values[host.data_ptr()] = host.clone()
            host.fill_(float("nan"))
        monkeypatch.setattr(offload, "_to_device", lambda host: true_values[host.data_ptr()].clone())
    return model


def use_checkpointing(unet):
    for module in unet.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = True
        if hasattr(module, "checkpoint") and isinstance(module.checkpoint, bool):
            module.checkpoint = True


@pytest.mark.parametrize("recompute_feedforward", [False, True])
def test_training_gives_the_resident_unets_loss_and_gradient(dataset, recompute_feedforward, monkeypatch):
    model, resident = offloaded_model(monkeypatch), build_random_model(TINY_SD)
    for unet in (model.model.diffusion_model, resident.model.diffusion_model):
        for module in unet.modules():
            if hasattr(module, "recompute_projection"):  # the weights this keeps for backward wait on the host too
                module.recompute_projection = recompute_feedforward
    batch = batch_of(dataset, [0, 1], [False, True])
    loss, grad = vector_gradient(model, batch, torch.float32)
    resident_loss, resident_grad = vector_gradient(resident, batch, torch.float32)
    assert torch.equal(loss, resident_loss) and torch.equal(grad, resident_grad)


def test_no_uploaded_weight_outlives_its_block_not_even_for_backward(dataset, monkeypatch):
    uploads = []
    upload = WeightOffload._upload

    def recorded_upload(self, block, args):
        upload(self, block, args)
        uploads.extend(weakref.ref(parameter.data) for parameter in block.parameters())

    monkeypatch.setattr(WeightOffload, "_upload", recorded_upload)
    model = offloaded_model()
    parameters = list(model.model.diffusion_model.parameters())
    loss = model.shared_step(batch_of(dataset, [0], [False]), torch.Generator().manual_seed(0))[0]
    gc.collect()
    assert len(uploads) == len(parameters)
    assert all(reference() is None for reference in uploads)  # the graph for backward is alive, the copies are not
    assert model.model.weight_offload.host_of_storage == {}
    assert all(p.data_ptr() == model.model.weight_offload.host[p].data_ptr() for p in parameters)
    (grad,) = torch.autograd.grad(loss, model.embedding_manager.vectors("*"))  # kept weights come back for it
    assert grad.abs().sum() > 0


def test_gradient_checkpointing_uploads_again_for_the_recomputation(dataset, monkeypatch):
    model, resident = offloaded_model(monkeypatch), build_random_model(TINY_SD)
    for unet in (model.model.diffusion_model, resident.model.diffusion_model):
        use_checkpointing(unet)
    batch = batch_of(dataset, [0], [True])
    offloaded_grad, resident_grad = (vector_gradient(m, batch, torch.float32)[1] for m in (model, resident))
    assert torch.equal(offloaded_grad, resident_grad)
    offload = model.model.weight_offload
    assert offload.host_of_storage == {} and all(offload.waits_on_host(p) for p in offload.host)


def test_a_cast_keeps_the_weights_in_cpu_memory():
    model = offloaded_model()
    for dtype in (torch.float64, torch.float32):
        model.model.to(dtype)
        assert all(p.dtype == dtype and p.data_ptr() == model.model.weight_offload.host[p].data_ptr()
                   for p in model.model.diffusion_model.parameters())


def test_sampling_uploads_each_blocks_weights_and_drops_them_after(monkeypatch):
    model, resident = offloaded_model(monkeypatch).eval(), build_random_model(TINY_SD).eval()
    settings = dict(n_samples=2, n_iter=1, steps=3, scale=7.5, eta=0.0, seed=0, height=32, width=32,
                    precision="full", progress=False)
    images, reference = generate(model, "a photo of *", **settings), generate(resident, "a photo of *", **settings)
    assert all(torch.equal(a, b) for a, b in zip(images, reference))
    offload = model.model.weight_offload
    assert offload.host_of_storage == {} and all(offload.waits_on_host(p) for p in offload.host)


@pytest.mark.parametrize("other, message", [("cuda_graphs", "cuda_graphs cannot replay an offloaded UNet"),
                                            ("compile_unet", "offload_unet and compile_unet cannot be combined"),
                                            ("unfreeze_model", "unfreeze_model trains them")])
def test_the_config_switch_refuses_levers_that_need_resident_weights(other, message):
    config = OmegaConf.load(TINY_SD)
    config.model.params.offload_unet = True
    model = instantiate_from_config(config.model)
    assert isinstance(model.model.weight_offload, WeightOffload)
    config.model.params[other] = True
    with pytest.raises(ValueError, match=message):
        instantiate_from_config(config.model)


@pytest.mark.parametrize("frozen_weights_dtype, precision", [("float32", "bf16-mixed"), ("bfloat16", "16-mixed")])
def test_weights_stored_in_another_dtype_than_autocasts_are_refused(frozen_weights_dtype, precision):
    """Autocast would convert each weight at each use and keep the device copy for the backward: no saving."""
    model = offloaded_model()
    model.frozen_weights_dtype = frozen_weights_dtype
    with pytest.raises(ValueError, match=f"frozen_weights_dtype: {frozen_weights_dtype} autocast keeps a converted copy"):
        model.prepare_for_training(precision)
    model.frozen_weights_dtype = "auto"
    model.prepare_for_training(precision)
    model.frozen_weights_dtype = "float32"
    model.prepare_for_training("32-true")
