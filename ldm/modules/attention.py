"""Cross-attention transformer blocks that let the diffusion UNet read the text conditioning.

Module and parameter names follow CompVis stable-diffusion v1 / latent-diffusion so that
`model.diffusion_model.*` weights load key for key; attention itself runs through PyTorch's fused
`scaled_dot_product_attention` instead of an explicit softmax.
"""
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, memory_format_of, zero_module
from ldm.modules.lean_ops import LayerNorm, LeanConv2d, gated_gelu, projected_gated_gelu
from ldm.util import default

# The UNet's `attention_backend`: PyTorch's own choice of scaled_dot_product_attention kernel ("auto"), or the
# kernel to try first; the others stay behind it for what it does not serve (a device, a head size, a dtype).
ATTENTION_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


# cuDNN's fused attention has a backward for heads of at most 128 channels before cuDNN 9.5 and on GPUs before
# Hopper, and where it lacks one the call fails instead of going to another kernel. Wider heads (SD v1's deepest
# level: 160 channels over 64 pixels at 512 px, a negligible share of the step) keep PyTorch's own order.
CUDNN_MAX_HEAD_DIM = 128


def attention_kernel_order(backend: str, head_dim: int) -> list[SDPBackend] | None:
    """The SDPA kernels in the order to try them for `backend` at `head_dim` channels per head (None: PyTorch's
    own order)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend '{backend}' is not one of {', '.join(ATTENTION_BACKENDS)}")
    first = ATTENTION_BACKENDS[backend]
    if first is None or (first is SDPBackend.CUDNN_ATTENTION and head_dim > CUDNN_MAX_HEAD_DIM):
        return None
    return [first, *(kernel for kernel in ATTENTION_BACKENDS.values() if kernel not in (None, first))]


class GEGLU(nn.Module):
    """Gated GELU projection: half of the output gates the other half. Keeps only the projection for backward, or
    with `recompute_projection` (the UNet's `recompute_feedforward`) only its input, computing it again there."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.recompute_projection = False

    def forward(self, x):
        if self.recompute_projection:
            return projected_gated_gelu(x, self.proj)
        return gated_gelu(self.proj(x))


class FeedForward(nn.Module):
    """Transformer MLP; `glu=True` gives the GEGLU variant that SD v1 and LDM use."""

    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when no context is given)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.kernel_order = None  # `attention_kernel_order` of the UNet's attention_backend

    def forward(self, x, context=None):
        context = default(context, x)
        q, k, v = (
            rearrange(proj(source), "b n (h d) -> b h n d", h=self.heads)
            for proj, source in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        if self.kernel_order is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:  # here, not around the UNet, so that checkpointing's recomputation picks the same kernel
            with sdpa_kernel(self.kernel_order, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual."""

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self, self.checkpoint)

    def _forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (SD v1 / LDM form: 1x1 convolutions in and out).

    `proj_out` starts at zero so a freshly built block is the identity. `use_checkpoint` is our addition
    (default True, as the original always checkpointed its blocks) so the UNet's flag reaches the blocks.
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, use_checkpoint=True):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = LeanConv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, checkpoint=use_checkpoint
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(LeanConv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x, context=None):
        height, width = x.shape[-2:]
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context=context)
        # Laid out as x is (NCHW unless the UNet runs channels-last): the rearranged view is channels-last, and
        # through proj_out and the residual sum it would spread to every later layer, each convolution then
        # converting its weights and its input at every call.
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width).contiguous(memory_format=memory_format_of(x))
        return self.proj_out(h) + x
