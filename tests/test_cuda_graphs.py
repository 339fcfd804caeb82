"""`cuda_graphs` hands the UNet and the text encoder to a recorder exactly where recorded graphs are exact, once
per input shape.

Recording needs CUDA, so these tests put a stand-in for `torch.cuda.make_graphed_callables` on the CPU: it notes
what it was given and returns the function itself, except that without gradients it hands out one output buffer
that every call overwrites, as a replayed graph does. So the values must be the eager ones."""
import collections
import inspect

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.checkpoint import build_random_model
from ldm.generate import generate
from ldm.modules import cuda_graphs
from ldm.modules.cuda_graphs import GraphedTextEncoder, GraphedUNet
from ldm.util import instantiate_from_config
from tests.conftest import TINY_SD
from tests.test_speed_levers import batch_of, dataset, losses, vector_gradient  # noqa: F401 (the fixture)


class Recorder:
    """Stands in for make_graphed_callables; `fail` makes it raise as a failed capture does."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.recorded = []

    def __call__(self, function, samples, **options):
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.recorded.append({"samples": samples, "options": options,
                              "autocast": torch.is_autocast_enabled("cpu"),
                              "cache": torch.is_autocast_cache_enabled()})
        static_output = function(*samples).detach()

        def replay(*inputs):
            if torch.is_grad_enabled():
                return function(*inputs)
            static_output.copy_(function(*inputs))
            return static_output.detach()

        return replay


def graphed_model(recorder, network="unet"):
    model = build_random_model(TINY_SD)
    graphed = model.model if network == "unet" else model.cond_stage_model
    graphed.use_cuda_graphs(make_graphed=recorder, device_type="cpu")
    return model


@pytest.mark.parametrize("network", ["unet", "text encoder"])
def test_training_steps_record_once_per_input_shape_with_the_eager_values(dataset, network, capsys):
    recorder = Recorder()
    model, eager = graphed_model(recorder, network), build_random_model(TINY_SD)
    two, three = batch_of(dataset, [0, 1], [False, True]), batch_of(dataset, [0, 1, 2], [False] * 3)
    for batch in (two, two, three, two):
        loss, grad = vector_gradient(model, batch, torch.float32)
        eager_loss, eager_grad = vector_gradient(eager, batch, torch.float32)
        assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)
    assert [r["samples"][0].shape[0] for r in recorder.recorded] == [2, 3]
    name = "the UNet" if network == "unet" else "the text encoder"
    assert capsys.readouterr().out.count(f"cuda_graphs: recorded {name} for inputs of shape ") == 2
    samples = recorder.recorded[0]["samples"]  # UNet: x, timesteps, context; text encoder: token embeddings
    assert [sample.requires_grad for sample in samples] == ([False, False, True] if network == "unet" else [True])
    assert samples[-1].is_leaf  # a copy: the warm-up passes never reach the real step
    assert network != "unet" or samples[1].dtype == torch.long  # the timesteps
    assert recorder.recorded[0]["options"] in ({}, {"capture_error_mode": "thread_local"})


def test_recording_under_autocast_turns_off_only_its_weight_cache(dataset):
    recorder = Recorder()
    model = graphed_model(recorder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses(model, [batch_of(dataset, [0], [False])])
    assert recorder.recorded[0]["autocast"] is True and recorder.recorded[0]["cache"] is False
    assert torch.is_autocast_cache_enabled()


def test_a_trainable_unet_and_checkpointing_train_eagerly(dataset):
    recorder = Recorder()
    model = graphed_model(recorder)
    model.model.diffusion_model.requires_grad_(True)
    losses(model, [batch_of(dataset, [0], [False])])
    model.model.diffusion_model.requires_grad_(False)
    for module in model.model.diffusion_model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = True
    model.model.use_cuda_graphs(make_graphed=recorder, device_type="cpu")
    losses(model, [batch_of(dataset, [0], [False])])
    assert recorder.recorded == []


def test_moving_the_unet_drops_its_graphs(dataset):
    recorder = Recorder()
    model = graphed_model(recorder)
    batch = batch_of(dataset, [0], [False])
    losses(model, [batch])
    model.to("cpu")
    losses(model, [batch])
    assert len(recorder.recorded) == 2


def test_a_failed_recording_is_reported_once_and_the_unet_runs_eagerly(dataset, capsys):
    model, eager = graphed_model(Recorder(fail=True)), build_random_model(TINY_SD)
    batch = batch_of(dataset, [0, 1], [False, False])
    for _ in range(2):
        graphed_grad, eager_grad = (vector_gradient(m, batch, torch.float32)[1] for m in (model, eager))
        assert torch.equal(graphed_grad, eager_grad)
    output = capsys.readouterr().out
    assert output.count("cuda_graphs: recording the UNet failed") == 1
    assert "runs eagerly from here on" in output
    assert model.model.graphed_unet.failed


def test_the_config_switch_builds_the_graphed_unet_and_refuses_compile_too():
    config = OmegaConf.load(TINY_SD)
    config.model.params.cuda_graphs = True
    model = instantiate_from_config(config.model)
    assert isinstance(model.model.graphed_unet, GraphedUNet)
    assert isinstance(model.cond_stage_model.graphed_encoder, GraphedTextEncoder)
    assert model.model.graphed_unet.make_graphed is torch.cuda.make_graphed_callables
    assert not model.model.graphed_unet.sampling  # image logging in a training run stays eager
    config.model.params.compile_unet = True
    with pytest.raises(ValueError, match="cuda_graphs and compile_unet are alternatives"):
        instantiate_from_config(config.model)


@pytest.mark.parametrize("sampler, scale", [("ddim", 7.5), ("plms", 1.0)])
def test_sampling_records_the_guided_forward_once_and_gives_the_eager_images(sampler, scale):
    recorder = Recorder()
    model, eager = graphed_model(recorder).eval(), build_random_model(TINY_SD).eval()
    settings = dict(n_samples=2, n_iter=2, steps=4, scale=scale, eta=0.0, seed=0, height=32, width=32,
                    sampler=sampler, precision="full", progress=False)
    images = generate(model, "a photo of *", **settings)
    assert all(torch.equal(a, b) for a, b in zip(images, generate(eager, "a photo of *", **settings)))
    (recorded,) = recorder.recorded  # every step of both batches replays one recording
    x, _, context = recorded["samples"]
    assert x.shape[0] == (4 if scale != 1.0 else 2) and not context.requires_grad


def test_a_training_run_graphs_its_steps_but_not_its_logged_samples(dataset):
    recorder = Recorder()
    model = build_random_model(TINY_SD)
    model.model.use_cuda_graphs(sampling=False, make_graphed=recorder, device_type="cpu")
    losses(model, [batch_of(dataset, [0], [False])])
    generate(model.eval(), "a photo of *", n_samples=1, n_iter=1, steps=2, scale=7.5, eta=0.0, seed=0, height=32,
             width=32, precision="full", progress=False)
    assert len(recorder.recorded) == 1 and recorder.recorded[0]["samples"][2].requires_grad


def test_the_text_encoder_stays_eager_when_sampling_trainable_moved_or_failing(dataset, capsys):
    recorder = Recorder()
    model = graphed_model(recorder, "text encoder")
    batch = batch_of(dataset, [0], [False])
    generate(model.eval(), "a photo of *", n_samples=1, n_iter=1, steps=2, scale=7.5, eta=0.0, seed=0, height=32,
             width=32, precision="full", progress=False)
    model.cond_stage_model.requires_grad_(True)  # e.g. pretraining the text encoder
    losses(model.train(), [batch])
    assert recorder.recorded == []
    model.cond_stage_model.requires_grad_(False)
    losses(model, [batch])
    model.to("cpu")  # a move drops the recording
    losses(model, [batch])
    assert len(recorder.recorded) == 2
    failing = graphed_model(Recorder(fail=True), "text encoder")
    for _ in range(2):
        losses(failing, [batch])[0].backward()
    assert capsys.readouterr().out.count("cuda_graphs: recording the text encoder failed") == 1
    assert failing.cond_stage_model.graphed_encoder.failed


def replayed(function, samples, **options):
    """Stands in for make_graphed_callables where ops are counted: a replay is one op forward and one backward,
    whatever the recorded function computes (on CUDA: copies into the static inputs and one graph launch)."""
    output = function(*samples)
    wanting = [sample for sample in samples if sample.requires_grad]
    grads = iter(torch.autograd.grad(output, wanting, torch.ones_like(output)) if wanting else ())
    static_grads = [next(grads) if sample.requires_grad else None for sample in samples]
    static_output = output.detach()

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            return static_output.clone()

        @staticmethod
        def backward(ctx, grad):
            return tuple(None if static is None else static.clone() for static in static_grads)

    return lambda *inputs: Replay.apply(*inputs)


class OpCount(TorchDispatchMode):
    """Ops that launch work (views and autograd's bookkeeping aside)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_graphed_training_step_launches_under_a_hundred_ops_outside_its_replays(dataset):
    """At batch 1 a step is bound by launches: with both networks replayed, what stays eager (the learned words'
    placement, noise and loss, AdamW, the norm cap) must stay small, whatever the networks' depth."""
    batch = batch_of(dataset, [0], [False])
    counts = {}
    for graphed in (False, True):
        model = build_random_model(TINY_SD)
        model.learning_rate = 1e-3
        if graphed:
            for network in (model.model, model.cond_stage_model):
                network.use_cuda_graphs(make_graphed=replayed, device_type="cpu")
        optimizer = model.configure_optimizers()

        def step(seed):
            model.shared_step(batch, torch.Generator().manual_seed(seed))[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.embedding_manager.apply_norm_cap()

        step(0)  # records
        with OpCount() as counted:
            step(1)
        counts[graphed] = sum(counted.ops.values())
    assert counts[False] > 700  # the tiny model's eager step (SD v1's: about 2,000)
    assert counts[True] <= 100, counts  # 91 at the time of writing


def test_torch_without_a_capture_mode_argument_records_thread_local_too(dataset, monkeypatch):
    """torch 2.11's make_graphed_callables takes no capture mode and records with torch.cuda.graph's default
    ("global"), where the data loader's pin-memory thread calling CUDA would break the recording."""
    monkeypatch.setattr(cuda_graphs, "_CAPTURE_OPTIONS", {})
    modes = []

    def recorder(function, samples, **options):
        assert options == {}
        modes.append(inspect.signature(torch.cuda.graph.__init__).parameters["capture_error_mode"].default)
        return function

    vector_gradient(graphed_model(recorder), batch_of(dataset, [0, 1], [False, True]), torch.float32)
    assert modes == ["thread_local"]
    assert inspect.signature(torch.cuda.graph.__init__).parameters["capture_error_mode"].default == "global"


def test_inference_mode_gets_its_own_recording():
    """Lightning validates (and logs images) under inference mode; a recording made there holds inference
    tensors that a replay under no_grad could not refill."""
    recorder = Recorder()
    model = graphed_model(recorder)
    unet = model.model.graphed_unet
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 32)
    with torch.inference_mode():
        unet(x, t, context)
    with torch.no_grad():
        unet(x, t, context)
    assert len(recorder.recorded) == 2


def test_autocast_gets_its_own_recording():
    """A recording replays the precision it was made in: the same shapes with and without autocast (a float32
    sampling call after bf16 training, say) must not replay each other's graph."""
    recorder = Recorder()
    unet = graphed_model(recorder).model.graphed_unet
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 32)
    with torch.no_grad():
        unet(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unet(x, t, context)
        with torch.autocast("cpu", dtype=torch.float16):
            unet(x, t, context)
    assert [r["autocast"] for r in recorder.recorded] == [False, True, True]
