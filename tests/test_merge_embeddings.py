"""scripts/merge_embeddings.py: renames, family detection, refusals, the terminal dialogue, and that the merged
file works in an EmbeddingManager with every placeholder substituted."""
import importlib.util
import io

import pytest
import torch

from ldm.embeddings import Embeddings, load_embeddings, save_embeddings
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import BERTEmbedder, FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizers import bert_tokenizer, clip_tokenizer
from scripts import evaluate_toy

TINY_CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("scripts.merge_embeddings")


class FakeStdin(io.StringIO):
    def __init__(self, is_terminal):
        super().__init__()
        self.is_terminal = is_terminal

    def isatty(self):
        return self.is_terminal


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeStdin(True))


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeStdin(False))


def write(path, vectors: dict, metadata=None, seed=0):
    """An embedding file whose vectors are random tensors of the given (k, D) shapes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(*shape, generator=generator) for name, shape in vectors.items()}
    save_embeddings(Embeddings(tensors, metadata=metadata or {}), path)
    return str(path), tensors


def clip_id(text):
    (token,) = clip_tokenizer()(text, add_special_tokens=False).input_ids
    return token


def bert_id(text):
    (token,) = bert_tokenizer()(text, add_special_tokens=False).input_ids
    return token


def test_rename_merges_two_stars_and_the_clip_manager_substitutes_both(script, tmp_path, no_terminal, capsys):
    first, first_vectors = write(tmp_path / "cat.pt", {"*": (2, 32)}, seed=1,
                                 metadata={"placeholder_strings": ["*"], "initializer_words": ["cat"]})
    second, second_vectors = write(tmp_path / "style.pt", {"*": (1, 32)}, seed=2,
                                   metadata={"placeholder_strings": ["*"], "initializer_words": ["painting"]})
    out = tmp_path / "merged.pt"
    assert script.main(["--manager_ckpts", first, second, "--rename", "2:*=@", "--output_path", str(out), "-sd"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"*: {first}", f"@: {second} (was '*')",
                                                    f"wrote 2 placeholders to {out}"]

    merged = load_embeddings(out)
    assert list(merged.vectors) == ["*", "@"]
    assert torch.equal(merged.vectors["*"], first_vectors["*"])
    assert torch.equal(merged.vectors["@"], second_vectors["*"])
    assert merged.token_ids == {"*": clip_id("*"), "@": clip_id("@")}
    assert merged.metadata["merged_from"] == {"*": {"file": first, "placeholder": "*"},
                                              "@": {"file": second, "placeholder": "*"}}
    assert merged.metadata["model_family"] == "sd-v1" and merged.metadata["num_vectors_per_token"] == 2
    assert merged.metadata["initializer_words"] == ["cat", "painting"]
    assert evaluate_toy.default_init_word(merged, "@", str(out)) == "painting"

    torch.manual_seed(0)
    clip = FrozenCLIPEmbedder(text_config=TINY_CLIP_CONFIG).freeze()
    manager = EmbeddingManager(clip, embedding_manager_ckpt=str(out))
    ids = clip.tokenize(["a photo of * in the style of @"])
    substituted = manager(ids, clip.embed_tokens(ids))[0]
    star = ids[0].tolist().index(clip_id("*"))
    # "*" expands to its two vectors, which pushes "@" one slot further right.
    at = ids[0].tolist().index(clip_id("@")) + 1
    assert torch.equal(substituted[star:star + 2], first_vectors["*"])
    assert torch.equal(substituted[at], second_vectors["*"][0])


def test_three_bert_files_merge_in_order_into_a_bert_manager(script, tmp_path, no_terminal):
    ldm = {"model_family": "ldm"}
    a, a_vectors = write(tmp_path / "a.pt", {"*": (1, 64)}, ldm, seed=1)
    b, b_vectors = write(tmp_path / "b.pt", {"*": (3, 64), "&": (1, 64)},
                         {**ldm, "placeholder_strings": ["*", "&"], "initializer_words": ["cat", "toy"]}, seed=2)
    c, c_vectors = write(tmp_path / "c.pt", {"*": (2, 64)}, ldm, seed=3)
    out = str(tmp_path / "abc.pt")
    argv = ["--manager_ckpts", a, b, c, "--rename", "2:*=@", "--rename", "3:*=dog", "--output_path", out]
    assert script.main(argv) == 0

    merged = load_embeddings(out)
    expected = {"*": a_vectors["*"], "@": b_vectors["*"], "&": b_vectors["&"], "dog": c_vectors["*"]}
    assert list(merged.vectors) == list(expected)
    assert all(torch.equal(merged.vectors[name], vectors) for name, vectors in expected.items())
    assert merged.token_ids == {name: bert_id(name) for name in expected}
    assert merged.metadata["initializer_words"] == [None, "cat", "toy", None]

    torch.manual_seed(0)
    bert = BERTEmbedder(n_embed=64, n_layer=2).freeze()
    manager = EmbeddingManager(bert, embedding_manager_ckpt=out)
    assert manager.string_to_token_dict == merged.token_ids
    for name, vectors in expected.items():
        assert torch.equal(manager.vectors(name), vectors)
    ids = bert.tokenize(["dog"])
    assert torch.equal(manager(ids, bert.embed_tokens(ids))[0, 1:3], c_vectors["*"])


def test_family_follows_the_width_and_a_contradicting_flag_is_an_error(script, tmp_path, no_terminal, capsys):
    clip_file, _ = write(tmp_path / "clip.pt", {"*": (1, 768)})
    bert_file, _ = write(tmp_path / "bert.pt", {"*": (1, 1280)})
    assert script.main(["--manager_ckpts", clip_file, "--output_path", str(tmp_path / "clip_out.pt")]) == 0
    assert load_embeddings(tmp_path / "clip_out.pt").token_ids == {"*": clip_id("*")}
    assert script.main(["--manager_ckpts", bert_file, "--output_path", str(tmp_path / "bert_out.pt")]) == 0
    assert load_embeddings(tmp_path / "bert_out.pt").token_ids == {"*": bert_id("*")}
    capsys.readouterr()

    assert script.main(["--manager_ckpts", bert_file, "--output_path", str(tmp_path / "x.pt"), "-sd"]) == 1
    error = capsys.readouterr().err
    assert "-sd asks for the CLIP tokenizer" in error and "1280-wide (LDM-BERT)" in error
    assert not (tmp_path / "x.pt").exists()


def test_files_of_different_widths_are_refused(script, tmp_path, no_terminal, capsys):
    clip_file, _ = write(tmp_path / "clip.pt", {"*": (1, 768)})
    bert_file, _ = write(tmp_path / "bert.pt", {"@": (1, 1280)})
    out = tmp_path / "out.pt"
    assert script.main(["--manager_ckpts", clip_file, bert_file, "--output_path", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "different widths" in error
    assert f"'{clip_file}' is 768-wide (SD v1 CLIP ViT-L/14)" in error and f"'{bert_file}' is 1280-wide" in error
    assert not out.exists()


def test_a_conflict_without_a_terminal_asks_for_rename(script, tmp_path, no_terminal, capsys):
    first, _ = write(tmp_path / "a.pt", {"*": (1, 768)})
    second, _ = write(tmp_path / "b.pt", {"*": (1, 768)})
    out = tmp_path / "out.pt"

    def no_input(prompt):
        raise AssertionError("stdin is not a terminal; nothing may be asked")

    assert script.main(["--manager_ckpts", first, second, "--output_path", str(out)], input_fn=no_input) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"placeholder '*' of '{second}' is already taken by '{first}'" in error
    assert "pass --rename 2:*=NEW" in error
    assert not out.exists()


def test_at_the_terminal_a_multi_token_answer_is_asked_again(script, tmp_path, terminal):
    first, first_vectors = write(tmp_path / "a.pt", {"*": (1, 768)}, seed=1)
    second, second_vectors = write(tmp_path / "b.pt", {"*": (1, 768)}, seed=2)
    answers, prompts = iter(["<cat>", " @ "]), []

    def answer(prompt):
        prompts.append(prompt)
        return next(answers)

    out = str(tmp_path / "out.pt")
    assert script.main(["--manager_ckpts", first, second, "--output_path", out], input_fn=answer) == 0
    assert prompts == [
        f"Placeholder '*' of '{second}' is already taken by '{first}'. Enter a replacement: ",
        "'<cat>' is not one CLIP (SD v1) token (it becomes ['<', 'cat', '>']). Enter another replacement: ",
    ]
    merged = load_embeddings(out)
    assert merged.token_ids == {"*": clip_id("*"), "@": clip_id("@")}
    assert torch.equal(merged.vectors["@"], second_vectors["*"])


def test_merging_refuses_a_placeholder_in_the_embedding_managers_words(script):
    merged = script.MergedPlaceholders("sd-v1")
    torch.manual_seed(0)
    clip = FrozenCLIPEmbedder(text_config=TINY_CLIP_CONFIG)
    for name in ["<cat>", "", "<|endoftext|>"]:
        problem = merged.problem(name)
        with pytest.raises(ValueError) as error:
            EmbeddingManager(clip, placeholder_strings=[name])
        assert str(error.value).startswith(f"placeholder '{name}' {problem}: try one of")


def test_family_comes_from_the_width_then_the_record_then_the_flag(script):
    def files(*families):
        return [Embeddings({"*": torch.zeros(1, 8)}, metadata={"model_family": f} if f else {}) for f in families]

    assert script.choose_family(768, files("ldm"), False) == "sd-v1"  # the width outranks a record
    assert script.choose_family(32, files("sd-v1", None), False) == "sd-v1"
    assert script.choose_family(32, files(None), True) == "sd-v1" and script.choose_family(32, files(), False) == "ldm"
    with pytest.raises(ValueError, match=r"record different model families \(ldm, sd-v1\)"):
        script.choose_family(32, files("sd-v1", "ldm"), False)
    with pytest.raises(ValueError, match="-sd asks for the CLIP tokenizer, but the files are 32-wide embeddings for "
                                         r"BERT \(LDM\): drop -sd"):
        script.choose_family(32, files("ldm"), True)


def test_same_token_under_another_spelling_is_a_conflict(script, tmp_path, no_terminal, capsys):
    first, _ = write(tmp_path / "a.pt", {"x": (1, 1280)})
    second, _ = write(tmp_path / "b.pt", {"X": (1, 1280)})
    assert script.main(["--manager_ckpts", first, second, "--output_path", str(tmp_path / "o.pt")]) == 1
    assert f"'X' of '{second}' is the same token as 'x' from '{first}'" in capsys.readouterr().err


@pytest.mark.parametrize("rename, message", [
    ("*=@", "is not N:OLD=NEW"),
    ("3:*=@", "file number 3 is not between 1 and 2"),
    ("2:&=@", "has no placeholder '&' (it has *)"),
    ("2:*=*", "--rename 2:*=*: '*' is already taken"),
    ("2:*=<cat>", "'<cat>' is not one CLIP (SD v1) token"),
])
def test_bad_renames_are_one_line_errors(script, tmp_path, no_terminal, capsys, rename, message):
    first, _ = write(tmp_path / "a.pt", {"*": (1, 768)})
    second, _ = write(tmp_path / "b.pt", {"*": (1, 768)})
    argv = ["--manager_ckpts", first, second, "--rename", rename, "--output_path", str(tmp_path / "o.pt")]
    assert script.main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_an_output_path_under_a_file_names_the_flag(script, tmp_path, no_terminal, capsys):
    first, _ = write(tmp_path / "cat.pt", {"*": (1, 32)})
    (tmp_path / "notes.txt").write_text("not a folder")
    argv = ["--manager_ckpts", first, "--output_path", str(tmp_path / "notes.txt" / "merged.pt")]
    assert script.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert "--output_path" in error and f"its folder '{tmp_path / 'notes.txt'}' is a file" in error


def test_an_output_path_that_is_an_input_is_refused(script, tmp_path, no_terminal, capsys, monkeypatch):
    first, _ = write(tmp_path / "cat.pt", {"*": (1, 32)})
    second, _ = write(tmp_path / "style.pt", {"@": (1, 32)})
    before = (tmp_path / "style.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert script.main(["--manager_ckpts", first, second, "--output_path", "./style.pt", "-sd"]) == 1
    error = capsys.readouterr().err.strip()
    assert "--output_path './style.pt' is also one of --manager_ckpts, which would be replaced: pass another " \
           "--output_path" in error and "\n" not in error
    assert (tmp_path / "style.pt").read_bytes() == before


def test_build_bert_vocab_has_help_without_blingfire_and_says_how_to_install_it(monkeypatch, capsys):
    build_bert_vocab = importlib.import_module("scripts.build_bert_vocab")
    with pytest.raises(SystemExit) as exit_info:
        build_bert_vocab.main(["--help"])
    assert exit_info.value.code == 0 and "blingfire" in capsys.readouterr().out
    monkeypatch.setattr(build_bert_vocab.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install blingfire"):
        build_bert_vocab.main(["vocab.txt"])


def test_an_existing_output_is_replaced_only_with_force(script, tmp_path, no_terminal, capsys):
    first, _ = write(tmp_path / "cat.pt", {"*": (1, 768)})
    out = tmp_path / "merged.pt"
    out.write_bytes(b"an earlier merge")
    argv = ["--manager_ckpts", first, "--output_path", str(out)]
    assert script.main(argv) == 1
    error = capsys.readouterr().err
    assert f"--output_path '{out}' already exists: pass another --output_path, or --force to replace it" in error
    assert error.count("\n") == 1 and out.read_bytes() == b"an earlier merge"
    assert script.main(argv + ["--force"]) == 0
    assert list(load_embeddings(out).vectors) == ["*"]


def test_ctrl_c_at_the_rename_prompt_writes_nothing(script, tmp_path, terminal, capsys):
    first, _ = write(tmp_path / "a.pt", {"*": (1, 768)})
    second, _ = write(tmp_path / "b.pt", {"*": (1, 768)})
    out = tmp_path / "out.pt"

    def interrupted(prompt):
        raise KeyboardInterrupt

    try:
        code = script.main(["--manager_ckpts", first, second, "--output_path", str(out)], input_fn=interrupted)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C at the rename prompt ended in a traceback")
    assert code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nothing was written; pass --rename N:OLD=NEW" in error
    assert not out.exists()


def test_a_non_finite_embedding_is_not_merged(script, tmp_path, no_terminal, capsys):
    first, _ = write(tmp_path / "a.pt", {"*": (1, 768)})
    second = tmp_path / "nan.pt"
    save_embeddings(Embeddings({"@": torch.full((1, 768), float("inf"))}), second)
    out = tmp_path / "out.pt"
    assert script.main(["--manager_ckpts", first, str(second), "--output_path", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"'{second}': '@' holds 768 NaN or infinite values" in error
    assert not out.exists()
