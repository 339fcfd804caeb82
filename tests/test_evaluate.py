"""CLIP evaluation: the metric against direct computation, the evaluator on a tiny random open_clip model loaded
from a local file, and scripts/evaluate.py end to end on the tiny SD model."""
import copy
import importlib.util
import json
import math
import re
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.checkpoint import write_random_checkpoint
from ldm.embeddings import Embeddings, save_embeddings
from ldm.evaluation.clip_eval import (
    CLIPEvaluator,
    load_clip,
    mean_pairwise_cosine,
    remove_placeholders,
)
from tests.conftest import TINY_SD, draw_images

TINY_CLIP = "tiny-clip-eval-test"
# QuickGELU like OpenAI's CLIP, so the same weights also load as an OpenAI TorchScript archive.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A random tiny CLIP registered with open_clip, its weights as a state dict and as an OpenAI-style archive."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # OpenAI's archives hold fp16 weights, so these survive the round trip
            parameter.copy_(parameter.half().float())
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    # OpenAI's archive keeps the causal mask as a plain attribute, not in the state dict.
    scripted = copy.deepcopy(model)
    scripted.attn_mask = scripted._buffers.pop("attn_mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(scripted).save(str(folder / "tiny_openai.pt"))
    return model, str(folder / "tiny_clip.pt"), str(folder / "tiny_openai.pt")


@pytest.fixture(scope="module")
def evaluator(clip_files):
    _, weights, _ = clip_files
    return CLIPEvaluator(*load_clip(weights, TINY_CLIP))


def test_mean_pairwise_cosine_is_the_mean_of_the_full_matrix():
    features = torch.randn(5, 8)
    assert mean_pairwise_cosine(features[:1], 3 * features[:1]) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)[:2], torch.eye(4)[2:]) == pytest.approx(0.0)
    a, b = torch.randn(3, 8), torch.randn(4, 8)
    direct = sum(F.cosine_similarity(x, y, dim=0).item() for x in a for y in b) / 12
    assert mean_pairwise_cosine(a, b) == pytest.approx(direct, abs=1e-6)
    # Not the mean of the diagonal, nor of the row-wise maxima.
    assert mean_pairwise_cosine(a, b) != pytest.approx(F.cosine_similarity(a, b[:3]).mean().item(), abs=1e-4)


def test_placeholders_are_removed_as_the_paper_removed_star():
    assert remove_placeholders("a photo of *", ["*"]) == "a photo of"
    assert remove_placeholders("* in the style of @, on a table", ["*", "@"]) == "in the style of , on a table"
    assert remove_placeholders("sks asks for a sks", ["sks"]) == "asks for a"
    assert remove_placeholders("a *-shaped mug", ["*"]) == "a -shaped mug"


def test_placeholders_are_removed_where_generation_reads_them():
    """Any case, and a word that begins or ends with a letter or digit only as a whole word ("_" ends a word)."""
    assert remove_placeholders("a photo of <Cat-Toy>, on a table", ["<cat-toy>"]) == "a photo of , on a table"
    assert remove_placeholders("Sks_dog and SKS, not asks", ["sks"]) == "_dog and , not asks"
    assert remove_placeholders("mycats and a bobmycat", ["mycat"]) == "mycats and a bobmycat"


def test_a_prompt_naming_a_learned_word_in_another_case_is_scored(script, tmp_path):
    path = str(tmp_path / "cat-toy.pt")
    save_embeddings(Embeddings({"<cat-toy>": torch.randn(1, 32)}), path)
    images = str(draw_images(tmp_path / "images", count=1))
    args = script.parse_args(["--data_dir", images, "--images_dir", images, "--clip_weights", "unused.pt",
                              "--embedding_path", path, "--prompt", "a photo of <Cat-Toy>"])
    assert script.check_inputs(args) == ["<cat-toy>"]


def test_preprocessing_maps_minus1_1_to_clip_input(evaluator):
    gray = torch.full((2, 3, 40, 60), 0.5)
    inputs = evaluator.preprocess(gray)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    assert inputs.shape == (2, 3, 32, 32)
    assert torch.allclose(inputs, ((0.75 - mean) / std).expand(2, 3, 32, 32), atol=1e-5)
    # A tall image keeps its centre: the short side is resized to 32, then the middle 32 rows are cut.
    tall = -torch.ones(1, 3, 64, 32)
    tall[:, :, 16:48] = 1.0
    assert torch.allclose(evaluator.preprocess(tall)[0], ((1.0 - mean) / std).expand(3, 32, 32), atol=1e-5)


def test_evaluator_features_come_from_the_file_weights_and_score_as_the_paper(clip_files, evaluator):
    model, _, _ = clip_files
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    expected = F.normalize(model.encode_image(evaluator.preprocess(images)), dim=-1)
    features = evaluator.image_features(images)
    assert torch.allclose(features, expected, atol=1e-5)
    assert torch.allclose(features.norm(dim=-1), torch.ones(4))

    same = images[:1].expand(3, -1, -1, -1)
    assert evaluator.img_to_img_similarity(same[:2], same) == pytest.approx(1.0, abs=1e-5)
    assert evaluator.img_to_img_similarity(images[:2], images[2:]) == pytest.approx(
        (features[:2] @ features[2:].T).mean().item(), abs=1e-5)
    text = evaluator.text_features("a photo of")
    assert evaluator.txt_to_img_similarity("a photo of", images) == pytest.approx((features @ text.T).mean().item(),
                                                                                  abs=1e-5)
    # Images of other sizes pass one by one through the same pipeline.
    resized = [F.interpolate(images[:1], size=48, mode="bicubic", antialias=True)[0], images[1]]
    assert evaluator.image_features(resized).shape == (2, 16)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_openai_torchscript_archive_gives_the_same_features(clip_files, evaluator):
    _, _, archive = clip_files
    openai_evaluator = CLIPEvaluator(*load_clip(archive, TINY_CLIP))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.allclose(openai_evaluator.image_features(images), evaluator.image_features(images), atol=1e-4)
    assert torch.allclose(openai_evaluator.text_features("a cat"), evaluator.text_features("a cat"), atol=1e-4)


def test_bad_clip_weights_are_clear_errors(clip_files, tmp_path):
    _, weights, _ = clip_files
    with pytest.raises(FileNotFoundError, match="--clip_weights '.*missing.pt' does not exist"):
        load_clip(str(tmp_path / "missing.pt"), TINY_CLIP)
    with pytest.raises(ValueError, match="is a folder"):
        load_clip(str(tmp_path), TINY_CLIP)
    with pytest.raises(ValueError, match="'no-such-clip' is not an open_clip architecture"):
        load_clip(weights, "no-such-clip")
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"are not ViT-B-32 weights \(Error\(s\) in loading state_dict for CLIP: "
                                         r"(Missing|Unexpected|size).*pass the matching --clip_model"):
        load_clip(str(tmp_path / "other.pt"), "ViT-B-32")
    # open_clip asserts when the text width differs from the architecture's.
    torch.save({"positional_embedding": torch.zeros(77, 32)}, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"are not .* weights \(text pos_embed width changed!\); pass the matching"):
        load_clip(str(tmp_path / "narrow.pt"), TINY_CLIP)
    save_file({"text_model.embeddings.position_embedding.weight": torch.zeros(77, 64),
               "vision_model.embeddings.class_embedding": torch.zeros(64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="is a Hugging Face transformers CLIP file .*pass OpenAI's ViT-B-32.pt or an "
                                         "open_clip state dict"):
        load_clip(str(tmp_path / "model.safetensors"), TINY_CLIP)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot be read \\(SafetensorError"):
        load_clip(str(tmp_path / "cut.safetensors"), TINY_CLIP)


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("scripts.evaluate")


def test_generation_run_scores_and_images_dir_rescoring_agree(script, clip_files, tmp_path, capsys):
    _, weights, _ = clip_files
    ckpt = write_random_checkpoint(TINY_SD, tmp_path / "tiny-sd.ckpt")
    data = str(draw_images(tmp_path / "data", count=3))
    star, at = str(tmp_path / "star.pt"), str(tmp_path / "at.pt")
    save_embeddings(Embeddings({"*": torch.randn(1, 32)}), star)
    save_embeddings(Embeddings({"@": torch.randn(2, 32)}), at)
    outdir = tmp_path / "eval"
    common = ["--data_dir", data, "--clip_weights", weights, "--clip_model", TINY_CLIP, "--prompt",
              "a photo of * with @", "--device", "cpu"]
    argv = common + ["--ckpt", ckpt, "--config", TINY_SD, "--embedding_path", star, at, "--n_samples", "4",
                     "--batch_size", "3", "--ddim_steps", "4", "--outdir", str(outdir)]
    assert script.main(argv) == 0
    scores = json.loads((outdir / "clip_scores.json").read_text())
    assert scores["n_samples"] == 4 and scores["n_source_images"] == 3 and scores["image_size"] == 32
    assert scores["text_prompt"] == "a photo of with" and scores["placeholders"] == ["*", "@"]
    assert scores["ddim_steps"] == 4 and scores["scale"] == 5.0 and scores["eta"] == 0.0 and scores["seed"] == 42
    assert all(math.isfinite(scores[key]) and -1 <= scores[key] <= 1 for key in ("image_similarity",
                                                                                  "text_similarity"))
    printed = capsys.readouterr().out
    assert f"image similarity  {scores['image_similarity']:.4f}" in printed
    samples = sorted((outdir / "samples").glob("*.png"))
    assert len(samples) == 4

    evaluator = CLIPEvaluator(*load_clip(weights, TINY_CLIP))
    generated = script.read_images(outdir / "samples", None)
    assert scores["text_similarity"] == pytest.approx(evaluator.txt_to_img_similarity("a photo of with", generated),
                                                      abs=1e-2)

    argv = common + ["--images_dir", str(outdir / "samples"), "--embedding_path", star, at]
    assert script.main(argv) == 0
    assert json.loads((outdir / "clip_scores.json").read_text()) == scores  # not replaced by the rescoring
    again = json.loads((outdir / "samples_clip_scores.json").read_text())
    assert again["n_samples"] == 4 and again["text_prompt"] == "a photo of with"
    assert again["image_similarity"] == pytest.approx(scores["image_similarity"], abs=1e-2)
    assert again["text_similarity"] == pytest.approx(scores["text_similarity"], abs=1e-2)
    assert again["image_similarity"] == pytest.approx(
        evaluator.img_to_img_similarity(script.read_images(data, 32), generated), abs=1e-6)


def test_a_prompt_longer_than_the_text_encoder_reads_is_warned_about(script, clip_files, tmp_path, capsys,
                                                                     monkeypatch):
    _, weights, _ = clip_files
    ckpt = write_random_checkpoint(TINY_SD, tmp_path / "tiny-sd.ckpt")
    star = str(tmp_path / "star.pt")
    save_embeddings(Embeddings({"*": torch.randn(1, 32)}), star)

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before sampling")

    monkeypatch.setattr(script, "generate", stop)
    prompt = "a photo of " + "very " * 80 + "*"
    argv = ["--data_dir", str(draw_images(tmp_path / "data", count=1)), "--clip_weights", weights, "--clip_model",
            TINY_CLIP, "--prompt", prompt, "--device", "cpu", "--ckpt", ckpt, "--config", TINY_SD,
            "--embedding_path", star, "--outdir", str(tmp_path / "eval")]
    with pytest.raises(RuntimeError, match="stopped before sampling"):
        script.main(argv)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"evaluate: warning: --prompt '{prompt}' is 86 tokens, but the text encoder reads 77")
    assert "learned word * included" in warning and "\n" not in warning


def test_generation_without_embeddings_is_a_one_line_error(script, clip_files, tmp_path, capsys):
    _, weights, _ = clip_files
    argv = ["--data_dir", str(draw_images(tmp_path / "data")), "--clip_weights", weights, "--clip_model", TINY_CLIP,
            "--out", str(tmp_path / "s.json")]
    assert script.main(argv) == 1
    assert "pass --embedding_path" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("content, expected", [
    (b"hello world\n", r"cannot be read \(KeyError.*pass OpenAI's ViT-B-32.pt or an open_clip state dict"),
    (b"abc", r"cannot be read \(IndexError: pop from empty list\)"),
    (b"version https://git-lfs.github.com/spec/v1\n", "a Git LFS pointer.*git lfs pull"),
])
def test_clip_weights_that_are_not_weights_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "ViT-B-32.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as info:
        load_clip(str(path), TINY_CLIP)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags, expected", [
    (["--data_dir", "{empty}", "--images_dir", "{images}"],
     "--data_dir '.*empty' holds no images .*point --data_dir at a folder of the concept's training images"),
    (["--images_dir", "{empty}/none"], "--images_dir '.*none' does not exist; point --images_dir at a folder of "
                                       "generated images"),
    (["--images_dir", "{images}", "--out", "{empty}"], "--out '.*empty' is a folder"),
    (["--embedding_path", "e.pt", "--outdir", "{images}/img_0.png"], "--outdir .*: it is a file"),
    (["--embedding_path", "e.pt", "--ddim_steps", "0"], "--ddim_steps must be at least 1"),
    (["--embedding_path", "e.pt", "--ddim_steps", "900"], "--ddim_steps 900 does not suit this model"),
    (["--device", "cuda:9"], "--device 'cuda:9': "),
])
def test_evaluation_mistakes_fail_before_clip_loads(script, tmp_path, monkeypatch, capsys, flags, expected):
    images, empty = draw_images(tmp_path / "images", count=2), tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(script, "load_clip", lambda *args: pytest.fail("CLIP was loaded"))
    argv = ["--data_dir", str(images), "--clip_weights", "unused.pt", "--device", "cpu",
            "--out", str(tmp_path / "s.json")]
    assert script.main(argv + [flag.format(empty=empty, images=images) for flag in flags]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(expected, error), error


@pytest.mark.parametrize("flags, expected", [
    (["--embedding_path", "{at}"], r"--prompt 'a photo of \*' holds none of the learned words \(@\), so it would "
                                   r"score the model without them: write one into --prompt, e.g. 'a photo of @'"),
    (["--embedding_path", "{sks}", "--prompt", "she asks"], r"--prompt 'she asks' holds none of the learned words"),
    (["--images_dir", "{images}", "--embedding_path", "{at}"], r"holds none of the learned words \(@\)"),
    (["--data_dir", "{broken}", "--embedding_path", "{star}"], r"cannot read image '.*bad.png'"),
    (["--embedding_path", "{star}", "--outdir", "{run}"],
     r"--out '.*run/clip_scores.json' already exists: pick another --outdir \(or --out\)"),
    (["--embedding_path", "{star}", "--outdir", "{run}", "--out", "new.json"],
     r"--outdir '.*run' holds an earlier run's images in '.*run/samples', .*pick another --outdir"),
    (["--images_dir", "{run}"], r"--images_dir '.*run' is a generation run's --outdir \(its grids are not samples\): "
                                r"pass its samples folder, '.*run/samples'"),
    (["--images_dir", "{run}/samples"], r"--out '.*run/samples_clip_scores.json' already exists: pick another --out;"),
])
def test_runs_never_mix_and_mistakes_fail_before_clip_or_the_model_loads(script, tmp_path, monkeypatch, capsys,
                                                                          flags, expected):
    monkeypatch.chdir(tmp_path)
    images, broken, run = draw_images(tmp_path / "images", count=2), tmp_path / "broken", tmp_path / "run"
    draw_images(broken, count=1)
    (broken / "bad.png").write_bytes(b"not a png")
    draw_images(run / "samples", count=1)
    for name in ("clip_scores.json", "samples_clip_scores.json"):
        (run / name).write_text("{}")
    words = {}
    for name, placeholder in (("star", "*"), ("at", "@"), ("sks", "sks")):
        words[name] = str(tmp_path / f"{name}.pt")
        save_embeddings(Embeddings({placeholder: torch.randn(1, 32)}), words[name])
    monkeypatch.setattr(script, "load_clip", lambda *args: pytest.fail("CLIP was loaded"))
    monkeypatch.setattr(script, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = ["--data_dir", str(images), "--clip_weights", "unused.pt", "--config", TINY_SD, "--device", "cpu"]
    assert script.main(argv + [flag.format(images=images, broken=broken, run=run, **words) for flag in flags]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(expected, error), error
    assert (run / "clip_scores.json").read_text() == "{}" and not (tmp_path / "new.json").exists()
