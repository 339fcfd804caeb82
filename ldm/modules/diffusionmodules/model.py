"""Convolutional encoder and decoder of the first-stage autoencoders (KL and VQ).

Module and parameter names follow CompVis latent-diffusion / stable-diffusion v1 so that the
`first_stage_model.encoder.*` and `first_stage_model.decoder.*` weights of real checkpoints load key for key.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import GroupNorm32, memory_format_of, upsample_nearest

nonlinearity = F.silu


def Normalize(in_channels):
    """GroupNorm with 32 groups and eps 1e-6, the normalisation every block of the original uses."""
    return GroupNorm32(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = upsample_nearest(x, scale_factor=2.0)
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by average pooling without one.

    The convolution pads only right and bottom, as the original does, so that pretrained weights see the
    same pixels.
    """

    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 (or 3x3) shortcut convolution matches channel counts."""

    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def shortcut(self, x):
        if self.in_channels == self.out_channels:
            return x
        return self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convolutions as projections."""

    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        # (b, 1 head, H*W, c) with contiguous channels: the fused SDPA kernels take nothing else, and the math
        # fallback would hold the (H*W)^2 scores in float32 (2 GiB per image at 1024 px).
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(2, 3).contiguous()
                   for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        # In x's layout: the channels-last view would otherwise spread through every later layer (the decoder's
        # whole upsampling path), each convolution converting its weights and input at every call.
        h = h.transpose(2, 3).reshape(b, c, height, width).contiguous(memory_format=memory_format_of(x))
        return x + self.proj_out(h)


def make_attn(in_channels, attn_type="vanilla"):
    """Build the attention block named by a ddconfig; only the original's default kind is implemented."""
    if attn_type != "vanilla":
        raise ValueError(
            f"attn_type '{attn_type}' is not supported: only 'vanilla' attention is implemented; "
            "set attn_type: vanilla and use_linear_attn: false in the first-stage ddconfig"
        )
    return AttnBlock(in_channels)


def _resolution_level(blocks, attentions, resample_name, resample):
    """One resolution of the encoder or decoder, as the `down.{i}` / `up.{i}` modules of the original.

    The last level has no resampling; it gets an `nn.Identity`, which adds no state-dict keys.
    """
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attentions)
    setattr(level, resample_name, resample)
    return level


def _run_blocks(level, h):
    """Run a level's ResNet blocks, each followed by its attention block where the level has them."""
    for index, block in enumerate(level.block):
        h = block(h)
        if level.attn:
            h = level.attn[index](h)
    return h


def _middle(channels, dropout, attn_type):
    """ResNet - attention - ResNet at the lowest resolution, present in every encoder and decoder."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    return mid


def _run_middle(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image to latent moments: `2 * z_channels` channels (mean and log-variance) when `double_z`."""

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, double_z=True, use_linear_attn=False,
                 attn_type="vanilla", **ignore_kwargs):
        super().__init__()
        attn_type = "linear" if use_linear_attn else attn_type
        num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        current_resolution = resolution
        self.down = nn.ModuleList()
        for i_level in range(num_resolutions):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                          dropout=dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attentions.append(make_attn(block_in, attn_type))
            if i_level != num_resolutions - 1:
                downsample = Downsample(block_in, resamp_with_conv)
                current_resolution //= 2
            else:
                downsample = nn.Identity()
            self.down.append(_resolution_level(blocks, attentions, "downsample", downsample))

        self.mid = _middle(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(_run_blocks(level, h))
        h = _run_middle(self.mid, h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent to image; `up[i]` is resolution level i, so the loop runs over it in reverse as the original."""

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, give_pre_end=False, tanh_out=False,
                 use_linear_attn=False, attn_type="vanilla", **ignore_kwargs):
        super().__init__()
        attn_type = "linear" if use_linear_attn else attn_type
        num_resolutions = len(ch_mult)
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _middle(block_in, dropout, attn_type)

        levels = []
        for i_level in reversed(range(num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                          dropout=dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attentions.append(make_attn(block_in, attn_type))
            if i_level != 0:
                upsample = Upsample(block_in, resamp_with_conv)
                current_resolution *= 2
            else:
                upsample = nn.Identity()
            levels.insert(0, _resolution_level(blocks, attentions, "upsample", upsample))
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(_run_blocks(level, h))
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
