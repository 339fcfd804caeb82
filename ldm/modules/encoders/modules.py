"""Text conditioners: the frozen CLIP ViT-L/14 text encoder of SD v1 and the LDM-BERT of LDM text2img-large.

Both expose the same small interface (`TextConditioner`) through which the EmbeddingManager swaps learned
pseudo-word vectors into the token embeddings, before position embeddings are added, as the paper's code did.
The weights always come from the diffusion checkpoint, so nothing here downloads.
"""
import abc
import inspect
import os
from collections import OrderedDict

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.masking_utils import create_causal_mask

from ldm.modules.cuda_graphs import GraphedTextEncoder
from ldm.modules.encoders.tokenizers import bert_tokenizer, clean_clip_text, clip_tokenizer, text_token_ids
from ldm.modules.lean_ops import native_layer_norms
from ldm.modules.x_transformer import Encoder, TransformerWrapper

_CAUSAL_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
# How many captions a conditioner remembers on its device (`TextConditioner.tokens`): at most 29 MiB of SD v1's
# bf16 token rows where the table is parked; a run's captions are a few dozen templates.
CAPTION_MEMO_SIZE = 256


def _causal_mask(config, hidden: torch.Tensor):
    """CLIPTextModel.forward's mask: under SDPA none (the text has no padding mask, and is_causal says the rest,
    which lets SDPA pick FlashAttention); otherwise `create_causal_mask`'s, whose cache arguments were renamed within
    transformers 5 (past_key_values -> cache). SDPA's None is given here, not left to `create_causal_mask`: in
    transformers 5.17 it builds an explicit mask while a CUDA graph records, so the graph would run other kernels."""
    if config._attn_implementation == "sdpa":
        return None
    arguments = {"cache" if "cache" in _CAUSAL_MASK_PARAMETERS else "past_key_values": None}
    if "cache_position" in _CAUSAL_MASK_PARAMETERS:
        arguments["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(config, hidden, attention_mask=None, **arguments)


SD_V1_CLIP_VERSION = "openai/clip-vit-large-patch14"
# The text half of openai/clip-vit-large-patch14's config.json (its legacy bos/pad/eos ids only affect pooling).
SD_V1_CLIP_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    projection_dim=768,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
)


def _as_batch(texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _describe_texts(texts) -> str:
    if isinstance(texts, (list, tuple)):
        return f"a {type(texts).__name__} holding {sorted({type(text).__name__ for text in texts})}"
    return f"a {type(texts).__name__}"


class TextConditioner(nn.Module, abc.ABC):
    """What the EmbeddingManager relies on: tokenize, look tokens up, let the manager edit them, then encode.

    Subclasses set `max_length` and `tokenizer` and provide the three abstract members.
    """

    max_length: int

    def __init__(self):
        super().__init__()
        self._caption_memo = OrderedDict()  # caption -> (token ids, token rows if the table is parked), on the device
        self.token_table_parked = False
        self.graphed_encoder = None  # a GraphedTextEncoder once `use_cuda_graphs()` is called
        # Where the conditioner computes, which is not where a parked token table waits.
        self.register_buffer("device_marker", torch.empty(0), persistent=False)

    @property
    @abc.abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The token-embedding table (no position embedding)."""

    @abc.abstractmethod
    def tokenize(self, texts) -> torch.Tensor:
        """(B, max_length) ids, padded and truncated as the original model was trained, on `self.device`."""

    def text_to_token_ids(self, text: str) -> list[int]:
        """Ids of `text` without special tokens or padding, e.g. to find a word's row in the token table."""
        return text_token_ids(self.tokenizer, text)

    @abc.abstractmethod
    def encode_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, n, D) token embeddings to (B, n, D) conditioning: add positions, run the transformer, final norm."""

    @property
    def token_dim(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def device(self) -> torch.device:
        return self.device_marker.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows for `ids`, on the ids' device wherever the table waits."""
        table_device = self.token_embedding.weight.device
        return self.token_embedding(ids.to(table_device)).to(ids.device)

    def park_token_table(self, parked: bool = True):
        """Keep the frozen token table in CPU memory (SD v1's is 72 MiB of bf16, of which a run reads a few dozen
        rows): each caption's rows are looked up there once and remembered on the device (`tokens`)."""
        if parked and self.token_embedding.weight.requires_grad:
            raise ValueError("a trainable token table cannot be parked in CPU memory: set park_token_table: false")
        self.token_table_parked = parked
        self._caption_memo.clear()
        self.token_embedding.to("cpu" if parked else self.device)

    def use_cuda_graphs(self, enabled: bool = True, **options):
        """Replay the transformer's training passes as CUDA graphs (ldm/modules/cuda_graphs.py), or stop."""
        self.graphed_encoder = GraphedTextEncoder(self, **options) if enabled else None

    def tokens(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) token ids and their (B, n, D) embeddings from the table. Each caption's ids, and its rows of a
        parked table, are remembered on the device: training draws its captions from a few dozen templates, and
        tokenizing or copying one to the GPU waits for the GPU's queued work, a stall in every step."""
        captions = [texts] if isinstance(texts, str) else texts
        if not (isinstance(captions, (list, tuple)) and all(isinstance(caption, str) for caption in captions)):
            raise TypeError(f"a text conditioner encodes a str or a list of str, not {_describe_texts(texts)}")
        new = [caption for caption in dict.fromkeys(captions) if caption not in self._caption_memo]
        if new:
            ids = self.tokenize(new)
            rows = self.embed_tokens(ids) if self.token_table_parked else [None] * len(new)
            self._caption_memo.update(zip(new, zip(ids, rows)))
        remembered = [self._caption_memo[caption] for caption in captions]
        for caption in captions:
            self._caption_memo.move_to_end(caption)
        while len(self._caption_memo) > CAPTION_MEMO_SIZE:
            self._caption_memo.popitem(last=False)  # the least recently used
        ids = torch.stack([caption_ids for caption_ids, _ in remembered])
        if self.token_table_parked:
            return ids, torch.stack([rows for _, rows in remembered])
        return ids, self.embed_tokens(ids)

    def _apply(self, fn, *args, **kwargs):
        self._caption_memo.clear()  # moved or cast: what was remembered is on the old device or in the old dtype
        if self.graphed_encoder is not None:  # recorded kernels read the weights where they were
            self.graphed_encoder.clear()
        module = super()._apply(fn, *args, **kwargs)
        if self.token_table_parked:
            self.token_embedding.to("cpu")
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        self._caption_memo.clear()  # new weights: remembered token rows would be stale
        super()._load_from_state_dict(*args, **kwargs)

    def encode(self, texts, embedding_manager=None) -> torch.Tensor:
        ids, embeds = self.tokens(texts)
        if embedding_manager is not None:
            embeds = embedding_manager(ids, embeds)
        return self.encode_embeddings(embeds) if self.graphed_encoder is None else self.graphed_encoder(embeds)

    def forward(self, texts, embedding_manager=None) -> torch.Tensor:
        return self.encode(texts, embedding_manager)

    def freeze(self):
        """Eval mode and no weight gradients; gradients still flow to embeddings passed to `encode_embeddings`."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False
        return self


def clip_text_config(version: str, overrides: dict | None = None) -> CLIPTextConfig:
    """The CLIP text config for `version`: built in code for SD v1's ViT-L/14, else read from a local folder."""
    overrides = {"attn_implementation": "sdpa", **(overrides or {})}
    if version == SD_V1_CLIP_VERSION:
        return CLIPTextConfig(**{**SD_V1_CLIP_TEXT_CONFIG, **overrides})
    if os.path.isfile(os.path.join(version, "config.json")):
        return CLIPTextConfig.from_pretrained(version, local_files_only=True, **overrides)
    raise ValueError(
        f"CLIP version '{version}' is neither '{SD_V1_CLIP_VERSION}' nor a local folder with a transformers "
        "config.json; models are never downloaded"
    )


class FrozenCLIPEmbedder(TextConditioner):
    """SD v1's text conditioner: CLIP ViT-L/14's text transformer, causal attention, no padding mask,
    output = the final-LayerNorm'ed last hidden state (B, 77, 768).

    The model sits at `transformer.text_model` so state-dict keys read `transformer.text_model.*`, the names in SD
    checkpoints. As in Textual Inversion, construction does not freeze: the diffusion model freezes what it keeps
    frozen, and `freeze()` does it for the conditioner used alone.
    """

    POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"

    def __init__(self, version: str = SD_V1_CLIP_VERSION, device=None, max_length: int = 77,
                 tokenizer_path: str | None = None, text_config: dict | None = None):
        super().__init__()
        self.max_length = max_length
        self.tokenizer = clip_tokenizer(tokenizer_path)
        text_model = native_layer_norms(CLIPTextModel(clip_text_config(version, text_config)))
        self.transformer = nn.ModuleDict({"text_model": text_model})
        if device is not None:
            self.to(device)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def tokenize(self, texts) -> torch.Tensor:
        cleaned = [clean_clip_text(text) for text in _as_batch(texts)]
        batch = self.tokenizer(cleaned, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        return batch.input_ids.to(self.device)

    def encode_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        text_model = self.transformer.text_model
        hidden = text_model.embeddings(inputs_embeds=embeds)
        causal_mask = _causal_mask(text_model.config, hidden)
        hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=causal_mask, is_causal=True).last_hidden_state
        return text_model.final_layer_norm(hidden)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # SD checkpoints carry this buffer; transformers 5 recomputes it and no longer stores it.
        state_dict.pop(prefix + self.POSITION_IDS_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BERTTokenizer(nn.Module):
    """LDM's bert-base-uncased tokenizer as a module: [CLS] text [SEP], padded with 0 to `max_length` ids."""

    def __init__(self, max_length: int = 77, vocab_path: str | None = None):
        super().__init__()
        self.tokenizer = bert_tokenizer(vocab_path, max_length)
        self.max_length = max_length

    def forward(self, texts) -> torch.Tensor:
        batch = self.tokenizer(_as_batch(texts), truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
        return batch.input_ids


class BERTEmbedder(TextConditioner):
    """LDM-BERT: the BERT tokenizer followed by a transformer trained from scratch with the diffusion model."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77, device=None,
                 embedding_dropout: float = 0.0, tokenizer_path: str | None = None):
        super().__init__()
        self.max_length = max_seq_len
        self.tknz_fn = BERTTokenizer(max_length=max_seq_len, vocab_path=tokenizer_path)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)
        if device is not None:
            self.to(device)

    @property
    def tokenizer(self):
        return self.tknz_fn.tokenizer

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.token_emb

    def tokenize(self, texts) -> torch.Tensor:
        return self.tknz_fn(texts).to(self.device)

    def encode_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(embeds)
