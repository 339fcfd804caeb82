"""Embedding files: every layout users share loads to the same vectors, ours load elsewhere, bad files fail clearly."""
import argparse
import base64
import importlib.util
import json
import os
import pickle
import re
import zipfile

import pytest
import safetensors.torch
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from ldm import embeddings as embeddings_module
from ldm.embeddings import Embeddings, load_embeddings, merge_embeddings, save_embeddings


def load_script():
    return importlib.import_module("scripts.convert_embedding")


def random_vectors(rows=2, width=768, seed=0):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def assert_same_vectors(loaded: dict, expected: dict):
    assert list(loaded) == list(expected)
    for key, vectors in expected.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], vectors.reshape(-1, vectors.shape[-1]).float())


def original_repo_dict(vectors):
    """What the original repo's EmbeddingManager.save pickled."""
    return {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": nn.ParameterDict({"*": nn.Parameter(vectors)}),
    }


def a1111_dict(vectors, name="mycat"):
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.clone().requires_grad_(True)},
        "name": name,
        "step": 500,
        "sd_checkpoint": "abcd1234",
        "sd_checkpoint_name": "v1-5-pruned",
    }


def test_original_repo_file_loads_with_only_parameterdict_allowed(tmp_path):
    vectors = random_vectors(1)
    path = tmp_path / "embeddings.pt"
    torch.save(original_repo_dict(vectors), path)
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert needed == ["torch.nn.modules.container.ParameterDict"]
    loaded = load_embeddings(path, expected_dim=768)
    assert_same_vectors(loaded.vectors, {"*": vectors})
    assert loaded.token_ids == {"*": 265}
    assert not loaded.vectors["*"].requires_grad


def test_original_file_with_several_placeholders_and_an_older_torch_parameterdict(tmp_path):
    """torch before 2.0 pickled ParameterDicts without `_keys`; their entries must still be found."""
    vectors = {"*": random_vectors(3, 1280, seed=1), "@": random_vectors(3, 1280, seed=2)}
    params = nn.ParameterDict({k: nn.Parameter(v) for k, v in vectors.items()})
    del params.__dict__["_keys"]
    path = tmp_path / "ldm.pt"
    torch.save({"string_to_token": {"*": torch.tensor(1008), "@": torch.tensor(1030)}, "string_to_param": params}, path)
    loaded = load_embeddings(path)
    assert_same_vectors(loaded.vectors, vectors)
    assert loaded.token_ids == {"*": 1008, "@": 1030}
    assert loaded.dim == 1280


def test_a1111_pt_uses_name_as_placeholder_and_keeps_its_fields(tmp_path):
    vectors = random_vectors(4)
    path = tmp_path / "whatever.pt"
    torch.save(a1111_dict(vectors), path)
    loaded = load_embeddings(path)
    assert_same_vectors(loaded.vectors, {"mycat": vectors})
    assert loaded.token_ids == {}
    assert loaded.metadata == {
        "name": "mycat", "step": 500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5-pruned"
    }


def test_a1111_png_chunk_loads_bit_exact(tmp_path):
    vectors = random_vectors(2)
    data = a1111_dict(vectors, name="pngcat")
    data["string_to_param"] = {"*": {"TORCHTENSOR": vectors.tolist()}}
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    path = tmp_path / "pngcat-500.png"
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    loaded = load_embeddings(path)
    assert_same_vectors(loaded.vectors, {"pngcat": vectors})
    assert loaded.metadata["step"] == 500


def test_png_without_chunk_names_the_unsupported_pixel_variant(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "white").save(path)
    with pytest.raises(ValueError, match=r"plain\.png.*sd-ti-embedding.*pixels"):
        load_embeddings(path)


@pytest.mark.parametrize("rows", [None, 1, 3], ids=["1-D", "1x768", "3x768"])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_diffusers_files_load(tmp_path, rows, suffix):
    vectors = random_vectors(1 if rows is None else rows, seed=3)
    if rows is None:
        vectors = vectors[0]
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".bin":
        torch.save({"<cat-toy>": vectors}, path)
    else:
        safetensors.torch.save_file({"<cat-toy>": vectors}, path, metadata={"format": "pt"})
    loaded = load_embeddings(path)
    assert_same_vectors(loaded.vectors, {"<cat-toy>": vectors})
    assert loaded.vectors["<cat-toy>"].shape == (1 if rows is None else rows, 768)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_emb_params_files_take_the_file_stem_and_upcast_half_precision(tmp_path, suffix):
    vectors = random_vectors(2, seed=4).half()
    path = tmp_path / f"EasyNegative{suffix}"
    if suffix == ".pt":
        torch.save({"emb_params": vectors}, path)
    else:
        safetensors.torch.save_file({"emb_params": vectors}, path, metadata={"modelspec.title": "EasyNegative"})
    loaded = load_embeddings(path)
    assert_same_vectors(loaded.vectors, {"EasyNegative": vectors})
    if suffix == ".safetensors":
        assert loaded.metadata == {"modelspec.title": "EasyNegative"}


def test_round_trip_original_diffusers_a1111_original_is_bit_exact(tmp_path):
    metadata = {"model_family": "sd-v1", "step": 3000, "initializer_words": ["toy"], "num_vectors_per_token": 2}
    start = Embeddings({"<cat-toy>": random_vectors(2, seed=5)}, {"<cat-toy>": 49408}, metadata)
    save_embeddings(start, tmp_path / "a" / "embeddings.pt", "original")
    first = load_embeddings(tmp_path / "a" / "embeddings.pt")
    save_embeddings(first, tmp_path / "b" / "learned_embeds.safetensors", "diffusers")
    second = load_embeddings(tmp_path / "b" / "learned_embeds.safetensors")
    assert second.token_ids == {"<cat-toy>": 49408}
    save_embeddings(second, tmp_path / "c" / "cat-toy.pt", "a1111")
    third = load_embeddings(tmp_path / "c" / "cat-toy.pt")
    save_embeddings(third, tmp_path / "d" / "embeddings.pt", "original")
    final = load_embeddings(tmp_path / "d" / "embeddings.pt")
    for step in (first, second, third, final):
        assert_same_vectors(step.vectors, start.vectors)
        assert step.metadata == metadata


@pytest.mark.parametrize(
    ("format", "file_name", "placeholder", "keeps_metadata"),
    [
        ("original", "e.pt", "<cat-toy>", True),
        ("diffusers", "learned_embeds.bin", "<cat-toy>", False),
        ("a1111", "e.bin", "<cat-toy>", True),
        ("a1111", "cat.safetensors", "cat", True),
    ],
)
def test_every_format_round_trips(tmp_path, format, file_name, placeholder, keeps_metadata):
    strided = random_vectors(1024, 3, seed=6).T
    original = Embeddings({"<cat-toy>": strided}, {}, {"note": "hi", "step": 7})
    save_embeddings(original, tmp_path / file_name, format)
    loaded = load_embeddings(tmp_path / file_name, expected_dim=1024)
    assert_same_vectors(loaded.vectors, {placeholder: original.vectors["<cat-toy>"]})
    assert (loaded.metadata == original.metadata) is keeps_metadata


def test_our_original_file_loads_with_plain_weights_only(tmp_path):
    vectors = {"*": random_vectors(1, seed=7), "<dog>": random_vectors(2, seed=8)}
    path = tmp_path / "embeddings.pt"
    save_embeddings(Embeddings(vectors, {"*": 265}, {"step": 12}), path)
    raw = torch.load(path, weights_only=True)
    assert type(raw["string_to_param"]) is dict
    assert torch.equal(raw["string_to_param"]["*"], vectors["*"])
    assert raw["string_to_token"]["*"].dtype == torch.int64 and raw["string_to_token"]["*"].ndim == 0
    assert int(raw["string_to_token"]["*"]) == 265 and int(raw["string_to_token"]["<dog>"]) == -1
    assert (raw["name"], raw["step"]) == ("*", 12)
    assert load_embeddings(path).token_ids == {"*": 265}


# AUTOMATIC1111's safe loader (modules/safe.py) checks a pickle before torch.load sees it: a zip may hold only
# data.pkl, version and data/N entries, and the pickle only these globals.
A1111_ZIP_ENTRY = re.compile(r"^[^/]+/(data/\d+|version|data\.pkl)$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "LongStorage"), ("torch", "IntStorage"),
    ("torch.nn.modules.container", "ParameterDict"),
}


class A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):  # ("storage", storage class, key, location, size, ...)
        assert saved_id[0] == "storage"
        return saved_id[1](saved_id[4])


def passes_a1111_safe_loader(path) -> bool:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return all(A1111_ZIP_ENTRY.match(name) for name in archive.namelist())
    with open(path, "rb") as handle:  # torch's legacy format: five pickles in a row
        unpickler = A1111Unpickler(handle)
        for _ in range(5):
            unpickler.load()
    return True


@pytest.mark.parametrize(("format", "file_name"),
                         [("original", "embeddings.pt"), ("a1111", "cat.pt"), ("diffusers", "learned_embeds.bin")])
def test_our_pickles_pass_a1111s_safe_loader(tmp_path, format, file_name):
    path = tmp_path / file_name
    save_embeddings(Embeddings({"<cat>": random_vectors(2)}, {"<cat>": 7}, {"step": 3}), path, format)
    assert passes_a1111_safe_loader(path)
    zipped = tmp_path / "zipped.pt"
    torch.save(torch.load(path, weights_only=True), zipped)  # what torch writes by default does not pass
    assert not passes_a1111_safe_loader(zipped)


def test_every_cut_of_a_pickle_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "embeddings.pt"
    save_embeddings(Embeddings({"*": random_vectors(1)}), path)
    data = path.read_bytes()
    for length in range(1, len(data), max(1, len(data) // 60)):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_embeddings(path)


def test_a_lone_clip_l_file_takes_the_file_stem(tmp_path):
    """diffusers' pivotal-tuning script writes SD 1.5 embeddings as {"clip_l": (k, 768)}."""
    vectors = random_vectors(2)
    path = tmp_path / "my_dog.safetensors"
    safetensors.torch.save_file({"clip_l": vectors}, path)
    assert_same_vectors(load_embeddings(path).vectors, {"my_dog": vectors})


class NotAnEmbedding:
    pass


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"string_to_param": {"*": torch.zeros(1, 4)}, "extra": NotAnEmbedding()}, "NotAnEmbedding"),
        ({"emb_params": torch.zeros(1, 4), "args": argparse.Namespace(lr=1)}, "argparse.Namespace"),
    ],
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickles_needing_other_globals_are_refused_by_name(tmp_path, payload, named, zip_format):
    path = tmp_path / "evil.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match=rf"evil\.pt.*{named}.*refusing to run pickled code") as caught:
        load_embeddings(path)
    assert "\n" not in str(caught.value)


def write_sdxl(path):
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, path)


def write_checkpoint(path):
    torch.save({"state_dict": {"w": torch.zeros(3, 3, 3, 3)}, "global_step": 5}, path)


def write_plain_pickle(path):
    path.write_bytes(pickle.dumps({"<x>": [0.0] * 8}))


def write_truncated(path):
    torch.save({"<x>": torch.zeros(1, 8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_safetensors(path):
    safetensors.torch.save_file({"<x>": torch.zeros(1, 8)}, path)
    path.write_bytes(path.read_bytes()[:-8])


@pytest.mark.parametrize(
    ("file_name", "write", "expected"),
    [
        ("cut.pt", write_truncated, "truncated or corrupt PyTorch"),
        ("cut.safetensors", write_truncated_safetensors, "truncated or corrupt safetensors"),
        ("empty.pt", lambda p: p.write_bytes(b""), "empty"),
        ("config.pt", lambda p: p.write_text("model:\n  target: ldm.models.X\n"), "text file .*'model:'"),
        ("sdxl.safetensors", write_sdxl, "SDXL.*clip_g, clip_l"),
        ("model.ckpt", write_checkpoint, "model checkpoint"),
        ("tensor.pt", lambda p: torch.save(torch.zeros(2, 768), p), r"tensor of shape \(2, 768\) rather than a dict"),
        ("plain.pkl", write_plain_pickle, "weights-only loader cannot read .*Unsupported operand"),
        ("bad.pt", lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, 2, 3)}}, p), r"shape \(1, 2, 3\)"),
        ("garbled.pt", lambda p: p.write_bytes(b"\x80\x02h\x05."), "truncated or corrupt PyTorch file .*KeyError"),
        ("stackless.pt", lambda p: p.write_bytes(b"\x80\x02."), "truncated or corrupt PyTorch file .*IndexError"),
        ("lfs.safetensors", lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
         "a Git LFS pointer, not the file itself: fetch the real file with git lfs pull"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, file_name, write, expected):
    path = tmp_path / file_name
    write(path)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}'.*{expected}") as caught:
        load_embeddings(path)
    assert "\n" not in str(caught.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_embeddings(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="is a folder"):
        load_embeddings(tmp_path)


def test_expected_dim_mismatch_names_both_widths_and_families(tmp_path):
    path = tmp_path / "x.pt"
    save_embeddings(Embeddings({"*": random_vectors(1, 1280)}), path)
    with pytest.raises(ValueError, match=r"'.*x\.pt' are 1280-wide \(LDM-BERT\).*768-wide \(SD v1 CLIP ViT-L/14\)"):
        load_embeddings(path, expected_dim=768)
    assert load_embeddings(path, expected_dim=1280).dim == 1280


def test_dim_rejects_mixed_widths():
    with pytest.raises(ValueError, match="'a' is 768-wide, 'b' is 1024-wide"):
        Embeddings({"a": torch.zeros(1, 768), "b": torch.zeros(1, 1024)}).dim


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.pt"
    save_embeddings(Embeddings({"*": random_vectors(1)}), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_embeddings(Embeddings({"*": random_vectors(1, seed=9)}, metadata={"callback": object()}), path)

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(embeddings_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_embeddings(Embeddings({"*": random_vectors(1, seed=10)}), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["embeddings.pt"]


def test_save_refuses_what_a_format_cannot_hold(tmp_path):
    two = Embeddings({"<a>": torch.zeros(1, 8), "<b>": torch.zeros(1, 8)})
    with pytest.raises(ValueError, match="one token per file"):
        save_embeddings(two, tmp_path / "learned_embeds.safetensors", "diffusers")
    with pytest.raises(ValueError, match=r"ending in \.pt or \.bin"):
        save_embeddings(two, tmp_path / "embeddings.safetensors", "original")
    with pytest.raises(ValueError, match="unknown embedding format"):
        save_embeddings(two, tmp_path / "e.pt", "comfy")
    assert os.listdir(tmp_path) == []


def test_convert_original_to_diffusers_with_token(tmp_path, capsys):
    vectors = random_vectors(2, seed=11)
    source = tmp_path / "embeddings.pt"
    torch.save(original_repo_dict(vectors), source)
    target = tmp_path / "out" / "learned_embeds.safetensors"
    script = load_script()
    arguments = ["--input", str(source), "--output", str(target), "--format", "diffusers", "--token", "<cat-toy>"]
    assert script.main(arguments) == 0
    assert capsys.readouterr().out.strip() == f"<cat-toy>: 2 x 768 -> {target} (diffusers)"
    converted = load_embeddings(target)
    assert_same_vectors(converted.vectors, {"<cat-toy>": vectors})
    assert converted.token_ids == {}
    named = tmp_path / "cat.pt"
    assert script.main(["--input", str(target), "--output", str(named), "--format", "a1111", "--name", "cattoy"]) == 0
    assert capsys.readouterr().out.strip() == f"cattoy: 2 x 768 -> {named} (a1111)"
    assert_same_vectors(load_embeddings(named).vectors, {"cattoy": vectors})
    # Without --name or --token, the word is the file name, which A1111 reads: every reader then agrees.
    assert script.main(["--input", str(source), "--output", str(tmp_path / "mycat.pt"), "--format", "a1111"]) == 0
    assert capsys.readouterr().out.strip() == f"mycat: 2 x 768 -> {tmp_path / 'mycat.pt'} (a1111)"
    assert torch.load(tmp_path / "mycat.pt", weights_only=True)["name"] == "mycat"


def test_convert_token_renames_the_placeholder_in_the_metadata_too(tmp_path, capsys):
    source, target = tmp_path / "star.pt", tmp_path / "cat-toy.pt"
    metadata = {"model_family": "sd-v1", "placeholder_strings": ["*"], "initializer_words": ["toy"], "name": "*"}
    save_embeddings(Embeddings({"*": random_vectors(1)}, {"*": 265}, metadata), source)
    argv = ["--input", str(source), "--output", str(target), "--format", "original", "--token", "<cat-toy>"]
    assert load_script().main(argv) == 0
    converted = load_embeddings(target)
    assert converted.metadata == {"model_family": "sd-v1", "placeholder_strings": ["<cat-toy>"],
                                  "initializer_words": ["toy"]}
    assert converted.initializer_word("<cat-toy>") == "toy" and converted.token_ids == {}


def test_renamed_keeps_each_word_with_its_initializer_word():
    metadata = {"placeholder_strings": ["*", "@"], "initializer_words": ["cat", "painting"], "step": 5}
    embeddings = Embeddings({"*": torch.zeros(1, 8), "@": torch.ones(2, 8)}, {"*": 265, "@": 339}, metadata)
    renamed = embeddings.renamed("*", "<cat>")
    assert list(renamed.vectors) == ["<cat>", "@"] and torch.equal(renamed.vectors["@"], torch.ones(2, 8))
    assert renamed.token_ids == {"@": 339}  # "<cat>" is another string: its id is unknown
    assert [renamed.initializer_word(p) for p in renamed.vectors] == ["cat", "painting"]
    assert renamed.metadata["step"] == 5 and embeddings.metadata == metadata  # the original is left alone
    assert embeddings.renamed("@", "@") is embeddings
    with pytest.raises(ValueError, match="cannot rename '\\*' to '@': '@' is another placeholder"):
        embeddings.renamed("*", "@")
    with pytest.raises(ValueError, match="no placeholder '&' to rename"):
        embeddings.renamed("&", "$")


def test_merging_keeps_file_order_and_records_where_each_word_came_from(tmp_path):
    cat = Embeddings({"*": random_vectors(2, 8, seed=1), "@": random_vectors(1, 8, seed=2)}, {"*": 265, "@": 339},
                     {"placeholder_strings": ["*", "@"], "initializer_words": ["cat", None], "step": 7})
    style = Embeddings({"*": random_vectors(1, 8, seed=3)}, {"*": 265},
                       {"placeholder_strings": ["*"], "initializer_words": ["painting"]})
    merged = merge_embeddings([("cat.pt", cat), ("style.pt", style)], [{}, {"*": "&"}])
    assert list(merged.vectors) == ["*", "@", "&"] and torch.equal(merged.vectors["&"], style.vectors["*"])
    assert merged.token_ids == {"*": 265, "@": 339}  # "&" is another string: its id is unknown
    assert merged.metadata == {
        "dim": 8, "placeholder_strings": ["*", "@", "&"], "initializer_words": ["cat", None, "painting"],
        "num_vectors_per_token": 2,
        "merged_from": {"*": {"file": "cat.pt", "placeholder": "*"}, "@": {"file": "cat.pt", "placeholder": "@"},
                        "&": {"file": "style.pt", "placeholder": "*"}},
    }  # no step: a progressive config uses every vector
    save_embeddings(merged, tmp_path / "merged.pt")
    assert load_embeddings(tmp_path / "merged.pt").metadata == merged.metadata

    with pytest.raises(ValueError) as error:
        merge_embeddings([("cat.pt", cat), ("style.pt", style)])
    assert str(error.value) == ("placeholder '*' is defined in both 'cat.pt' and 'style.pt': merge them with "
                                "scripts/merge_embeddings.py --manager_ckpts <both files> --rename '2:*=NEW'")
    wide = Embeddings({"$": random_vectors(1, 768)})
    with pytest.raises(ValueError, match=r"different widths \('cat.pt' is 8-wide, 'wide.pt' is 768-wide"):
        merge_embeddings([("cat.pt", cat), ("wide.pt", wide)])


def test_convert_errors_exit_non_zero_with_one_line(tmp_path, capsys):
    script = load_script()
    missing = tmp_path / "missing.pt"
    assert script.main(["--input", str(missing), "--output", str(tmp_path / "o.pt"), "--format", "a1111"]) == 1
    error = capsys.readouterr().err.strip()
    assert "missing.pt" in error and "\n" not in error
    source = tmp_path / "star.pt"
    save_embeddings(Embeddings({"*": random_vectors(1)}), source)
    assert script.main(["--input", str(source), "--output", str(tmp_path / "o.bin"), "--format", "diffusers"]) == 1
    assert "pass --token" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()
    assert script.main(["--input", str(source), "--output", str(tmp_path / "o.pt"), "--format", "original",
                        "--name", "cat"]) == 1
    assert "use it with --format a1111" in capsys.readouterr().err
    # An emb_params .safetensors file holds no word: readers name it after the file.
    for flag in ("--token", "--name"):
        argv = ["--input", str(source), "--output", str(tmp_path / "cat.safetensors"), "--format", "a1111"]
        assert script.main(argv + [flag, "<cat>"]) == 1
        error = capsys.readouterr().err.strip()
        assert f"{flag} '<cat>': an a1111 .safetensors file holds only the vectors (emb_params) and its word is the " \
               f"file name, here 'cat': name the file '{tmp_path / '<cat>.safetensors'}' instead, or write a .pt" in error
        assert "\n" not in error and not (tmp_path / "cat.safetensors").exists()
    assert script.main(argv + ["--token", "cat"]) == 0
    assert list(load_embeddings(tmp_path / "cat.safetensors").vectors) == ["cat"]
    capsys.readouterr()
    save_embeddings(Embeddings({"@": random_vectors(1)}), source)  # any single character is a CLIP word too
    assert script.main(["--input", str(source), "--output", str(tmp_path / "o.bin"), "--format", "diffusers"]) == 1
    assert "'@', which is already in the CLIP tokenizer's vocabulary" in capsys.readouterr().err


def test_convert_renames_the_a1111_trigger_and_records_token_ids_for_the_original_loader(tmp_path, capsys):
    script = load_script()
    vectors = random_vectors(2, seed=3)
    source = tmp_path / "mycat.pt"
    torch.save(a1111_dict(vectors, name="mycat"), source)
    renamed = tmp_path / "renamed.pt"
    assert script.main(["--input", str(source), "--output", str(renamed), "--format", "a1111", "--token", "<c>"]) == 0
    assert torch.load(renamed, weights_only=True)["name"] == "<c>"
    original = tmp_path / "original.pt"
    assert script.main(["--input", str(renamed), "--output", str(original), "--format", "original",
                        "--token", "*"]) == 0
    raw = torch.load(original, weights_only=True)
    assert int(raw["string_to_token"]["*"]) == 265 and raw["name"] == "*"
    capsys.readouterr()
    kept = tmp_path / "kept.pt"
    assert script.main(["--input", str(renamed), "--output", str(kept), "--format", "original"]) == 0
    assert "'<c>' is not one token" in capsys.readouterr().err  # several tokens: no id for the original's loader


class EmptyVocabulary:
    """The two tokenizer members diffusers' state-dict parsing touches."""

    added_tokens_encoder: dict = {}

    def get_vocab(self):
        return {}


@pytest.mark.parametrize(
    ("format", "file_name", "expected_token"),
    [
        ("diffusers", "learned_embeds.safetensors", "<cat-toy>"),
        ("diffusers", "learned_embeds.bin", "<cat-toy>"),
        ("a1111", "cat.pt", "<cat-toy>"),
    ],
)
def test_diffusers_parses_our_files_to_the_same_vectors(tmp_path, format, file_name, expected_token):
    textual_inversion = pytest.importorskip("diffusers.loaders.textual_inversion")
    mixin = textual_inversion.TextualInversionLoaderMixin
    vectors = random_vectors(2, seed=12)
    path = tmp_path / file_name
    save_embeddings(Embeddings({"<cat-toy>": vectors}, metadata={"step": 4}), path, format)
    state_dicts = textual_inversion.load_textual_inversion_state_dicts([str(path)])
    tokens, embeddings = mixin._retrieve_tokens_and_embeddings([None], state_dicts, EmptyVocabulary())
    tokens, rows = mixin._extend_tokens_and_embeddings(tokens, embeddings, EmptyVocabulary())
    assert tokens == [expected_token, f"{expected_token}_1"]
    assert torch.equal(torch.stack(rows), vectors)


def write_diffusers(path, value):
    """A diffusers-layout file holding `value` under '<x>', pickled or safetensors by the suffix."""
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({"<x>": value}, path)
    else:
        torch.save({"<x>": value}, path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("file_name", ["embeddings.pt", "learned_embeds.safetensors", "cat.bin"])
def test_non_finite_vectors_are_refused_naming_the_file_and_the_placeholder(tmp_path, bad, file_name):
    """A diverged run's vectors gave black images at generation and loss=nan in training, far from the file."""
    vectors = random_vectors(2)
    vectors[1, 5] = bad
    path = tmp_path / file_name
    format = {".pt": "original", ".safetensors": "diffusers", ".bin": "a1111"}[path.suffix]
    save_embeddings(Embeddings({"<x>": vectors}), path, format)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}': '<x>' holds 1 NaN or "
                                         "infinite values .*: use an embedding saved before the loss became nan"
                       ) as caught:
        load_embeddings(path)
    assert "\n" not in str(caught.value)


def test_a_non_finite_embedding_is_not_converted(tmp_path, capsys):
    source = tmp_path / "nan.pt"
    save_embeddings(Embeddings({"<x>": torch.full((1, 768), float("nan"))}), source)
    out = tmp_path / "out.bin"
    assert load_script().main(["--input", str(source), "--output", str(out), "--format", "diffusers"]) == 1
    error = capsys.readouterr().err.strip()
    assert "NaN or infinite" in error and str(source) in error and "\n" not in error and not out.exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_integer_vectors_are_refused_as_such(tmp_path, dtype, suffix):
    path = tmp_path / f"learned_embeds{suffix}"
    write_diffusers(path, torch.ones(2, 768, dtype=dtype))
    with pytest.raises(ValueError, match=rf"'<x>' holds a {str(dtype).removeprefix('torch.')} tensor of shape "
                                         r"\(2, 768\): embedding vectors must be floating point"):
        load_embeddings(path)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_more_vectors_than_a_prompt_holds_are_refused_as_such(tmp_path, suffix):
    path = tmp_path / f"learned_embeds{suffix}"
    write_diffusers(path, random_vectors(75))
    assert load_embeddings(path).vectors["<x>"].shape == (75, 768)
    write_diffusers(path, random_vectors(76))
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}': '<x>' holds 76 vectors, but at most 75 fit in "
                                         "a 77-token prompt"):
        load_embeddings(path)


@pytest.mark.parametrize("written", ["safetensors", "zip", "legacy"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_embeddings_are_read_by_their_content_whatever_their_name(tmp_path, written, suffix):
    """torch.load hands any path ending in .safetensors to safetensors, whatever the file holds."""
    vectors = random_vectors(2)
    path = tmp_path / f"renamed{suffix}"
    if written == "safetensors":
        safetensors.torch.save_file({"<x>": vectors}, path)
    else:
        torch.save({"<x>": vectors}, path, _use_new_zipfile_serialization=written == "zip")
    assert_same_vectors(load_embeddings(path).vectors, {"<x>": vectors})


def test_convert_refuses_an_existing_output_unless_forced(tmp_path, capsys):
    script = load_script()
    source, out = tmp_path / "cat.pt", tmp_path / "out.pt"
    save_embeddings(Embeddings({"*": random_vectors(1)}), source)
    out.write_bytes(b"keep me")
    argv = ["--input", str(source), "--output", str(out), "--format", "original"]
    assert script.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert f"--output '{out}' already exists: pass another --output, or --force to replace it" in error
    assert "\n" not in error and out.read_bytes() == b"keep me"
    assert script.main(argv + ["--force"]) == 0
    assert list(load_embeddings(out).vectors) == ["*"]


@pytest.mark.parametrize("flag", ["--token", "--name"])
@pytest.mark.parametrize("word", ["", " "])
def test_convert_refuses_an_empty_token_or_name(tmp_path, capsys, flag, word):
    source, out = tmp_path / "star.pt", tmp_path / "out.pt"
    save_embeddings(Embeddings({"*": random_vectors(1)}), source)
    assert load_script().main(["--input", str(source), "--output", str(out), "--format", "a1111", flag, word]) == 1
    error = capsys.readouterr().err.strip()
    assert f"{flag} is empty: pass a word" in error and "\n" not in error and not out.exists()
