"""EmbeddingManager: substitution and multi-vector expansion, initialisation, errors, regularisation, files.

Most tests use a tiny conditioner with an 8-wide table and a 22-word WordPiece vocabulary, so which strings are
single tokens is under the test's control; the last ones run the real tiny CLIP and LDM-BERT conditioners.
"""

import pytest
import torch
from torch import nn
from transformers import BertTokenizerFast

from ldm.checkpoint import build_random_model
from ldm.data.templates import per_img_token_list
from ldm.embeddings import Embeddings, load_embeddings, save_embeddings
from ldm.modules.embedding_manager import EmbeddingManager, initial_vectors, parameter_key
from ldm.modules.encoders.modules import (
    BERTEmbedder,
    FrozenCLIPEmbedder,
    TextConditioner,
)
from ldm.text_encoders import model_family
from tests.conftest import TINY_SD

TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "*", "@", "&", "leav", "##anny", "sculpture",
    "cat", "dog", "the", "in", "style", "x", "painting", "training",
]
TINY_CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


class TinyConditioner(TextConditioner):
    """The conditioner interface over a toy vocabulary; encoding just adds position embeddings."""

    def __init__(self, dim=8, max_length=10):
        super().__init__()
        self.max_length = max_length
        self.tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(TINY_VOCAB)})
        self.table = nn.Embedding(len(TINY_VOCAB), dim)
        self.positions = nn.Parameter(torch.randn(max_length, dim))

    @property
    def token_embedding(self):
        return self.table

    def tokenize(self, texts):
        return self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def encode_embeddings(self, embeds):
        return embeds + self.positions


def original_expansion(ids, embeds, placeholder_vectors):
    """The original code's loop: per placeholder, per row, occurrences right to left, insert and cut to n."""
    length = ids.shape[1]
    ids, rows = ids.clone(), list(embeds)
    for token, vectors in placeholder_vectors:
        for b in range(ids.shape[0]):
            for column in reversed(torch.nonzero(ids[b] == token).flatten().tolist()):
                m = vectors.shape[0]
                ids[b] = torch.cat([ids[b, :column], ids.new_full((m,), token), ids[b, column + 1:]])[:length]
                rows[b] = torch.cat([rows[b][:column], vectors, rows[b][column + 1:]])[:length]
    return torch.stack(rows)


def token_id(conditioner, text):
    (token,) = conditioner.text_to_token_ids(text)
    return token


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyConditioner().freeze()


def test_single_vector_replaces_only_placeholder_rows_and_gradients_reach_only_its_parameter(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings=["*", "@"], initializer_words=["sculpture"])
    with torch.no_grad():
        manager.vectors("*").normal_()
    ids = tiny.tokenize(["a photo of *", "* in the style of * painting"])
    embeds = tiny.embed_tokens(ids).detach().requires_grad_()
    before = embeds.detach().clone()

    out = manager(ids, embeds)
    is_star = ids == token_id(tiny, "*")
    assert is_star.sum() == 3
    assert torch.equal(out[is_star], manager.vectors("*").detach().expand(3, -1))
    assert torch.equal(out[~is_star], before[~is_star])
    assert torch.equal(embeds, before)

    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(manager.vectors("*").grad[0], weights[is_star].sum(0))
    assert torch.equal(embeds.grad, weights * ~is_star.unsqueeze(-1))
    assert manager.vectors("@").grad is None or not manager.vectors("@").grad.any()
    assert manager.initial_embeddings[parameter_key("*")].grad is None
    assert tiny.table.weight.grad is None


def test_multi_vector_occurrence_expands_in_place_and_truncates(tiny):
    manager = EmbeddingManager(tiny, num_vectors_per_token=3)
    ids = tiny.tokenize(["a photo of *", "a photo of * cat in the style"])
    embeds = tiny.embed_tokens(ids)
    out = manager(ids, embeds)
    vectors = manager.vectors("*")

    # [CLS] a photo of * [SEP] pad...: the three vectors take slots 4-6 and the rest moves right by two.
    assert torch.equal(out[0, :4], embeds[0, :4])
    assert torch.equal(out[0, 4:7], vectors)
    assert torch.equal(out[0, 7:], embeds[0, 5:8])
    # [CLS] a photo of * cat in the style [SEP]: pushed past n = 10, "style" and [SEP] are cut off.
    assert torch.equal(out[1, 7:], embeds[1, 5:8])
    assert out.shape == embeds.shape


def test_a_caption_that_cuts_off_learned_vectors_is_told_as_the_expansion_cuts_them(tiny):
    """Against what the text encoder is fed: captions of up to 9 words (n = 10 slots) with '*' and '@' of 3 vectors
    each; a caption cuts one off when some occurrence's vectors are not all fed."""
    manager = EmbeddingManager(tiny, placeholder_strings=["*", "@"], num_vectors_per_token=3)
    with torch.no_grad():
        for word in ("*", "@"):
            manager.vectors(word).normal_()
    words = ["a", "*", "photo", "@"]
    captions = [" ".join(words[(start + i * i) % 4] for i in range(count)) for count in range(1, 10) for start in range(4)]
    ids = tiny.tokenize(captions)
    fed = manager(ids, tiny.embed_tokens(ids))
    told = {True: 0, False: 0}
    for caption, row in zip(captions, fed):
        fed_whole = all(int((row == vector).all(dim=1).sum()) == caption.split().count(word)
                        for word in ("*", "@") for vector in manager.vectors(word))
        told[manager.cuts_learned_vectors(caption, tiny.max_length)] += 1
        assert manager.cuts_learned_vectors(caption, tiny.max_length) == (not fed_whole), caption
    assert min(told.values()) > 5  # both answers are tried
    assert manager.cuts_learned_vectors("a photo of a photo of *", 10) is False  # the end token makes way
    assert manager.cuts_learned_vectors("a photo of a photo of a *", 10) is True  # the third vector would be the 11th
    one_vector = EmbeddingManager(tiny)
    assert one_vector.cuts_learned_vectors("a photo of a photo of a *", 10) is False
    assert one_vector.cuts_learned_vectors("a photo of a photo of a photo *", 10) is True  # the tokenizer drops it


def test_two_placeholders_follow_progressive_words_and_match_the_original_loop(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings=["*", "@"], num_vectors_per_token=3, progressive_words=True)
    ids = tiny.tokenize(["* photo of @ in *", "@ *"])
    embeds = tiny.embed_tokens(ids)
    star, at = token_id(tiny, "*"), token_id(tiny, "@")
    for step, active in [(0, 1), (1999, 1), (2000, 2), (4000, 3), (10000, 3)]:
        manager.set_training_step(step)
        expected = original_expansion(
            ids, embeds, [(star, manager.vectors("*")[:active]), (at, manager.vectors("@")[:active])]
        )
        assert torch.equal(manager(ids, embeds), expected), step
    # Row 1 at 3 vectors each: [CLS] @@@ *** [SEP] pad pad.
    out = manager(ids, embeds)
    assert torch.equal(out[1, 1:4], manager.vectors("@")) and torch.equal(out[1, 4:7], manager.vectors("*"))
    assert torch.equal(out[1, 7], embeds[1, 3])

    manager.progressive_words = False
    manager.set_training_step(0)
    assert manager.num_active_vectors(3) == 3


def test_expansion_matches_the_original_loop_on_random_prompts(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings=["*", "@", "&"], num_vectors_per_token=4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(TINY_VOCAB), (16, tiny.max_length), generator=generator)
    embeds = tiny.embed_tokens(ids)
    expected = original_expansion(ids, embeds, [(token_id(tiny, p), manager.vectors(p)) for p in ["*", "@", "&"]])
    assert torch.equal(manager(ids, embeds), expected)


def test_initializer_word_vector_is_the_raw_token_embedding_row(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings=["*", "@"], initializer_words=["sculpture"],
                               num_vectors_per_token=2)
    row = tiny.table.weight[token_id(tiny, "sculpture")]
    assert torch.equal(manager.vectors("*"), row.expand(2, -1))
    initial = manager.initial_embeddings[parameter_key("*")]
    assert torch.equal(initial, row.expand(2, -1)) and not initial.requires_grad
    assert list(manager.initial_embeddings.keys()) == ["*"]
    assert manager.string_to_token_dict == {"*": token_id(tiny, "*"), "@": token_id(tiny, "@")}
    assert manager.vectors("@").dtype == torch.float32 and manager.vectors("@").requires_grad


def test_random_init_follows_the_table_statistics_and_the_global_seed(tiny):
    with torch.no_grad():
        tiny.table.weight.copy_(torch.randn_like(tiny.table.weight) * torch.linspace(0.1, 2, 8) + torch.arange(8.0))
    torch.manual_seed(3)
    vectors = initial_vectors(tiny, None, 4000)  # what the manager starts from, in numbers a mean can be taken of
    table_std = tiny.table.weight.std(dim=0)
    assert torch.allclose(vectors.mean(dim=0), tiny.table.weight.mean(dim=0), atol=0.1)
    assert torch.allclose(vectors.std(dim=0), table_std, rtol=0.1)
    torch.manual_seed(3)
    manager = EmbeddingManager(tiny, num_vectors_per_token=75)
    torch.manual_seed(3)
    assert torch.equal(EmbeddingManager(tiny, num_vectors_per_token=75).vectors("*"), manager.vectors("*"))


def test_one_string_is_one_word_not_a_list_of_its_letters(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings="*", initializer_words="cat")
    assert list(manager.string_to_token_dict) == ["*"] and manager.initializer_words == {"*": "cat"}


@pytest.mark.parametrize("settings, message", [
    (dict(num_vectors_per_token=2.7), "num_vectors_per_token 2.7 is not a whole number from 1 to 75"),
    (dict(num_vectors_per_token=76), "num_vectors_per_token 76 is not a whole number from 1 to 75"),
    (dict(num_vectors_per_token=0), "num_vectors_per_token 0 is not"),
    (dict(num_vectors_per_token="two"), "num_vectors_per_token 'two' is not"),
    (dict(max_vector_norm="big"), "max_vector_norm 'big' is not a positive number"),
    (dict(max_vector_norm=0), "max_vector_norm 0 is not a positive number"),
])
def test_vector_counts_and_norm_caps_that_cannot_work_are_named(tiny, settings, message):
    with pytest.raises(ValueError, match=f"^model.params.personalization_config.params.{message}"):
        EmbeddingManager(tiny, **settings)
    assert EmbeddingManager(tiny, num_vectors_per_token=2.0, max_vector_norm=1).vectors("*").shape == (2, 8)


def test_multi_token_initializer_word_error_names_its_pieces_and_usable_pieces(tiny):
    with pytest.raises(ValueError) as error:
        EmbeddingManager(tiny, initializer_words=["leavanny"])
    message = str(error.value)
    assert "\n" not in message
    assert "initializer word 'leavanny'" in message and "['leav', '##anny']" in message
    assert "single-token pieces (leav)" in message and "shorter common word" in message


def test_multi_token_placeholder_error_lists_only_real_single_tokens(tiny):
    with pytest.raises(ValueError) as error:
        EmbeddingManager(tiny, placeholder_strings=["@", "cat dog"])
    message = str(error.value)
    assert "placeholder 'cat dog'" in message and "['cat', 'dog']" in message
    assert message.endswith("try one of * &")

    with pytest.raises(ValueError, match="placeholder '§' is unknown to the tokenizer"):
        EmbeddingManager(tiny, placeholder_strings=["§"])
    with pytest.raises(ValueError, match=r"placeholder '\[PAD\]' is the tokenizer's special token"):
        EmbeddingManager(tiny, placeholder_strings=["[PAD]"])


def test_placeholders_sharing_a_token_are_refused(tiny):
    with pytest.raises(ValueError, match="placeholders 'x' and 'X' are the same token"):
        EmbeddingManager(tiny, placeholder_strings=["x", "X"])


def test_regularisation_is_the_squared_distance_for_one_vector(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings=["*", "@"], initializer_words=["cat", "dog"])
    deltas = {"*": torch.randn(1, 8), "@": torch.randn(1, 8)}
    with torch.no_grad():
        for placeholder, delta in deltas.items():
            manager.vectors(placeholder).add_(delta)
    expected = (deltas["*"].square().sum() + deltas["@"].square().sum()) / 2
    assert torch.allclose(manager.embedding_to_coarse_loss(), expected)

    multi = EmbeddingManager(tiny, initializer_words=["cat"], num_vectors_per_token=2)
    with torch.no_grad():
        multi.vectors("*").add_(torch.tensor([[1.0] * 8, [2.0] * 8]))
    # d = rows of 1s and 2s: Gram = 8 * [[1, 2], [2, 4]], whose mean entry is 18.
    assert torch.allclose(multi.embedding_to_coarse_loss(), torch.tensor(18.0))


def test_norm_cap_rescales_only_long_vectors(tiny):
    manager = EmbeddingManager(tiny, num_vectors_per_token=2, max_vector_norm=1.0)
    with torch.no_grad():
        manager.vectors("*").copy_(torch.stack([torch.full((8,), 3.0), torch.full((8,), 0.1)]))
    manager.apply_norm_cap()
    assert torch.allclose(manager.vector_norms()["*"], torch.tensor([1.0, 0.1 * 8 ** 0.5]))
    assert torch.allclose(manager.vectors("*")[0], torch.full((8,), 8 ** -0.5))

    uncapped = EmbeddingManager(tiny)
    with torch.no_grad():
        uncapped.vectors("*").fill_(5.0)
    uncapped.apply_norm_cap()
    assert torch.equal(uncapped.vectors("*"), torch.full((1, 8), 5.0))


def test_save_load_round_trip_takes_the_vector_count_from_the_file(tiny, tmp_path):
    trained = EmbeddingManager(tiny, placeholder_strings=["*", "@"], initializer_words=["cat"],
                               num_vectors_per_token=3)
    path = str(tmp_path / "embeddings.pt")
    trained.save(path, step=4500, extra_metadata={"run": "cat"})
    assert load_embeddings(path).metadata == {
        "model_family": "ldm", "num_vectors_per_token": 3, "dim": 8, "step": 4500,
        "placeholder_strings": ["*", "@"], "initializer_words": ["cat", None], "run": "cat",
    }

    fresh = EmbeddingManager(tiny, placeholder_strings=["*"], initializer_words=["cat"], num_vectors_per_token=1,
                             progressive_words=True)
    fresh.load(path)
    ids = tiny.tokenize(["a * in @", "@ photo"])
    embeds = tiny.embed_tokens(ids)
    assert fresh.num_vectors_per_token == 3 and fresh.training_step == 4500
    assert torch.equal(fresh(ids, embeds), trained(ids, embeds))
    assert sorted(fresh.state_dict()) == [
        "initial_embeddings.*", "string_to_param_dict.*", "string_to_param_dict.@"
    ]
    assert torch.equal(fresh.initial_embeddings["*"], trained.initial_embeddings["*"])

    resumed = EmbeddingManager(tiny, placeholder_strings=["*", "@"], initializer_words=["cat"],
                               num_vectors_per_token=3)
    resumed.load_state_dict(trained.state_dict())
    assert torch.equal(resumed(ids, embeds), trained(ids, embeds))

    from_config = EmbeddingManager(tiny, embedding_manager_ckpt=path)
    assert torch.equal(from_config(ids, embeds), trained(ids, embeds))
    assert [p.shape for p in from_config.embedding_parameters()] == [(3, 8), (3, 8)]


def test_a_file_without_a_training_step_uses_all_its_vectors_under_progressive_words(tiny, tmp_path):
    """diffusers and merged files record no step: they were written with every vector trained."""
    path = str(tmp_path / "learned_embeds.bin")
    save_embeddings(Embeddings({"*": torch.randn(3, 8)}), path, "diffusers")
    manager = EmbeddingManager(tiny, progressive_words=True)
    manager.load(path)
    assert manager.num_active_vectors(3) == 3


def test_load_uses_this_tokenizer_and_warns_when_the_file_recorded_other_ids(tiny, tmp_path):
    path = str(tmp_path / "merged.pt")
    vectors = {"*": torch.randn(3, 8), "@": torch.randn(2, 8)}
    save_embeddings(Embeddings(vectors, token_ids={"*": 999, "@": token_id(tiny, "@")}), path)
    manager = EmbeddingManager(tiny, progressive_words=True)
    with pytest.warns(UserWarning, match="records token id 999 for '\\*' but this tokenizer gives 8"):
        manager.load(path)
    assert manager.string_to_token_dict == {"*": 8, "@": 9}
    manager.set_training_step(4000)
    ids = tiny.tokenize(["@ in *"])
    embeds = tiny.embed_tokens(ids)
    expected = original_expansion(ids, embeds, [(8, vectors["*"]), (9, vectors["@"])])
    assert torch.equal(manager(ids, embeds), expected)


def test_placeholders_torch_refuses_as_names_get_safe_keys_that_survive_save_and_load(tiny, tmp_path):
    assert parameter_key("*") == "*"
    assert "." not in parameter_key("v1.0") and parameter_key("v1.0") != parameter_key("v10")
    assert parameter_key(parameter_key("v1.0")) != parameter_key("v1.0")
    # "training" is an nn.Module attribute, so it cannot be a ParameterDict key as it is.
    manager = EmbeddingManager(tiny, placeholder_strings=["training"], initializer_words=["cat"])
    assert sorted(manager.state_dict()) == [
        f"initial_embeddings.{parameter_key('training')}", f"string_to_param_dict.{parameter_key('training')}"
    ]
    path = str(tmp_path / "training.pt")
    manager.save(path)
    loaded = EmbeddingManager(tiny, embedding_manager_ckpt=path)
    assert list(loaded.string_to_token_dict) == ["training"]
    assert torch.equal(loaded.vectors("training"), manager.vectors("training"))


def test_a_wider_file_is_refused_with_the_dimension(tiny, tmp_path):
    wide = EmbeddingManager(TinyConditioner(dim=1280), placeholder_strings=["*"])
    path = str(tmp_path / "ldm.pt")
    wide.save(path)
    narrow = EmbeddingManager(TinyConditioner(dim=768), placeholder_strings=["*"])
    with pytest.raises(ValueError, match="1280") as error:
        narrow.load(path)
    assert "768" in str(error.value)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(text_config=TINY_CLIP_CONFIG).freeze()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BERTEmbedder(n_embed=64, n_layer=2).freeze()


def test_per_image_tokens_add_22_placeholders_without_touching_the_config_list(bert):
    placeholders = ["*"]
    manager = EmbeddingManager(bert, placeholder_strings=placeholders, initializer_words=["sculpture"],
                               per_image_tokens=True)
    assert placeholders == ["*"]
    assert list(manager.string_to_token_dict) == ["*", *per_img_token_list]
    assert len(set(manager.string_to_token_dict.values())) == 23
    assert list(manager.initial_embeddings.keys()) == ["*"]


def test_per_image_tokens_are_refused_for_clip_whose_bpe_splits_hebrew(clip):
    with pytest.raises(ValueError, match="per_image_tokens needs each of the 22 letters"):
        EmbeddingManager(clip, per_image_tokens=True)


def test_clip_placeholder_suggestions_skip_strings_its_bpe_splits(clip):
    with pytest.raises(ValueError) as error:
        EmbeddingManager(clip, placeholder_strings=["<cat>"])
    assert "['<', 'cat', '>']" in str(error.value)
    assert str(error.value).endswith("try one of * @ & $ ~")


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_real_conditioners_read_the_learned_vectors(name, request):
    conditioner = request.getfixturevalue(name)
    prompt = ["a photo of *"]
    manager = EmbeddingManager(conditioner, initializer_words=["sculpture"])
    plain = conditioner.encode(prompt)
    with_manager = conditioner.encode(prompt, embedding_manager=manager)
    position = conditioner.tokenize(prompt)[0].tolist().index(token_id(conditioner, "*"))
    assert not torch.allclose(with_manager[:, position], plain[:, position])
    if name == "clip":
        # Causal attention: the tokens before the placeholder cannot see it.
        assert torch.equal(with_manager[:, :position], plain[:, :position])
    assert torch.equal(conditioner.encode(["a photo of a cat"], manager), conditioner.encode(["a photo of a cat"]))

    table = conditioner.token_embedding.weight
    with torch.no_grad():
        manager.vectors("*").copy_(table[token_id(conditioner, "*")])
    assert torch.equal(conditioner.encode(prompt, embedding_manager=manager), plain)

    two = EmbeddingManager(conditioner, num_vectors_per_token=2)
    with torch.no_grad():
        two.vectors("*").copy_(table[[token_id(conditioner, "*"), token_id(conditioner, "cat")]])
    assert torch.equal(conditioner.encode(prompt, embedding_manager=two), conditioner.encode(["a photo of * cat"]))

    expected_family = {"clip": "sd-v1", "bert": "ldm"}[name]  # names the tokenizer at a width no other family has
    assert manager.model_family == expected_family


def test_model_family_trusts_the_width_over_a_file_but_not_over_a_tokenizer():
    assert model_family(768, "ldm") == "sd-v1" and model_family(1280, None) == "ldm"
    assert model_family(1024, "sd-v1") == "sd-v1" and model_family(32, "ldm") == "ldm"  # the width names none
    assert model_family(32, "sd-2") is None and model_family(32, None) is None
    assert model_family(768, "sd-v1", width_decides=False) == "sd-v1"
    assert model_family(1280, "sd-v1", width_decides=False) is None  # a CLIP tokenizer with LDM-BERT's width
    assert model_family(768, None, width_decides=False) is None  # a tokenizer of no stock family


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_a_placeholder_touching_punctuation_is_still_replaced(name, request):
    """CLIP's BPE reads "*," or "(*)" as one token; written with spaces, the prompt means the same."""
    conditioner = request.getfixturevalue(name)
    manager = EmbeddingManager(conditioner, placeholder_strings=["*", "dog"], initializer_words=["sculpture", "cat"])
    with torch.no_grad():
        manager.vectors("*").normal_()
    for prompt, spaced in [("a photo of *, red mug", "a photo of * , red mug"), ("(*) in dog's room.", "( * ) in dog's room.")]:
        separated = manager.prompt_for_tokenizer(prompt)
        assert torch.equal(conditioner.encode([separated], manager), conditioner.encode([spaced], manager))
    if name == "clip":
        assert token_id(conditioner, "*") not in conditioner.tokenize(["a photo of *, red mug"])[0].tolist()
    assert manager.prompt_for_tokenizer("a hotdog, a dog") == "a hotdog, a dog"


def test_the_model_separates_placeholders_in_training_captions_and_prompts():
    model = build_random_model(TINY_SD)
    with torch.no_grad():
        model.embedding_manager.vectors("*").normal_()
        assert torch.equal(model.get_learned_conditioning(["a photo of *, red mug"]),
                           model.get_learned_conditioning(["a photo of * , red mug"]))


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_a_files_word_of_several_tokens_is_read_through_a_stand_in_as_diffusers_and_a1111_read_it(name, request,
                                                                                                  tmp_path):
    """diffusers' "<cat-toy>" and A1111's file names ("mycat") are several tokens of our tokenizers; prompts name
    them as written, whatever the case, and a word that begins or ends with a letter only as a whole word."""
    conditioner = request.getfixturevalue(name)
    width = conditioner.token_dim
    toy, mine, star = torch.randn(2, width), torch.randn(1, width), torch.randn(1, width)
    torch.save({"string_to_param": {"*": star}}, tmp_path / "star.pt")
    several = Embeddings({"<cat-toy>": toy, "mycat": mine, "*": star})
    assert all(len(conditioner.text_to_token_ids(word)) > 1 for word in ["<cat-toy>", "mycat"])
    manager = EmbeddingManager(conditioner)
    manager.set_embeddings(several)
    single = EmbeddingManager(conditioner)
    single.set_embeddings(Embeddings({"@": toy, "&": mine, "*": star}))

    def encode(manager_, prompt):
        return conditioner.encode([manager_.prompt_for_tokenizer(prompt)], manager_)

    assert torch.equal(encode(manager, "a photo of <Cat-Toy>, mycat and *"), encode(single, "a photo of @ , & and *"))
    assert torch.equal(encode(manager, "MyCat."), encode(single, "& ."))
    for untouched in ["mycats", "a bobmycat", "my cat"]:
        assert manager.prompt_for_tokenizer(untouched) == untouched
    assert set(manager.stand_ins) == {"<cat-toy>", "mycat"} and list(manager.vector_norms()) == list(several.vectors)
    manager.save(tmp_path / "saved.pt")  # a stand-in's token id is not the word's: not recorded
    assert load_embeddings(tmp_path / "saved.pt").token_ids == {"*": token_id(conditioner, "*")}
    with pytest.raises(ValueError, match="'<Cat-Toy>' and '<cat-toy>' differ only in case"):
        manager.set_embeddings(Embeddings({"<Cat-Toy>": toy, "<cat-toy>": mine}))


def test_a_word_of_several_tokens_needs_a_free_stand_in_symbol(tiny, tmp_path):
    path = tmp_path / "learned_embeds.bin"  # diffusers' layout: {token: vector}
    torch.save({"cat dog": torch.randn(8)}, path)
    with pytest.raises(ValueError, match="placeholder 'cat dog' is several tokens.*convert_embedding.py --token"):
        EmbeddingManager(tiny).load(path)  # the toy vocabulary has none of the stand-in symbols


def test_refused_embeddings_leave_the_manager_as_it_was(tiny):
    manager = EmbeddingManager(tiny, placeholder_strings=["*"], initializer_words=["cat"])
    before = manager.vectors("*").detach().clone()
    for refused in [Embeddings({"@": torch.randn(1, 8), "cat dog": torch.randn(1, 8)}),
                    Embeddings({"@": torch.randn(1, 8), "*": torch.randn(1, 8), "[PAD]": torch.randn(1, 8)})]:
        with pytest.raises(ValueError, match="placeholder"):
            manager.set_embeddings(refused)
        assert list(manager.string_to_token_dict) == ["*"] and torch.equal(manager.vectors("*"), before)
        assert manager.initializer_words == {"*": "cat"}
    manager.set_embeddings(Embeddings({"@": torch.ones(2, 8)}))
    assert list(manager.string_to_token_dict) == ["@"] and torch.equal(manager.vectors("@"), torch.ones(2, 8))
