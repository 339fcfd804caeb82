"""The lean UNet layers compute what the stock layers compute, gradients included, and keep less for backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import GroupNorm32, upsample_nearest
from ldm.modules.lean_ops import (LayerNorm, LeanConv1d, LeanConv2d, channels_last_group_norm, gated_gelu,
                                  group_norm_silu, native_layer_norms, projected_gated_gelu)


def kept_for_backward(run) -> list[torch.Tensor]:
    """The tensors autograd keeps while `run()` builds its graph (the graph stays alive while they are counted)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        output = run()
    return kept, output


def frozen_twin(lean_class, stock: nn.Module) -> nn.Module:
    lean = lean_class(stock.in_channels, stock.out_channels, stock.kernel_size, stride=stock.stride,
                      padding=stock.padding, groups=stock.groups)
    lean.load_state_dict(stock.state_dict())
    return lean.requires_grad_(False), stock.requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lean_class, stock_class, shape, settings", [
    (LeanConv2d, nn.Conv2d, (2, 8, 12, 12), {"kernel_size": 3, "padding": 1}),
    (LeanConv2d, nn.Conv2d, (2, 8, 12, 12), {"kernel_size": 3, "padding": 1, "stride": 2}),
    (LeanConv2d, nn.Conv2d, (2, 8, 12, 12), {"kernel_size": 1, "groups": 4}),
    (LeanConv1d, nn.Conv1d, (2, 8, 20), {"kernel_size": 1}),
])
def test_frozen_lean_conv_matches_the_stock_conv_and_keeps_only_its_weight(lean_class, stock_class, shape, settings,
                                                                             dtype):
    torch.manual_seed(0)
    lean, stock = frozen_twin(lean_class, stock_class(8, 16, **settings))
    lean.to(dtype), stock.to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    grad_output = None
    results = []
    for conv in (stock, lean):
        kept, output = kept_for_backward(lambda conv=conv: conv(x))
        if grad_output is None:
            grad_output = torch.randn_like(output)
        (grad,) = torch.autograd.grad(output, x, grad_output)
        results.append((kept, output, grad))
    (stock_kept, stock_out, stock_grad), (lean_kept, lean_out, lean_grad) = results
    assert torch.equal(lean_out, stock_out) and torch.equal(lean_grad, stock_grad)
    assert any(t.shape == x.shape for t in stock_kept)
    assert [t.shape for t in lean_kept] == [lean.weight.shape]


def test_lean_conv_under_autocast_over_float32_weights_matches_the_stock_conv():
    torch.manual_seed(0)
    lean, stock = frozen_twin(LeanConv2d, nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    grads = []
    for conv in (stock, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = conv(x)
        assert output.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(output.float().square().sum(), x)[0])
    assert grads[0].dtype == grads[1].dtype == torch.float32
    assert torch.equal(grads[0], grads[1])


def test_lean_conv_with_trainable_weights_is_the_stock_conv():
    torch.manual_seed(0)
    conv = LeanConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    kept, output = kept_for_backward(lambda: conv(x))
    assert any(t.shape == x.shape for t in kept)
    output.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None


def stock_gated_gelu(projected):
    value, gate = projected.chunk(2, dim=-1)
    return value * F.gelu(gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_gelu_matches_geglu_bit_for_bit_and_keeps_only_its_input(dtype):
    torch.manual_seed(0)
    projected = torch.randn(2, 16, 24, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(2, 16, 12, dtype=dtype)
    outputs, grads, kept = [], [], []
    for function in (stock_gated_gelu, gated_gelu):
        saved, output = kept_for_backward(lambda function=function: function(projected))
        outputs.append(output)
        grads.append(torch.autograd.grad(output, projected, grad_output)[0])
        kept.append(sum(t.numel() for t in saved))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
    assert kept == [projected.numel() + projected.numel() // 2, projected.numel()]


def test_gated_gelu_without_gradients_is_plain():
    projected = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(gated_gelu(projected), stock_gated_gelu(projected))


@pytest.mark.parametrize("weights_dtype, autocast", [(torch.float32, False), (torch.bfloat16, True),
                                                    (torch.float32, True)])
def test_projected_gated_gelu_keeps_the_input_and_matches_linear_then_gated_gelu(weights_dtype, autocast):
    torch.manual_seed(0)
    projection = nn.Linear(16, 64).to(weights_dtype).requires_grad_(False)
    x = torch.randn(2, 10, 16, dtype=weights_dtype, requires_grad=True)
    grad_output = torch.randn(2, 10, 32)
    results = []
    for function in (lambda: gated_gelu(projection(x)), lambda: projected_gated_gelu(x, projection)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kept, output = kept_for_backward(function)
        results.append((kept, output, torch.autograd.grad(output, x, grad_output.to(output.dtype))[0]))
    (stock_kept, stock_out, stock_grad), (lean_kept, lean_out, lean_grad) = results
    assert torch.equal(lean_out, stock_out) and torch.equal(lean_grad, stock_grad)
    activations = lambda kept: [t.shape for t in kept if t.ndim == 3]  # noqa: E731
    assert activations(stock_kept) == [(2, 10, 64)] and activations(lean_kept) == [(2, 10, 16)]


def test_projected_gated_gelu_with_a_trainable_projection_is_the_plain_pair():
    projection = nn.Linear(8, 32)
    x = torch.randn(3, 8, requires_grad=True)
    projected_gated_gelu(x, projection).sum().backward()
    assert projection.weight.grad is not None and x.grad is not None


def test_gated_gelu_backward_allocates_nothing_but_its_gradient():
    """SD v1's training step peaks in GEGLU's backward, so it computes in place in the gradient's two halves."""
    projected = torch.randn(2, 64, 512, requires_grad=True)
    output = gated_gelu(projected)
    grad_output = torch.randn_like(output)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        (grad,) = torch.autograd.grad(output, projected, grad_output)
    allocated = sum(event.self_cpu_memory_usage for event in profile.events() if event.self_cpu_memory_usage > 0)
    assert projected.nbytes <= allocated < 1.1 * projected.nbytes
    (stock_grad,) = torch.autograd.grad(stock_gated_gelu(projected), projected, grad_output)
    assert torch.equal(grad, stock_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_on_half_inputs_and_weights_runs_natively_without_a_float32_copy(dtype, monkeypatch):
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1), norm.bias.normal_(0, 0.1)
    norm.to(dtype).requires_grad_(False)
    x = (torch.randn(2, 16, 8, 8) * 3 + 1).to(dtype).requires_grad_(True)
    recorder = AutocastAtCalls(monkeypatch, "group_norm")  # CUDA's autocast would run it in float32: step out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, output = kept_for_backward(lambda: norm(x))
    assert recorder.autocast_on["group_norm"] is False
    assert output.dtype == dtype
    assert all(t.dtype != torch.float32 or t.numel() < x.numel() for t in kept)  # only per-group statistics in fp32
    reference = F.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), norm.eps).to(dtype)
    torch.testing.assert_close(output, reference, rtol=0, atol=torch.finfo(dtype).eps * 8)
    (grad,) = torch.autograd.grad(output.float().square().sum(), x)
    (reference_grad,) = torch.autograd.grad(reference.float().square().sum(), x)
    torch.testing.assert_close(grad, reference_grad, rtol=2e-2, atol=2e-2)


def test_group_norm_with_float32_weights_on_half_inputs_computes_in_float32():
    norm = GroupNorm32(4, 16)
    x = torch.randn(2, 16, 8, 8).bfloat16()
    expected = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_silu_matches_the_two_ops_bit_for_bit_and_keeps_no_normed_copy(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 6, 6) * 2 + 0.5).to(dtype).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(16)).to(dtype).requires_grad_(True)  # trainable too, as in pretraining
    bias = (0.1 * torch.randn(16)).to(dtype).requires_grad_(True)
    grad_output = torch.randn(2, 16, 6, 6, dtype=dtype)
    results = []
    for function in (lambda: F.silu(F.group_norm(x, 4, weight, bias, 1e-5)),
                     lambda: group_norm_silu(x, 4, weight, bias, 1e-5)):
        kept, output = kept_for_backward(function)
        results.append((kept, output, torch.autograd.grad(output, (x, weight, bias), grad_output)))
    (stock_kept, stock_out, stock_grads), (lean_kept, lean_out, lean_grads) = results
    assert torch.equal(lean_out, stock_out)
    for lean_grad, stock_grad in zip(lean_grads, stock_grads):
        assert torch.equal(lean_grad, stock_grad)
    activations = lambda kept: sum(t.numel() for t in kept if t.shape == x.shape)  # noqa: E731
    assert activations(stock_kept) == 2 * x.numel() and activations(lean_kept) == x.numel()


def test_group_norm_silu_without_gradients_is_plain():
    x = torch.randn(1, 8, 4, 4)
    weight, bias = torch.ones(8), torch.zeros(8)
    with torch.no_grad():
        assert torch.equal(group_norm_silu(x, 2, weight, bias, 1e-6), F.silu(F.group_norm(x, 2, weight, bias, 1e-6)))


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("offset", [0.0, 8.0])
def test_channels_last_group_norm_matches_the_native_kernel(dtype, silu, offset):
    """Output and gradients (input, weight, bias) of the channels-last GroupNorm against the native kernel in
    float64: float64 and float32 to their rounding, bf16 within what rounding the mean and scale to bf16 adds (about
    (1 + |mean|/std) bf16 ulps, as CUDA's native kernel does); everything it hands back stays channels-last."""
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 6, 5, dtype=torch.float64) * 2 + offset).to(dtype)
    weight = (1 + 0.2 * torch.randn(64, dtype=torch.float64)).to(dtype)
    bias = (0.2 * torch.randn(64, dtype=torch.float64)).to(dtype)
    grad_output = torch.randn(2, 64, 6, 5, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)
    results = []
    for inputs, function in (
            ((x.to(memory_format=torch.channels_last), weight, bias),
             lambda x, w, b: channels_last_group_norm(x, 8, w, b, 1e-5, silu)),
            ((x.double(), weight.double(), bias.double()),
             lambda x, w, b: (F.silu if silu else nn.Identity())(F.group_norm(x, 8, w, b, 1e-5)))):
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        output = function(*inputs)
        results.append((output, torch.autograd.grad(output, inputs, grad_output.to(output.dtype))))
    (output, grads), (reference, reference_grads) = results
    assert is_channels_last(output) and is_channels_last(grads[0])
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 4 * 2.0 ** -8 * (1 + offset / 2)}[dtype]
    for value, expected in ((output, reference), *zip(grads, reference_grads)):
        assert value.dtype == dtype
        assert (value.double() - expected).abs().max() <= tolerance * expected.abs().max()


def test_channels_last_group_norm_keeps_only_its_input_and_statistics():
    x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    kept, _ = kept_for_backward(lambda: channels_last_group_norm(x, 4, torch.ones(32), torch.zeros(32), 1e-5, True))
    assert sum(t.numel() for t in kept if t.numel() >= x.numel()) == x.numel()


def test_group_norm32_keeps_a_channels_last_input_channels_last():
    """CUDA's native kernel hands back NCHW (and the lean GroupNorm+SiLU works in NCHW everywhere): GroupNorm32
    computes channels-last inputs itself, in either of its precisions, and leaves NCHW inputs to the native kernel."""
    torch.manual_seed(0)
    for silu in (False, True):
        norm = GroupNorm32(4, 16, silu=silu)
        for x, weights in ((torch.randn(2, 16, 6, 6), torch.float32), (torch.randn(2, 16, 6, 6).bfloat16(), torch.float32),
                           (torch.randn(2, 16, 6, 6).bfloat16(), torch.bfloat16)):
            norm.to(weights)
            expected = norm(x)
            assert expected.is_contiguous()
            output = norm(x.to(memory_format=torch.channels_last))
            assert is_channels_last(output) and output.dtype == x.dtype
            torch.testing.assert_close(output, expected, rtol=0, atol=8 * torch.finfo(x.dtype).eps)


class AutocastAtCalls:
    """Records, for each `torch.nn.functional` function named, whether CPU autocast was on when it was first called.
    (A dispatch mode cannot tell: it runs below autocast's dispatch key, where autocast always reads as off.)"""

    def __init__(self, monkeypatch, *names):
        self.autocast_on = {}
        for name in names:
            monkeypatch.setattr(F, name, self._recorded(name, getattr(F, name)))

    def _recorded(self, name, function):
        def recorded(*args, **kwargs):
            self.autocast_on.setdefault(name, torch.is_autocast_enabled("cpu"))
            return function(*args, **kwargs)
        return recorded


def test_cuda_autocast_runs_layer_norm_and_nearest_upsampling_in_float32():
    """Why `LayerNorm` and `upsample_nearest` step out of autocast: CUDA's policy has float32 kernels for both
    (the CPU's has none, which is why a CPU run of the stock layers shows no float32 copies)."""
    for op in ("aten::layer_norm", "aten::group_norm", "aten::upsample_nearest2d"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_in_its_weights_dtype_runs_natively_with_the_float32_paths_values(dtype, monkeypatch):
    torch.manual_seed(0)
    norm = LayerNorm(32)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1), norm.bias.normal_(0, 0.1)
    norm.to(dtype).requires_grad_(False)
    x = (torch.randn(2, 10, 32) * 3 + 1).to(dtype).requires_grad_(True)
    recorder = AutocastAtCalls(monkeypatch, "layer_norm")
    with torch.autocast("cpu", dtype=dtype):
        kept, output = kept_for_backward(lambda: norm(x))
    assert recorder.autocast_on["layer_norm"] is False
    assert output.dtype == dtype
    assert all(t.dtype != torch.float32 or t.numel() < x.numel() for t in kept)  # fp32 mean and rstd only
    # What CUDA autocast computes: float32 input and weights, the output rounded when the next linear casts it.
    reference = F.layer_norm(x.float(), (32,), norm.weight.float(), norm.bias.float(), norm.eps)
    assert torch.equal(output, reference.to(dtype))
    grad_output = torch.randn_like(output)
    (grad,) = torch.autograd.grad(output, x, grad_output)
    (reference_grad,) = torch.autograd.grad(reference, x, grad_output.float())
    torch.testing.assert_close(grad, reference_grad.to(dtype), rtol=0, atol=torch.finfo(dtype).eps * 8)


def test_layer_norm_with_other_dtypes_is_nn_layer_norm():
    torch.manual_seed(0)
    norm = LayerNorm(16)
    stock = nn.LayerNorm(16)
    stock.load_state_dict(norm.state_dict())
    x = torch.randn(3, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), stock(x))  # float32 weights, bf16 input: autocast decides, as for the stock one
    assert torch.equal(norm(x.float()), stock(x.float()))
    assert list(norm.state_dict()) == ["weight", "bias"]


def test_native_layer_norms_converts_in_place_and_keeps_the_state():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Sequential(nn.LayerNorm(4)))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    assert native_layer_norms(model) is model
    assert type(model[1]) is LayerNorm and type(model[2][0]) is LayerNorm and type(model[0]) is nn.Linear
    assert list(model.parameters()) == parameters
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("size, scale_factor", [(None, 2), ((8, 10), None)])
def test_nearest_upsampling_keeps_the_dtype_and_copies_exactly(size, scale_factor, monkeypatch):
    x = torch.randn(2, 3, 4, 5).bfloat16()
    recorder = AutocastAtCalls(monkeypatch, "interpolate")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upsampled = upsample_nearest(x, size=size, scale_factor=scale_factor)
    assert recorder.autocast_on == {"interpolate": False}
    assert upsampled.dtype == torch.bfloat16
    assert torch.equal(upsampled, F.interpolate(x.float(), size=size, scale_factor=scale_factor).bfloat16())
