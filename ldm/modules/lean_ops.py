"""Layers of the UNet and the text encoders that keep less for the backward pass and compute the same values.

Textual inversion backpropagates through a frozen UNet to its text conditioning, so the activations autograd keeps
between the forward and the backward are most of the training memory. Stock layers keep more than that backward
needs (SD v1 at batch 1 under bf16 autocast on a GPU: about 875 MiB kept, 432 MiB of it avoidable;
`scripts/activation_memory.py`):
- a convolution keeps its input for the weight gradient even when the weight is frozen (`LeanConv`: keeps nothing
  but the weight, which is a parameter anyway);
- GEGLU keeps both the projection and GELU(gate) (`gated_gelu`: keeps the projection, recomputes the GELU; with
  the UNet's `recompute_feedforward`, `projected_gated_gelu` keeps the projection's input, an eighth of its size
  in SD v1, and recomputes the projection too, for one more matmul);
- a float32 GroupNorm on half-precision activations keeps a float32 copy of its input (`GroupNorm32` in util.py
  runs half inputs natively when its weights are half too: the CPU kernel normalises with float32 statistics and
  rounds once; the CUDA kernel rounds its mean and scale to the half dtype first, as a model run wholly in half
  precision does, which adds about |mean|/std half-precision ulps to the output's own rounding);
- the SiLU after a GroupNorm keeps the norm's output (`group_norm_silu`: recomputes it from what the norm keeps);
- CUDA autocast runs layer_norm in float32 whatever its weights, so it keeps a float32 copy of a half input and
  hands a float32 output to linears that cast it back (`LayerNorm`: runs in its weights' dtype when the input
  shares it). The CPU's autocast does not upcast, so a CPU measurement of the stock layer does not show this.
Each layer's gradient comes from the same kernels on the same values as the stock layer's, bit for bit; through a
whole UNet they agree to float32 rounding, as autograd may add up a tensor's gradients in another order. The
native LayerNorm's output is the float32 path's rounded once to the half dtype, which the next linear's cast
makes of it anyway; its input gradient sums the gradients of the linears it feeds in the half dtype rather than
in float32 (as a model stored and run in bf16 does).
With `channels_last`, GroupNorm runs `channels_last_group_norm`, which keeps the layout (CUDA's native kernel
takes NCHW only) and what the native norm keeps for backward; its arithmetic is its own, within the native
kernel's rounding (float32) and CUDA's (half precision: mean and scale rounded to the half dtype).
"""
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d}


def autocast_disabled(device_type: str):
    """Autocast switched off for `device_type`; nothing to switch off where it has no autocast (e.g. "meta", on
    which FLOPs and shapes are counted)."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_state(device_type: str):
    """What `torch.autocast` needs to recreate the current autocast state of `device_type` (None: it has none)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    return {"device_type": device_type, "dtype": torch.get_autocast_dtype(device_type),
            "enabled": torch.is_autocast_enabled(device_type)}


def shares_dtype(x: torch.Tensor, *parameters) -> bool:
    """Whether every given parameter (None for an absent one) has x's dtype, so a norm can run natively in it."""
    return all(p is None or p.dtype == x.dtype for p in parameters)


class _ConvFrozenWeight(torch.autograd.Function):
    """A convolution whose backward computes the input gradient only, from the weight and the input's shape."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        output = _CONVOLUTIONS[weight.ndim - 2](input, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
        ctx.settings = (stride, padding, dilation, groups)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        # Autocast may have run the forward in another dtype than the stored weight; the backward runs in it too.
        weight = weight.to(grad_output.dtype)
        shape_only = grad_output.new_empty(1).expand(ctx.input_shape)  # convolution_backward reads only its shape
        grad_input = torch.ops.aten.convolution_backward(
            grad_output, shape_only, weight, None, stride, padding, dilation, False, [0] * (weight.ndim - 2),
            groups, (True, False, False),
        )[0]
        return grad_input.to(ctx.input_dtype), None, None, None, None, None, None


class LeanConv:
    """Mixin for nn.Conv1d/2d: with frozen weights and bias, keep no copy of the input for backward."""

    def _conv_forward(self, input, weight, bias):
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if (not frozen or not input.requires_grad or not torch.is_grad_enabled() or self.padding_mode != "zeros"
                or isinstance(self.padding, str)):
            return super()._conv_forward(input, weight, bias)
        return _ConvFrozenWeight.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class LeanConv1d(LeanConv, nn.Conv1d):
    pass


class LeanConv2d(LeanConv, nn.Conv2d):
    pass


def _gated_gelu_backward(grad_output, projected):
    """The stock graph's own two steps, mul's backward then gelu's, computed in place in the two halves of the
    gradient: SD v1's training step peaks here, so no temporaries and no halves to concatenate. (torch.compile
    cannot trace writes into halves, and plans its own buffers: it gets the same steps out of place.)"""
    value, gate = projected.chunk(2, dim=-1)
    if torch.compiler.is_compiling():
        grad_gate = torch.ops.aten.gelu_backward(grad_output * value, gate)
        return torch.cat([F.gelu(gate) * grad_output, grad_gate], dim=-1)
    grad = torch.empty_like(projected)
    grad_value, grad_gate = grad.chunk(2, dim=-1)
    torch.ops.aten.gelu.out(gate, out=grad_value).mul_(grad_output)
    torch.mul(grad_output, value, out=grad_gate)
    torch.ops.aten.gelu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    return grad


class _GatedGelu(torch.autograd.Function):
    """value * GELU(gate) for the two halves of the last dimension, keeping only the input for backward."""

    @staticmethod
    def forward(ctx, projected):
        value, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return value * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad_output):
        (projected,) = ctx.saved_tensors
        return _gated_gelu_backward(grad_output, projected)


class _ProjectedGatedGelu(torch.autograd.Function):
    """GEGLU with its frozen projection, keeping the projection's input (an eighth of its output in SD v1) and
    computing the projection again in backward, under the forward's autocast state."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.autocast = autocast_state(x.device.type)
        projected = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.input_dtype = x.dtype
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias = ctx.saved_tensors
        with nullcontext() if ctx.autocast is None else torch.autocast(**ctx.autocast):
            projected = F.linear(x, weight, bias)
        grad_projected = _gated_gelu_backward(grad_output, projected)
        # The linear's own input gradient: the gradient times the weight, in the dtype the forward computed in.
        grad_x = grad_projected.matmul(weight.to(grad_projected.dtype))
        return grad_x.to(ctx.input_dtype), None, None


def projected_gated_gelu(x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
    """gated_gelu(projection(x)); with a frozen projection, recomputed in backward instead of kept."""
    frozen = not any(p is not None and p.requires_grad for p in (projection.weight, projection.bias))
    if frozen and torch.is_grad_enabled() and x.requires_grad:
        return _ProjectedGatedGelu.apply(x, projection.weight, projection.bias)
    return gated_gelu(projection(x))


def gated_gelu(projected: torch.Tensor) -> torch.Tensor:
    """GEGLU's gate: first half of the last dimension times GELU of the second half."""
    if torch.is_grad_enabled() and projected.requires_grad:
        return _GatedGelu.apply(projected)
    value, gate = projected.chunk(2, dim=-1)
    return value * F.gelu(gate)


class _GroupNormSiLU(torch.autograd.Function):
    """SiLU(GroupNorm(x)) keeping only what the norm's backward needs; the norm's output is recomputed by the same
    kernel for the SiLU's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        x = x.contiguous()
        shape = (x.shape[0], x.shape[1], x[0, 0].numel(), groups)
        normed, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, *shape[:3], groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape, ctx.eps = shape, eps
        return F.silu(normed)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        batch, channels, pixels, groups = ctx.shape
        normed = torch.ops.aten.native_group_norm(x, weight, bias, batch, channels, pixels, groups, ctx.eps)[0]
        grad_normed = torch.ops.aten.silu_backward(grad_output.contiguous(), normed)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad_normed, x, mean, rstd, weight, batch, channels, pixels, groups, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_weight, grad_bias, None, None


def group_norm_silu(x, groups, weight, bias, eps):
    """SiLU(group_norm(x)), in x's dtype (weight and bias must share it)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _GroupNormSiLU.apply(x, weight, bias, groups, eps)
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """A channels-last (B, C, H, W) tensor as (B, H*W, groups, C/groups): a view, no copy (a copy for another
    layout, e.g. an incoming gradient in NCHW)."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, groups, channels // groups)


def _ungrouped(grouped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = like.shape
    return grouped.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def _per_channel(parameter, grouped, dtype):
    """A (C,) weight or bias as (1, 1, groups, C/groups) in `dtype`; None stays None."""
    return None if parameter is None else parameter.to(dtype).view(1, 1, *grouped.shape[2:])


def _normalize(grouped, weight, bias, mean, rstd):
    """(x - mean) * rstd * weight + bias as one multiply-add, in x's dtype (the scale and shift rounded to it, as
    CUDA's native kernel rounds its mean and scale)."""
    scale = rstd if weight is None else rstd * _per_channel(weight, grouped, rstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + _per_channel(bias, grouped, rstd.dtype)
    return torch.addcmul(shift.to(grouped.dtype), grouped, scale.to(grouped.dtype))


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """GroupNorm, and SiLU after it with `silu`, computed on a channels-last tensor where it lies; it keeps what the
    native norm keeps for backward (the input and the statistics) and, like _GroupNormSiLU, recomputes the norm's
    output for the SiLU's backward. The backward computes in float32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu):
        grouped = _grouped(x, groups)
        # One pass over x (Welford's, accumulating in float32); a half x gets its mean and variance rounded to its
        # dtype, as CUDA's native kernel rounds its mean and scale.
        variance, mean = torch.var_mean(grouped, dim=(1, 3), correction=0, keepdim=True)
        stats = torch.promote_types(x.dtype, torch.float32)
        mean, rstd = mean.to(stats), variance.to(stats).add(eps).rsqrt()
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        normed = _normalize(grouped, weight, bias, mean, rstd)
        return _ungrouped(F.silu(normed) if silu else normed, x)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grouped = _grouped(x, ctx.groups)
        grad = _grouped(grad_output, ctx.groups)
        if ctx.silu:
            grad = torch.ops.aten.silu_backward(grad, _normalize(grouped, weight, bias, mean, rstd))
        # Per (image, channel): the gradient's sum, and its sum against the normalised input.
        grad_sum = grad.sum(1, keepdim=True, dtype=rstd.dtype)
        grad_dot_normed = ((grad * grouped).sum(1, keepdim=True, dtype=rstd.dtype) - mean * grad_sum) * rstd
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d/dx of the norm: rstd * (g*w - mean(g*w) - normed * mean(g*w*normed)), the means over each group,
            # as one multiply-add per element: a * g + b * x + c.
            scale = rstd if weight is None else rstd * _per_channel(weight, grouped, rstd.dtype)
            count = grouped.shape[1] * grouped.shape[3]
            mean_grad = (grad_sum * scale).sum(3, keepdim=True) / count
            mean_grad_normed = (grad_dot_normed * scale).sum(3, keepdim=True) / count
            b = -rstd * mean_grad_normed
            c = -mean * b - mean_grad
            grad_x = _ungrouped(torch.addcmul(torch.addcmul(c, grouped, b), grad, scale).to(x.dtype), x)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = grad_dot_normed.sum(0).reshape(-1).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_sum.sum(0).reshape(-1).to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


def channels_last_group_norm(x, groups, weight, bias, eps, silu=False):
    """group_norm(x) (then SiLU, with `silu`) of a channels-last x, in x's dtype, handed back channels-last."""
    with autocast_disabled(x.device.type):
        return _ChannelsLastGroupNorm.apply(x, weight, bias, groups, eps, silu)


def stays_channels_last(x: torch.Tensor) -> bool:
    """Whether a GroupNorm of x should run `channels_last_group_norm`: x is channels-last (and not also NCHW, as a
    1x1 image is). CUDA's native kernel takes NCHW only: it would copy x to NCHW and hand back NCHW, for the next
    convolution (channels-last weights) to convert back, two copies of every activation per norm in forward and
    again in backward; the lean GroupNorm+SiLU (`_GroupNormSiLU`) works in NCHW on every device."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that runs in its weights' dtype, autocast or not, when the input has that dtype too.

    The native half-precision kernel accumulates in float32 and rounds its output once, the values the float32
    path (CUDA autocast's choice) yields once the next linear casts them back; it keeps the half input for
    backward instead of a float32 copy. Other mixes run as nn.LayerNorm does."""

    def forward(self, x):
        if not shares_dtype(x, self.weight, self.bias):
            return super().forward(x)
        with autocast_disabled(x.device.type):
            return super().forward(x)


def native_layer_norms(module: nn.Module) -> nn.Module:
    """Make every nn.LayerNorm inside `module` (a third-party model, e.g. transformers' CLIP) a `LayerNorm`, in
    place: the subclass adds no state, so parameters, names and checkpoints stay as they are."""
    for submodule in module.modules():
        if type(submodule) is nn.LayerNorm:
            submodule.__class__ = LayerNorm
    return module
