"""Text conditioners: offline tokenizers against open_clip / bert-base-uncased ids, and the two text transformers
against independent implementations (transformers' CLIPTextModel loaded through diffusers, a plain-torch LDM-BERT)."""
import copy
import hashlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

import ldm.modules.encoders.modules as encoder_modules
from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer, FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizers import BERT_VOCAB_FILE

BOS, EOS = 49406, 49407
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_BERT = dict(n_embed=64, n_layer=2)
PROMPTS = [
    "a photo of *",
    "A painting of <cat-toy> in the style of Monet.",
    "Hello, world! How's it going?",
    "1024x768 resolution, pi is 3.14159, date 2023-11-22",
    "café naïve résumé Ångström",
    "\u201ccurly quotes\u201d and \u2018single\u2019 ones",
    "salt &amp; pepper",
    "  extra   whitespace\tand\nnewlines  ",
    "東京タワー at night",
    "an emoji 🐱 cat",
    "Ελληνικά και русский текст",
    "don't won't they're I'll we've",
    "C:/path/to/file_name.png",
    "\ufb01ne ligature and \uff46\uff55\uff4c\uff4c-width",
    "UPPERCASE MiXeD CaSe",
]
LONG_PROMPT = " ".join(f"word{i % 7} photo" if i % 2 else "painting" for i in range(100))


def _perturb_(module: nn.Module, seed: int) -> nn.Module:
    """Move every weight (LayerNorms included) away from its init so that no parameter goes untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return module


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return _perturb_(FrozenCLIPEmbedder(text_config=TINY_CLIP), seed=1)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return _perturb_(BERTEmbedder(**TINY_BERT), seed=2)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# CLIP tokenizer ------------------------------------------------------------------------------------------------

def test_clip_tokenize_placeholder_prompt(clip):
    ids = clip.tokenize(["a photo of *"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == [BOS, 320, 1125, 539, 265, EOS] + [EOS] * 71


def test_clip_ids_match_open_clip(clip, open_clip_tokenizer):
    ids = clip.tokenize(PROMPTS)
    for prompt, row in zip(PROMPTS, ids.tolist()):
        expected = open_clip_tokenizer.encode(prompt)
        assert clip.text_to_token_ids(prompt) == expected, prompt
        assert row == [BOS, *expected, EOS] + [EOS] * (75 - len(expected)), prompt


def test_clip_truncation_keeps_end_token(clip, open_clip_tokenizer):
    row = clip.tokenize([LONG_PROMPT])[0].tolist()
    assert len(row) == 77 and row[-1] == EOS
    assert row[:76] == [BOS, *open_clip_tokenizer.encode(LONG_PROMPT)[:75]]


def test_clip_single_token_check(clip):
    assert len(clip.text_to_token_ids("cat")) == 1
    assert len(clip.text_to_token_ids("*")) == 1
    assert len(clip.text_to_token_ids("zyzzogeton")) > 1


def test_clip_tokenizer_from_local_folder(clip, tmp_path):
    clip.tokenizer.save_pretrained(tmp_path)
    local = FrozenCLIPEmbedder(tokenizer_path=str(tmp_path), text_config=TINY_CLIP)
    assert torch.equal(local.tokenize(PROMPTS), clip.tokenize(PROMPTS))


def test_clip_config_sources(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")
    CLIPTextConfig(**TINY_CLIP, hidden_act="quick_gelu").save_pretrained(tmp_path)
    config = FrozenCLIPEmbedder(version=str(tmp_path)).transformer.text_model.config
    assert (config.hidden_size, config.num_hidden_layers, config._attn_implementation) == (32, 2, "sdpa")


# CLIP text transformer -----------------------------------------------------------------------------------------

def _sd_checkpoint(conditioner: nn.Module) -> dict:
    """The conditioner as it appears in an SD v1 checkpoint, including the legacy position_ids buffer."""
    checkpoint = {f"cond_stage_model.{key}": value for key, value in conditioner.state_dict().items()}
    checkpoint[f"cond_stage_model.{FrozenCLIPEmbedder.POSITION_IDS_KEY}"] = torch.arange(77)[None]
    return checkpoint


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_clip_matches_transformers_model_loaded_by_diffusers(clip, attn_implementation):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    converted = convert_ldm_clip_checkpoint(_sd_checkpoint(clip))
    flat = {key.removeprefix("text_model."): value for key, value in converted.items()
            if not key.endswith("position_ids")}
    reference = CLIPTextModel(CLIPTextConfig(**TINY_CLIP, hidden_act="quick_gelu", attn_implementation="eager"))
    reference.load_state_dict(flat, strict=True)

    ours = clip
    if attn_implementation != "sdpa":
        ours = FrozenCLIPEmbedder(text_config={**TINY_CLIP, "attn_implementation": attn_implementation})
        ours.load_state_dict(clip.state_dict())
    with torch.no_grad():
        actual = ours.encode(PROMPTS)
        expected = reference(input_ids=clip.tokenize(PROMPTS)).last_hidden_state
    assert actual.shape == (len(PROMPTS), 77, 32)
    assert _relative_error(actual, expected) < 1e-5


def test_sdpa_clip_passes_no_mask_even_while_a_cuda_graph_records(clip, monkeypatch):
    """transformers 5.17's create_causal_mask builds an explicit mask under stream capture, where it otherwise gives
    None (FlashAttention then takes the causal flag): a recorded text encoder would run other kernels than the
    eager one. Under SDPA the mask is None without asking it."""
    monkeypatch.setattr(encoder_modules, "create_causal_mask", lambda *args, **kwargs: pytest.fail("asked"))
    config = clip.transformer.text_model.config
    assert config._attn_implementation == "sdpa"
    assert encoder_modules._causal_mask(config, torch.zeros(2, 77, 32)) is None


def test_clip_loads_sd_checkpoint_with_position_ids(clip):
    holder = nn.Module()
    holder.cond_stage_model = FrozenCLIPEmbedder(text_config=TINY_CLIP)
    result = holder.load_state_dict(_sd_checkpoint(clip), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in clip.state_dict().items():
        assert torch.equal(holder.cond_stage_model.state_dict()[name], value), name


def test_clip_attention_is_causal(clip):
    """Changing the placeholder's vector must leave every earlier position's output untouched."""
    ids = clip.tokenize(["a photo of *"])
    position = ids[0].tolist().index(265)

    def replace_placeholder(token_ids, embeds):
        return torch.where((token_ids == 265)[..., None], torch.ones_like(embeds), embeds)

    with torch.no_grad():
        plain, edited = clip.encode(["a photo of *"]), clip.encode(["a photo of *"], replace_placeholder)
    assert torch.equal(plain[:, :position], edited[:, :position])
    assert (plain[:, position:] - edited[:, position:]).abs().amax(dim=-1).min() > 1e-4


def test_full_size_clip_parameters():
    with torch.device("meta"):
        conditioner = FrozenCLIPEmbedder()
    state = conditioner.state_dict()
    assert sum(p.numel() for p in conditioner.parameters()) == 123_060_480
    assert len(state) == 196 and all(key.startswith("transformer.text_model.") for key in state)
    assert state["transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert conditioner.token_dim == 768 and conditioner.max_length == 77


# BERT tokenizer ------------------------------------------------------------------------------------------------

def test_shipped_bert_vocab():
    with open(BERT_VOCAB_FILE, "rb") as handle:
        data = handle.read()
    assert hashlib.md5(data).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    assert data.count(b"\n") == 30522


def test_bert_tokenize(bert):
    ids = bert.tokenize(["a photo of *"])
    assert ids.shape == (1, 77)
    assert ids[0].tolist() == [101, 1037, 6302, 1997, 1008, 102] + [0] * 71
    long_row = bert.tokenize([LONG_PROMPT])[0].tolist()
    assert len(long_row) == 77 and long_row[0] == 101 and long_row[-1] == 102
    assert bert.text_to_token_ids("*") == [1008]
    assert len(bert.text_to_token_ids("zyzzogeton")) > 1


def test_bert_tokenizer_module_pads_to_its_length():
    tokens = BERTTokenizer(max_length=8)(["a photo of *", "a"])
    assert tokens.tolist() == [[101, 1037, 6302, 1997, 1008, 102, 0, 0], [101, 1037, 102, 0, 0, 0, 0, 0]]


# LDM-BERT transformer ------------------------------------------------------------------------------------------

def _reference_ldm_bert(state: dict, ids: torch.Tensor, depth: int, heads: int = 8) -> torch.Tensor:
    """LDM-BERT written out from the original's equations: explicit softmax attention, pre-norm residuals."""
    dim = state["transformer.token_emb.weight"].shape[1]
    x = state["transformer.token_emb.weight"][ids] + state["transformer.pos_emb.emb.weight"][: ids.shape[1]]
    b, n, _ = x.shape
    for i in range(2 * depth):
        key = f"transformer.attn_layers.layers.{i}."
        h = F.layer_norm(x, (dim,), state[key + "0.weight"], state[key + "0.bias"])
        if i % 2 == 0:
            q, k, v = (torch.einsum("bnd,ed->bne", h, state[f"{key}1.to_{name}.weight"]).reshape(b, n, heads, 64)
                       for name in "qkv")
            attention = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * 64 ** -0.5, dim=-1)
            mixed = torch.einsum("bhij,bjhd->bihd", attention, v).reshape(b, n, heads * 64)
            branch = mixed @ state[key + "1.to_out.weight"].T + state[key + "1.to_out.bias"]
        else:
            hidden = F.gelu(h @ state[key + "1.net.0.0.weight"].T + state[key + "1.net.0.0.bias"])
            branch = hidden @ state[key + "1.net.2.weight"].T + state[key + "1.net.2.bias"]
        x = x + branch
    return F.layer_norm(x, (dim,), state["transformer.norm.weight"], state["transformer.norm.bias"])


def _expected_bert_keys(depth: int) -> set[str]:
    keys = {"transformer.token_emb.weight", "transformer.pos_emb.emb.weight", "transformer.norm.weight",
            "transformer.norm.bias", "transformer.to_logits.weight", "transformer.to_logits.bias"}
    for i in range(2 * depth):
        prefix = f"transformer.attn_layers.layers.{i}."
        keys |= {prefix + "0.weight", prefix + "0.bias"}
        if i % 2 == 0:
            keys |= {prefix + f"1.to_{name}.weight" for name in "qkv"}
            keys |= {prefix + "1.to_out.weight", prefix + "1.to_out.bias"}
        else:
            keys |= {prefix + f"1.net.{j}.{p}" for j in ("0.0", "2") for p in ("weight", "bias")}
    return keys


def test_bert_matches_reference_forward(bert):
    assert set(bert.state_dict()) == _expected_bert_keys(TINY_BERT["n_layer"])
    with torch.no_grad():
        actual = bert.encode(PROMPTS)
        expected = _reference_ldm_bert(bert.state_dict(), bert.tokenize(PROMPTS), TINY_BERT["n_layer"])
    assert actual.shape == (len(PROMPTS), 77, 64)
    assert _relative_error(actual, expected) < 1e-5


def test_full_size_bert_keys():
    with torch.device("meta"):
        conditioner = BERTEmbedder(n_embed=1280, n_layer=32)
    state = conditioner.state_dict()
    count = sum(p.numel() for p in conditioner.parameters())
    print(f"LDM-BERT (1280 x 32): {count:,} parameters")
    assert set(state) == _expected_bert_keys(32)
    assert count == 581_994_042
    assert state["transformer.token_emb.weight"].shape == (30522, 1280)
    assert state["transformer.attn_layers.layers.0.1.to_q.weight"].shape == (512, 1280)
    assert state["transformer.attn_layers.layers.1.1.net.0.0.weight"].shape == (5120, 1280)
    assert conditioner.token_dim == 1280


# Shared conditioner interface ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip", "bert"])
def test_identity_manager_changes_nothing(name, request):
    conditioner = request.getfixturevalue(name)
    seen = {}

    def identity(ids, embeds):
        seen["ids"] = ids
        return embeds

    with torch.no_grad():
        assert torch.equal(conditioner.encode(PROMPTS[:3], identity), conditioner(PROMPTS[:3]))
    assert torch.equal(seen["ids"], conditioner.tokenize(PROMPTS[:3]))


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_gradient_reaches_embeddings_of_frozen_conditioner(name, request):
    conditioner = request.getfixturevalue(name)
    conditioner.freeze()
    assert not conditioner.training and not any(p.requires_grad for p in conditioner.parameters())
    embeds = conditioner.embed_tokens(conditioner.tokenize(["a photo of *"])).requires_grad_(True)
    conditioner.encode_embeddings(embeds).square().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum(dim=-1).gt(0).all()
    assert all(p.grad is None for p in conditioner.parameters())


def test_token_ids_are_remembered_per_caption_until_the_encoder_moves(clip, monkeypatch):
    calls = []
    tokenize = clip.tokenize
    monkeypatch.setattr(clip, "tokenize", lambda texts: calls.append(list(texts)) or tokenize(texts))
    captions = ["a dusty photo of *", "a dusty rendition of *", "a dusty photo of *"]
    assert torch.equal(clip.tokens(captions)[0], tokenize(captions))
    assert calls == [["a dusty photo of *", "a dusty rendition of *"]]  # each new caption once
    assert torch.equal(clip.tokens(["a dusty rendition of *", "a dusty photo of *"])[0], tokenize(captions[1:]))
    assert len(calls) == 1  # nothing new: no tokenizer, no copy to the device
    clip.cpu()  # a move forgets them
    clip.tokens("a dusty photo of *")
    assert calls[1:] == [["a dusty photo of *"]]


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_anything_but_captions_is_a_clear_type_error(name, request):
    conditioner = request.getfixturevalue(name)
    ids = conditioner.tokenize(["a photo of *"])
    for texts, described in [(ids, "a Tensor"), ([ids[0]], "a list holding ['Tensor']"), (None, "a NoneType")]:
        with pytest.raises(TypeError, match=rf"encodes a str or a list of str, not {re.escape(described)}$"):
            conditioner.encode(texts)


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_a_parked_token_table_encodes_as_the_resident_one_reading_each_caption_once(name, request):
    conditioner = copy.deepcopy(request.getfixturevalue(name)).freeze()
    with torch.no_grad():
        resident = conditioner.encode(PROMPTS[:4])
    lookups = []
    conditioner.token_embedding.register_forward_hook(lambda _, ids, out: lookups.append(ids[0].shape[0]))
    conditioner.park_token_table()
    assert conditioner.token_table_parked and conditioner.token_embedding.weight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(conditioner.encode(PROMPTS[:4]), resident)
        assert torch.equal(conditioner.encode([PROMPTS[2], PROMPTS[1]]), resident[[2, 1]])
    assert lookups == [4]  # the four captions' rows, read once
    conditioner.to(torch.float64)  # a cast keeps the table parked, in the new dtype, and forgets the rows
    assert conditioner.token_table_parked and conditioner.token_embedding.weight.dtype == torch.float64
    conditioner.encode(PROMPTS[:1])
    assert lookups == [4, 1]
    conditioner.load_state_dict(conditioner.state_dict())  # new weights: the rows are read again
    conditioner.encode(PROMPTS[:1])
    assert lookups == [4, 1, 1]
    conditioner.park_token_table(False)
    assert not conditioner.token_table_parked
    conditioner.encode(PROMPTS[:1])
    conditioner.encode(PROMPTS[:1])
    assert lookups == [4, 1, 1, 1, 1]  # resident: read every time, nothing remembered but the ids


def test_a_trainable_token_table_is_not_parked(clip):
    trainable = copy.deepcopy(clip).requires_grad_(True)
    with pytest.raises(ValueError, match="park_token_table: false"):
        trainable.park_token_table()


def test_the_caption_memo_forgets_the_least_recently_used_beyond_its_size(clip, monkeypatch):
    monkeypatch.setattr(encoder_modules, "CAPTION_MEMO_SIZE", 2)
    conditioner = copy.deepcopy(clip).freeze()
    conditioner.park_token_table()
    with torch.no_grad():
        expected = conditioner.encode_embeddings(conditioner.embed_tokens(conditioner.tokenize(PROMPTS[:3])))
        assert torch.equal(conditioner.encode(PROMPTS[:3]), expected)  # more captions in one call than it keeps
        assert list(conditioner._caption_memo) == PROMPTS[1:3]
        conditioner.encode(PROMPTS[1:2])
        conditioner.encode(PROMPTS[3:4])
    assert list(conditioner._caption_memo) == [PROMPTS[1], PROMPTS[3]]


def test_a_trained_ldm_bert_gives_every_trainable_parameter_a_gradient():
    """DDP (several GPUs) refuses a trainable parameter that gets no gradient: the unused language-model head is
    frozen, so pretraining or `unfreeze_model` with LDM-BERT runs under DDP."""
    encoder = BERTEmbedder(n_embed=32, n_layer=2)
    encoder(PROMPTS[:2]).square().mean().backward()
    without = [name for name, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert without == [] and "transformer.to_logits.weight" in encoder.state_dict()
