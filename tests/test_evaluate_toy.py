"""The exact toy-world evaluation: prompts, metrics on hand-made predictions, the two baselines' vectors, and
scripts/evaluate_toy.py end to end on a random-weight toy model, random embedding and random classifier."""
import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.checkpoint import build_random_model, write_random_checkpoint
from ldm.data.procedural import HELD_OUT_CONCEPTS, LABEL_NAMES
from ldm.embeddings import Embeddings, save_embeddings
from ldm.evaluation.world_classifier import WorldClassifier, save_classifier
from ldm.generate import generate
from ldm.modules.embedding_manager import EmbeddingManager, initial_vectors
from scripts import evaluate_toy
from tests.conftest import REPO

TOY = os.path.join(REPO, "configs", "toy", "finetune.yaml")
HEART = HELD_OUT_CONCEPTS["heart"]
CROSS = HELD_OUT_CONCEPTS["striped_yellow_cross"]


pytestmark = pytest.mark.usefixtures("one_thread")


def predictions(**labels) -> dict:
    """Classifier-style predictions for len(shape) images; attributes not given are 'unknown' for every image."""
    count = len(labels["shape"])
    return {name: labels.get(name, ["unknown"] * count) for name in LABEL_NAMES}


def test_prompts_ask_only_for_what_the_concept_leaves_open():
    heart = evaluate_toy.evaluation_prompts(HEART)
    cross = evaluate_toy.evaluation_prompts(CROSS)
    assert [p.text for p in heart if p.kind == "fidelity"] == ["a photo of *", "a *"]
    assert {p.kind for p in heart} == {"fidelity", "background", "count", "color", "texture"}
    assert {p.kind for p in cross} == {"fidelity", "background", "count"}
    assert "a * on a yellow background" in [p.text for p in heart]
    assert "a * on a yellow background" not in [p.text for p in cross]  # never on its own colour
    assert evaluate_toy.EvalPrompt("color", "a blue *", "color", "blue") in heart
    assert evaluate_toy.EvalPrompt("count", "two *", "count", "two") in cross
    for prompt in heart + cross:
        if prompt.attribute is not None:
            assert prompt.value in LABEL_NAMES[prompt.attribute]


def test_recognition_needs_every_attribute_the_concept_fixes():
    seen = predictions(shape=["cross", "cross", "cross", "heart"], color=["yellow", "yellow", "red", "yellow"],
                       texture=["striped", "plain", "striped", "striped"])
    assert evaluate_toy.recognised(seen, CROSS) == [True, False, False, False]
    assert evaluate_toy.recognised(seen, HEART) == [False, False, False, True]


def test_scores_are_exact_fractions_pooled_per_kind():
    prompts = [
        evaluate_toy.EvalPrompt("fidelity", "a photo of *"),
        evaluate_toy.EvalPrompt("fidelity", "a *"),
        evaluate_toy.EvalPrompt("background", "a * on a blue background", "background", "blue"),
        evaluate_toy.EvalPrompt("background", "a * on a black background", "background", "black"),
        evaluate_toy.EvalPrompt("count", "two *", "count", "two"),
    ]
    made = [
        predictions(shape=["heart", "heart", "star", "heart"]),
        predictions(shape=["circle", "heart", "star", "star"]),
        predictions(shape=["heart", "star", "heart", "star"], background=["blue", "blue", "white", "white"]),
        predictions(shape=["heart", "heart", "star", "star"], background=["black", "black", "black", "gray"]),
        predictions(shape=["heart", "star", "star", "star"], count=["two", "two", "one", "two"]),
    ]
    scores = evaluate_toy.score_condition(prompts, made, HEART)
    assert scores["fidelity"] == pytest.approx(4 / 8)
    assert scores["background"] == pytest.approx({"asked": 5 / 8, "asked_and_concept": 3 / 8})
    assert scores["count"] == pytest.approx({"asked": 3 / 4, "asked_and_concept": 1 / 4})
    assert scores["per_prompt"]["a photo of *"] == pytest.approx({"recognised": 3 / 4})
    assert scores["per_prompt"]["a * on a black background"] == pytest.approx(
        {"recognised": 2 / 4, "asked": 3 / 4, "asked_and_concept": 2 / 4})


@pytest.fixture(scope="module")
def toy_embedder():
    return build_random_model(TOY).cond_stage_model


def test_baselines_are_what_training_starts_from(toy_embedder):
    model = SimpleNamespace(cond_stage_model=toy_embedder)
    learned = Embeddings({"*": torch.zeros(3, toy_embedder.token_dim)})
    vectors = evaluate_toy.condition_vectors(model, learned, "*", "circle", seed=3)
    (token,) = toy_embedder.text_to_token_ids("circle")
    assert torch.equal(vectors["init_word"], toy_embedder.token_embedding.weight[token].detach()[None])
    assert torch.equal(EmbeddingManager(toy_embedder, initializer_words=["circle"]).vectors("*"), vectors["init_word"])
    torch.manual_seed(3)  # training draws from the global generator
    assert torch.equal(EmbeddingManager(toy_embedder, num_vectors_per_token=3).vectors("*"), vectors["random"])
    again = evaluate_toy.condition_vectors(model, learned, "*", "square", seed=4)
    assert not torch.equal(again["init_word"], vectors["init_word"])
    assert again["random"].shape == (3, toy_embedder.token_dim) and not torch.equal(again["random"], vectors["random"])
    with pytest.raises(ValueError, match="--init_word: initializer word 'striped yellow' is not one"):
        evaluate_toy.condition_vectors(model, learned, "*", "striped yellow", seed=3)


def test_default_init_word_comes_from_the_file_metadata():
    embeddings = Embeddings({"*": torch.zeros(1, 4), "@": torch.zeros(1, 4)},
                            metadata={"placeholder_strings": ["*", "@"], "initializer_words": ["circle", None]})
    assert evaluate_toy.default_init_word(embeddings, "*", "e.pt") == "circle"
    with pytest.raises(ValueError, match="--init_word"):
        evaluate_toy.default_init_word(embeddings, "@", "e.pt")


@pytest.mark.parametrize("concept, edit_kinds", [("heart", {"background", "count", "color", "texture"}),
                                                 ("striped_yellow_cross", {"background", "count"})])
def test_script_runs_end_to_end_on_a_tiny_random_toy_model(tmp_path, capsys, monkeypatch, toy_embedder, concept,
                                                           edit_kinds):
    ckpt = write_random_checkpoint(TOY, tmp_path / "toy.ckpt")
    embedding_path = str(tmp_path / "embeddings.pt")
    # The learned word is the init word's row, so ours and the init-word baseline give identical images exactly
    # when both conditions sample the same noise.
    learned = initial_vectors(toy_embedder, "circle", 1)
    metadata = {"placeholder_strings": ["*"], "initializer_words": ["circle"]}
    save_embeddings(Embeddings({"*": learned}, metadata=metadata), embedding_path)
    torch.manual_seed(0)
    classifier_path = str(tmp_path / "classifier.safetensors")
    save_classifier(WorldClassifier().eval(), classifier_path)
    generated = []

    def recording_generate(*args, **kwargs):
        generated.append(generate(*args, **kwargs))
        return generated[-1]

    monkeypatch.setattr(evaluate_toy, "generate", recording_generate)
    out = tmp_path / "results.json"
    argv = ["--config", TOY, "--ckpt", ckpt, "--embedding_path", embedding_path, "--concept", concept,
            "--classifier", classifier_path, "--n_samples", "2", "--ddim_steps", "3", "--out", str(out),
            "--device", "cpu"]
    grid = tmp_path / "grid.png"
    assert evaluate_toy.main(argv + ["--grid", str(grid)]) == 0

    ours, init_word, random = (torch.stack(images) for images in generated)
    assert len(ours) == 2 * len(evaluate_toy.evaluation_prompts(HELD_OUT_CONCEPTS[concept]))
    assert torch.equal(ours, init_word)
    assert not torch.allclose(ours, random)
    report = json.loads(out.read_text())
    assert report["settings"]["init_word"] == "circle"
    assert report["settings"]["n_samples"] == 2
    assert report["concept"]["name"] == concept
    assert set(report["results"]) == set(evaluate_toy.CONDITIONS)
    for scores in report["results"].values():
        assert set(scores) == {"fidelity", "per_prompt"} | edit_kinds
        numbers = [scores["fidelity"]] + [value for kind in edit_kinds for value in scores[kind].values()]
        assert all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in numbers)
        assert all(x * 24 == pytest.approx(round(x * 24)) for x in numbers)  # pools of 4, 6 or 8 images
    captured = capsys.readouterr()
    table = captured.out
    assert [line.split(":")[1].strip() for line in captured.err.splitlines()] == list(evaluate_toy.CONDITIONS)
    assert "| init word (circle) |" in table and "count edit" in table
    assert ("colour edit" in table) == ("color" in edit_kinds)
    n_prompts = len(evaluate_toy.evaluation_prompts(HELD_OUT_CONCEPTS[concept]))
    blocks = len(evaluate_toy.CONDITIONS)
    with Image.open(grid) as picture:  # 2 images per cell here (n_samples 2), 32 px, 2 px padding
        assert picture.size == (2 + (evaluate_toy.GRID_LABEL_WIDTH + blocks * 2 + blocks - 1) * 32 + 2,
                                2 + n_prompts * (32 + 2))

    assert evaluate_toy.main(argv + ["--init_word", "two words"]) == 1
    assert "--init_word: initializer word 'two words'" in capsys.readouterr().err


def test_markdown_table_has_a_row_per_condition_and_a_column_per_metric():
    edits = {"background": {"asked": 0.5, "asked_and_concept": 0.25}, "count": {"asked": 1.0, "asked_and_concept": 0.0},
             "color": {"asked": 0.125, "asked_and_concept": 0.0}}
    report = {"settings": {"init_word": "circle"},
              "results": {name: {"fidelity": fidelity, **edits, "per_prompt": {}}
                          for name, fidelity in (("ours", 0.75), ("init_word", 0.5), ("random", 0.0))}}
    lines = evaluate_toy.markdown_table(report).splitlines()
    assert lines[0] == "| condition | fidelity | background edit | count edit | colour edit |"
    assert lines[2] == "| ours | 0.750 | 0.500 (0.250) | 1.000 (0.000) | 0.125 (0.000) |"
    assert lines[3].startswith("| init word (circle) | 0.500 |")
    assert lines[4].startswith("| random | 0.000 |")


@pytest.mark.parametrize("flags, expected", [
    (["--grid", "{tmp}/grid.txt"], "--grid '.*grid.txt' has no image file extension: end it in .png"),
    (["--grid", "{tmp}/notes.txt/grid.png"], "--grid .*: its folder '.*notes.txt' is a file"),
    (["--out", "{tmp}"], "--out '.*' is a folder"),
    (["--out", "{tmp}/r.png", "--grid", "{tmp}/r.png"], "--grid '.*r.png' is also --out: the picture would replace "
                                                        "the results; pass another --grid"),
    (["--ddim_steps", "0"], "--ddim_steps must be at least 1"),
    (["--ddim_steps", "501"], "--ddim_steps 501 does not suit this model: .*at most 500"),
    (["--device", "cuda:9"], "--device 'cuda:9': "),
])
def test_mistakes_fail_before_any_image_is_made(tmp_path, monkeypatch, capsys, flags, expected):
    (tmp_path / "notes.txt").write_text("not a folder")
    monkeypatch.setattr(evaluate_toy, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = ["--embedding_path", "unused.pt", "--concept", "heart", "--out", str(tmp_path / "results.json"),
            "--device", "cpu"]
    assert evaluate_toy.main(argv + [flag.format(tmp=tmp_path) for flag in flags]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(expected, error), error


def test_the_shipped_files_are_the_defaults_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = evaluate_toy.parse_args(["--embedding_path", "e.pt", "--concept", "heart"])
    assert all(os.path.isfile(path) for path in (args.config, args.ckpt, args.classifier))
    save_embeddings(Embeddings({"*": torch.zeros(1, 8)}), "e.pt")
    monkeypatch.setattr(evaluate_toy, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = ["--embedding_path", "e.pt", "--concept", "heart", "--init_word", "circle", "--classifier", "judge.st",
            "--device", "cpu"]
    assert evaluate_toy.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert re.fullmatch("evaluate_toy: error: --classifier 'judge.st' does not exist: pass the world classifier's "
                        "weights, shipped as .*/models/ldm/toy/world_classifier.safetensors", error), error


def test_the_results_are_written_before_the_grid(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_toy, "evaluate", lambda args: ({"results": "kept"}, torch.zeros(3, 4, 4)))

    def full_disk(image):
        raise OSError("No space left on device")

    monkeypatch.setattr(evaluate_toy, "tensor_to_pil", full_disk)
    out = tmp_path / "results.json"
    argv = ["--embedding_path", "e.pt", "--concept", "heart", "--out", str(out), "--grid", str(tmp_path / "g.png")]
    assert evaluate_toy.main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"results": "kept"}
