"""The diffusion UNet of latent-diffusion / Stable Diffusion v1 (after OpenAI's improved-diffusion UNet).

Constructor arguments, submodule names and the head-count rules are those of CompVis' `openaimodel.py`,
so `model.diffusion_model.*` weights of real SD v1 and LDM text2img checkpoints load key for key.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import GEGLU, CrossAttention, SpatialTransformer, attention_kernel_order
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    normalization_and_silu,
    timestep_embedding,
    upsample_nearest,
    zero_module,
)


class TimestepBlock(nn.Module):
    """Marks blocks whose forward is `forward(x, emb)`: they also take the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential container that hands the timestep embedding and the context to the layers that use them."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        x = upsample_nearest(x, scale_factor=2)
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided conv or average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, channels, out_channels, 3, stride=2, padding=padding)
        elif channels == out_channels:
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)
        else:
            raise ValueError(f"Downsample without a conv cannot change channels ({channels} -> {out_channels})")

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling on the way.

    With `use_scale_shift_norm` the embedding scales and shifts the normalised features (FiLM); otherwise it
    is added to them.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            *normalization_and_silu(channels), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            # With scale-shift the embedding comes between the norm and the SiLU (see _forward).
            *((normalization(self.out_channels), nn.SiLU()) if use_scale_shift_norm
              else normalization_and_silu(self.out_channels)),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self, self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv, num_heads, legacy_order):
    """Self-attention over the positions of a fused (B, 3*heads*ch, T) qkv tensor; returns (B, heads*ch, T).

    The legacy order packs q, k, v per head ([q0 k0 v0 q1 k1 v1 ...]); the new order packs them by role
    ([q0 q1 ... k0 k1 ... v0 v1 ...]). Checkpoints depend on which one was trained.
    """
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(batch, num_heads, 3, ch, length).unbind(dim=2)
    else:
        q, k, v = qkv.reshape(batch, 3, num_heads, ch, length).unbind(dim=1)
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention without conditioning, used by UNets that have no spatial transformer."""

    def __init__(
        self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, use_new_attention_order=False
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels == 0:
            self.num_heads = channels // num_head_channels
        else:
            raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self, self.use_checkpoint)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order)
        return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


def attention_head_layout(channels, num_heads, num_head_channels, legacy, use_spatial_transformer):
    """(heads, dim_head) of an attention layer with `channels` channels, by the original UNet's rules.

    A fixed `num_head_channels` wins over `num_heads`. In `legacy` mode a spatial transformer gets
    channels // heads and an AttentionBlock gets `num_head_channels` as is (-1 meaning "use num_heads").
    """
    if num_head_channels == -1:
        dim_head = channels // num_heads
    else:
        num_heads = channels // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = channels // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


class UNetModel(nn.Module):
    """The full UNet with timestep embedding, optional class labels and optional text cross-attention.

    `use_fp16` is accepted so original configs load, but has no effect: precision is chosen by autocast or
    the trainer. `n_embed` (codebook-index prediction) is not supported.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=-1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        n_embed=None,
        legacy=True,
        recompute_feedforward=False,
        attention_backend="auto",
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer needs context_dim (the conditioning width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("UNetModel: context_dim is set but use_spatial_transformer is False; set it to True")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        if n_embed is not None:
            raise ValueError("UNetModel: n_embed (codebook-index prediction) is not supported; remove it")
        if dims != 2:
            raise ValueError(f"UNetModel: dims must be 2 (image latents), got {dims}; remove it or set it to 2")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        time_embed_dim = model_channels * 4

        def attention(ch, upsample=False):
            heads, dim_head = attention_head_layout(ch, num_heads, num_head_channels, legacy, use_spatial_transformer)
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim, use_checkpoint=use_checkpoint
                )
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=num_heads_upsample if upsample else heads,
                num_head_channels=dim_head,
                use_new_attention_order=use_new_attention_order,
            )

        def res_block(ch, out_ch, **kwargs):
            return ResBlock(
                ch,
                time_embed_dim,
                dropout,
                out_channels=out_ch,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, upsample=True))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims=dims)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            *normalization_and_silu(ch), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )
        for module in self.modules():  # a memory lever of our own: GEGLU keeps its input, not its projection
            if isinstance(module, GEGLU):
                module.recompute_projection = recompute_feedforward
        self.use_attention_backend(attention_backend)

    def use_attention_backend(self, backend: str):
        """Which scaled_dot_product_attention kernel the transformer blocks try first (`ATTENTION_BACKENDS`)."""
        attention_kernel_order(backend, 0)  # an unknown name is refused even in a UNet without attention
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.kernel_order = attention_kernel_order(backend, module.dim_head)

    def forward(self, x, timesteps, context=None, y=None):
        """Predict the noise (or x0) for latents `x` (B, C, H, W) at `timesteps` (B,) given `context` (B, L, D)
        and, for class-conditional models, labels `y` (B,)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNetModel.forward: pass class labels y exactly when the model has num_classes")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
