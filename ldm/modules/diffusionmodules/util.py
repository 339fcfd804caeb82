"""Building blocks of the diffusion UNet, some also used by the autoencoder, the transformer blocks and DDPM:
noise schedules, timestep embeddings, layer factories, group norms and gradient checkpointing, with the names and
numerics of CompVis latent-diffusion."""
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ldm.modules.lean_ops import (
    LeanConv1d,
    LeanConv2d,
    autocast_disabled,
    channels_last_group_norm,
    group_norm_silu,
    shares_dtype,
    stays_channels_last,
)
from ldm.modules.weight_offload import uploaded


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Per-step noise variances beta_t as a float64 numpy array of length `n_timestep`.

    "linear" is LDM's "scaled linear" schedule: linear in sqrt(beta), computed in float64 with
    `torch.linspace` so the values match the released checkpoints' training schedule bit for bit.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas_cumprod = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"beta schedule '{schedule}' is unknown; use linear, cosine, sqrt_linear or sqrt")
    return betas.numpy()


def extract_into_tensor(a, t, x_shape):
    """Pick `a[t]` per batch element and shape it (B, 1, ..., 1) to broadcast against a tensor of `x_shape`."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim): cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zero a module's parameters in place, so a residual branch starts as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def conv_nd(dims, *args, **kwargs):
    """A 1-D (attention's qkv) or 2-D convolution that keeps no input for backward while its weights are frozen."""
    convs = {1: LeanConv1d, 2: LeanConv2d}
    if dims not in convs:
        raise ValueError(f"unsupported dims {dims}; use 1 or 2")
    return convs[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (kept as a factory so UNet code reads like the original)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1- or 2-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
    if dims not in pools:
        raise ValueError(f"unsupported dims {dims}; use 1 or 2")
    return pools[dims](*args, **kwargs)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels-last NCHW tensor, else contiguous_format (also where both describe x)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class GroupNorm32(nn.GroupNorm):
    """GroupNorm returned in the input's dtype, optionally followed by SiLU (`silu`).

    Inputs in the weights' dtype run the native kernel without keeping a float32 copy of half-precision inputs for
    backward (autocast would otherwise upcast them); with `silu` the pair keeps only what the norm's backward
    needs. The kernel accumulates in float32; on the CPU it normalises with float32 statistics and rounds once, as
    the float32 path does, while on CUDA it rounds the mean and scale to the half dtype first, as a model run wholly
    in half precision does (`tests/test_cuda.py` bounds the difference). Other mixes (half activations, float32
    weights) compute in float32 and cast back, as LDM does."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, silu=False):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.silu = silu

    def forward(self, x):
        if shares_dtype(x, self.weight, self.bias):
            if stays_channels_last(x):
                return channels_last_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
            with autocast_disabled(x.device.type):
                if self.silu:
                    return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if stays_channels_last(x):
            normed = channels_last_group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)
        else:
            normed = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)
        return F.silu(normed) if self.silu else normed


def upsample_nearest(x, size=None, scale_factor=None):
    """Nearest-neighbour upsampling in x's own dtype: a copy, so exact in any precision. (CUDA autocast runs it in
    float32, which writes twice the bytes and makes the next layer cast them back.)"""
    with autocast_disabled(x.device.type):
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="nearest")


def normalization(channels):
    """The UNet's standard normalisation: 32 groups, float32 statistics."""
    return GroupNorm32(32, channels)


def normalization_and_silu(channels):
    """GroupNorm then SiLU as one lean op, and an identity in the place LDM's separate nn.SiLU held, so that the
    Sequential around them keeps LDM's indices (and checkpoint keys)."""
    return GroupNorm32(32, channels, silu=True), nn.Identity()


def checkpoint(func, inputs, module, flag):
    """Run `func(*inputs)`, a method of `module`, recomputing its activations in the backward pass when `flag` is
    set.

    Uses PyTorch's non-reentrant checkpointing, which gives correct gradients even when every weight is
    frozen and only an input (for example the text conditioning in Textual Inversion) requires grad; the
    original repository had to switch checkpointing off for that case. Where an offloaded UNet keeps the
    module's weights in CPU memory, the recomputation gets device copies (`weight_offload.uploaded`).
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            func, *inputs, use_reentrant=False, context_fn=lambda: (nullcontext(), uploaded(module))
        )
    return func(*inputs)
