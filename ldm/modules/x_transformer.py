"""The LDM-BERT text transformer of the LDM text2img-large model.

The original vendored lucidrains' x-transformers with many unused options; only its default encoder path is
kept here: pre-LayerNorm blocks alternating 8-head self-attention (64 per head, no mask) and a GELU
feed-forward, absolute learned positions, and a final LayerNorm. Module names and nesting follow the original
so that `cond_stage_model.transformer.*` checkpoint keys load unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.lean_ops import LayerNorm

DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position vectors for positions 0..n-1 of the input."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]


class Attention(nn.Module):
    """Unmasked multi-head self-attention; q/k/v have no bias, as in the original."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = DIM_HEAD):
        super().__init__()
        self.heads = heads
        inner_dim = heads * dim_head
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale is dim_head ** -0.5, the original's
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear with 4x expansion."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        # Index 1 is the original's dropout (p=0); keeping the slot keeps the second Linear at key `net.2`.
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()), nn.Identity(),
                                 nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """`depth` blocks of [LayerNorm, Attention] then [LayerNorm, FeedForward], each a pre-norm residual branch.

    `layers` is flat (2 * depth entries), matching the original's `layers.{i}.0` (norm) / `layers.{i}.1` (branch).
    """

    def __init__(self, dim: int, depth: int, heads: int = 8):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([LayerNorm(dim), Attention(dim, heads=heads)]))
            self.layers.append(nn.ModuleList([LayerNorm(dim), FeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, branch in self.layers:
            x = x + branch(norm(x))
        return x


class TransformerWrapper(nn.Module):
    """Token and position embeddings around an `Encoder`, returning final-LayerNorm'ed hidden states.

    `forward` takes token *embeddings*, not ids: Textual Inversion swaps placeholder vectors into the token
    embeddings before positions are added, so the caller looks tokens up with `token_emb` and may edit them.
    """

    def __init__(self, *, num_tokens: int, max_seq_len: int, attn_layers: Encoder, emb_dropout: float = 0.0):
        super().__init__()
        dim = attn_layers.dim
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.norm = LayerNorm(dim)
        # The language-model head is never used for conditioning; it exists so checkpoints load key for key, and
        # stays frozen so that training the encoder leaves no parameter without a gradient (DDP refuses those).
        self.to_logits = nn.Linear(dim, num_tokens).requires_grad_(False)

    def forward(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        x = token_embeddings + self.pos_emb(token_embeddings)
        x = self.attn_layers(self.emb_dropout(x))
        return self.norm(x)
