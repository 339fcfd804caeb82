"""Checkpoint reading: Lightning-era pickles load without running code, bad files give one-line errors."""
import argparse
import pickle
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
from pytorch_lightning.utilities.parsing import AttributeDict
from safetensors.torch import save_file

from ldm.checkpoint import (CheckpointError, PickledLightningObject, build_random_model, ema_state_dict, load_checkpoint,
                            restore)
from ldm.embeddings import Embeddings, save_embeddings
from ldm.util import instantiate_from_config
from scripts import make_random_checkpoint
from tests.conftest import TINY_SD


def tiny_state():
    return {"model.diffusion_model.w": torch.randn(3, 4), "first_stage_model.b": torch.randn(2)}


def test_lightning_checkpoint_with_pickled_callbacks_loads_safely(tmp_path):
    state = tiny_state()
    path = tmp_path / "sd.ckpt"
    torch.save(
        {
            "state_dict": state,
            "global_step": 470000,
            "epoch": 5,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1), "dirpath": "/ckpts"}},
            "hyper_parameters": AttributeDict(base_learning_rate=1e-4),
            "opt": argparse.Namespace(name="sd", gpus="0,"),  # as main.py-era runs pickled their arguments
        },
        path,
    )
    ckpt = load_checkpoint(path)
    assert ckpt.global_step == 470000
    assert set(ckpt.state_dict) == set(state)
    for key in state:
        assert torch.equal(ckpt.state_dict[key], state[key])
    stored = ckpt.extra["callbacks"]
    (key, value), = stored.items()
    assert key is PickledLightningObject and value["dirpath"] == "/ckpts"
    assert float(value["best_model_score"]) == pytest.approx(0.1)
    assert type(ckpt.extra["hyper_parameters"]) is dict
    assert ckpt.extra["hyper_parameters"]["base_learning_rate"] == 1e-4


def test_bare_state_dict_and_safetensors(tmp_path):
    state = tiny_state()
    torch.save(state, tmp_path / "bare.pt")
    save_file(state, tmp_path / "model.safetensors")
    for name in ("bare.pt", "model.safetensors"):
        loaded = load_checkpoint(tmp_path / name).state_dict
        assert all(torch.equal(loaded[k], state[k]) for k in state)


class Payload:
    """Stands for any class a malicious pickle could name."""


def test_unknown_pickled_code_is_refused_and_named(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state(), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="Payload"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, name, expected",
    [
        (b"", "empty.ckpt", "is empty"),
        (b"<!DOCTYPE html><html>Not found</html>", "page.ckpt", "HTML page"),
        (b"model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n", "v1-inference.yaml", "YAML config"),
        *[(content, name, "not a PyTorch/safetensors checkpoint") for name in ("model.ckpt", "model.safetensors")
          for content in (b"hello world\nthis is text\n", b"abc", b"\x80\x02h\x05.")],
        *[(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4\n", name, "Git LFS pointer.*git lfs pull")
          for name in ("model.ckpt", "model.safetensors")],
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, name, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_checkpoint(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    safetensors_path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(256, 256)}, safetensors_path)
    safetensors_path.write_bytes(safetensors_path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(safetensors_path)


@pytest.mark.parametrize("written, name", [("safetensors", "model.ckpt"), ("zip", "model.safetensors"),
                                           ("legacy", "model.safetensors"), ("zip", "model.pth")])
def test_checkpoints_are_read_by_their_content_whatever_their_name(tmp_path, written, name):
    """A renamed file was reported as truncated, with the advice to download it again."""
    state = tiny_state()
    path = tmp_path / name
    if written == "safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 3}, path, _use_new_zipfile_serialization=written == "zip")
    loaded = load_checkpoint(path)
    assert all(torch.equal(loaded.state_dict[k], state[k]) for k in state)
    assert loaded.global_step == (None if written == "safetensors" else 3)


@pytest.mark.parametrize("format, name", [("original", "embeddings.pt"), ("a1111", "cat.pt"),
                                          ("a1111", "cat.safetensors"), ("diffusers", "learned_embeds.bin"),
                                          ("diffusers", "learned_embeds.safetensors")])
def test_an_embedding_file_passed_as_the_model_says_which_flag_takes_it(tmp_path, format, name):
    path = tmp_path / name
    save_embeddings(Embeddings({"<cat-toy>": torch.randn(2, 768)}), path, format)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (
        f"'{path}' is an embedding file, not a model checkpoint: pass it with --embedding_manager_ckpt (training) or "
        "--embedding_path (generation), and the model's checkpoint with --actual_resume/--ckpt"
    )
    single = tmp_path / "single.pt"  # a state dict with one dotted key stays a state dict
    torch.save({"model.w": torch.randn(2, 768)}, single)
    assert list(load_checkpoint(single).state_dict) == ["model.w"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_checkpoint(tmp_path / "nowhere.ckpt")


def test_ema_weights_by_choice(tmp_path):
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
        "model_ema.diffusion_modelinput_blocks00weight": torch.ones(2),
        "model_ema.decay": torch.tensor(0.9999),
    }
    swapped = ema_state_dict(state)
    assert torch.equal(swapped["model.diffusion_model.input_blocks.0.0.weight"], torch.ones(2))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        ema_state_dict({"model.diffusion_model.x": torch.zeros(1)}, "pruned.ckpt")
    unet = torch.nn.Module()  # a module with that one weight, at the checkpoint's name
    unet.input_blocks = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Module()])])
    unet.input_blocks[0][0].weight = torch.nn.Parameter(torch.full((2,), 5.0))
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.diffusion_model = unet
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": state}, path)
    for use_ema, value in ((False, 0.0), (True, 1.0)):
        restore(root, str(path), use_ema=use_ema, verbose=False)
        assert torch.equal(unet.input_blocks[0][0].weight.detach(), torch.full((2,), value))


class CrossAttn(torch.nn.Module):
    def __init__(self, context_dim):
        super().__init__()
        self.to_k = torch.nn.Linear(context_dim, 320, bias=False)


def model_with_context(context_dim):
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.diffusion_model = torch.nn.Module()
    root.model.diffusion_model.attn2 = CrossAttn(context_dim)
    return root


def test_restore_reports_and_refuses_ldm_checkpoint_in_sd_config(tmp_path, capsys):
    ldm_like = model_with_context(1280)
    path = tmp_path / "txt2img-large.ckpt"
    torch.save({"state_dict": {**ldm_like.state_dict(), "model_ema.decay": torch.tensor(0.9), "extra.key": torch.zeros(1)}}, path)

    target = model_with_context(1280)
    summary = restore(target, path)
    assert summary.missing == [] and summary.unexpected == ["extra.key"]
    assert torch.equal(target.model.diffusion_model.attn2.to_k.weight, ldm_like.model.diffusion_model.attn2.to_k.weight)
    assert "Restored 1 tensors" in capsys.readouterr().out

    with pytest.raises(CheckpointError) as info:
        restore(model_with_context(768), path)
    message = str(info.value)
    assert "txt2img-large.ckpt" in message and "1280-wide (LDM-BERT) checkpoint" in message and "configs/latent-diffusion" in message


def latent_diffusion_like():
    """The three parts of a LatentDiffusion under their real key prefixes, one small layer each."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.diffusion_model = torch.nn.Linear(2, 2)
    root.cond_stage_model = torch.nn.Module()
    root.cond_stage_model.transformer = torch.nn.Linear(2, 2)
    root.first_stage_model = torch.nn.Module()
    root.first_stage_model.encoder = torch.nn.Linear(2, 2)
    return root


def test_a_checkpoint_of_another_model_is_refused_and_described(tmp_path):
    source = latent_diffusion_like()
    sd_like = tmp_path / "sd.ckpt"  # SD v1 releases also carry the UNet's EMA copies, which are dropped
    torch.save({"state_dict": {**source.state_dict(), "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.diffusion_modelweight": torch.zeros(2, 2)}}, sd_like)
    summary = restore(latent_diffusion_like(), sd_like, verbose=False)
    assert summary.loaded == 6 and summary.missing == [] and summary.unexpected == []

    vae = tmp_path / "autoencoder.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2), "decoder.conv_out.weight": torch.zeros(2)}, vae)
    embeddings = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"embedding_manager.string_to_param_dict.*": torch.zeros(1, 2)}}, embeddings)
    other_encoder = tmp_path / "other-encoder.ckpt"
    state = {k.replace("transformer", "bert"): v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, other_encoder)
    no_vae = tmp_path / "no-vae.ckpt"
    torch.save({"state_dict": {k: v for k, v in source.state_dict().items() if not k.startswith("first")}}, no_vae)
    for path, expected in [
        (vae, "shares no tensor with the model .*standalone autoencoder"),
        (embeddings, "shares no tensor .*learned embeddings .*--embedding_path"),
        (other_encoder, "none of the model's 2 cond_stage_model.* tensors .*other names, e.g. cond_stage_model.bert"),
        (no_vae, "none of the model's 2 first_stage_model.* tensors"),
    ]:
        with pytest.raises(CheckpointError, match=expected) as info:
            restore(latent_diffusion_like(), path, verbose=False)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert restore(latent_diffusion_like(), no_vae, ignore_keys=["first_stage_model"], verbose=False).loaded == 4


def test_an_ldm_checkpoint_in_the_sd_config_is_refused_before_training(tiny_ldm_ckpt):
    with pytest.raises(CheckpointError, match="none of the model's .* cond_stage_model"):
        restore(build_random_model(TINY_SD), tiny_ldm_ckpt, verbose=False)


class ParameterFills(torch.overrides.TorchFunctionMode):
    """Counts the random fills of parameters that reach it (those that `random_init_skipped` passes on)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        self.count += getattr(func, "__name__", None) in ("uniform_", "normal_") and isinstance(target, torch.nn.Parameter)
        return func(*args, **kwargs)


def tiny_sd_from(ckpt_path, **params):
    config = OmegaConf.load(TINY_SD)
    config.model.params.update(ckpt_path=str(ckpt_path) if ckpt_path else None, **params)
    with ParameterFills() as fills:
        model = instantiate_from_config(config.model)
    return model, fills.count


def test_weights_a_checkpoint_sets_are_not_drawn_at_random_first(tiny_sd_ckpt):
    model, fills = tiny_sd_from(tiny_sd_ckpt)
    assert fills == 0
    saved = load_checkpoint(tiny_sd_ckpt).state_dict
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in saved.items())
    buffers = dict(model.named_buffers())
    assert torch.equal(buffers["cond_stage_model.transformer.text_model.embeddings.position_ids"][0], torch.arange(77))
    model_without_checkpoint, fills_without_checkpoint = tiny_sd_from(None)
    assert fills_without_checkpoint > 0
    # The model keeps no reference to the checkpoint (its memory; ddp_spawn pickles the model to each process).
    assert len(pickle.dumps(model)) < 1.1 * len(pickle.dumps(model_without_checkpoint))


@pytest.mark.parametrize("unset", ["missing", "ignored"])
def test_weights_a_checkpoint_leaves_unset_are_initialised_as_always(tiny_sd_ckpt, tmp_path, unset):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state = load_checkpoint(tiny_sd_ckpt).state_dict
    if unset == "missing":
        partial = tmp_path / "partial.safetensors"
        save_file({k: v for k, v in state.items() if k != key}, partial)
        model, _ = tiny_sd_from(partial)
    else:
        model, _ = tiny_sd_from(tiny_sd_ckpt, ignore_keys=[key])
    weight = model.state_dict()[key]
    bound = 1 / weight[0].numel() ** 0.5  # kaiming_uniform_(a=sqrt(5)), a Conv2d's default
    assert 0.5 * bound / 3**0.5 < weight.std() < 1.5 * bound / 3**0.5 and weight.abs().max() <= bound
    other = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[other], state[other])


def test_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match="is a folder: pass the file inside it"):
        load_checkpoint(tmp_path)


def test_make_random_checkpoint_reports_bad_configs_and_outputs_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, expected in [(["--config", str(bad), "--out", str(tmp_path / "m.ckpt")], "is not valid YAML"),
                           (["--config", str(tmp_path), "--out", str(tmp_path / "m.ckpt")], "is a folder"),
                           (["--config", TINY_SD, "--out", str(blocker / "m.ckpt")], "--out .* is a file")]:
        assert make_random_checkpoint.main(argv) == 1
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and re.search(expected, error)


def test_make_random_checkpoint_writes_real_safetensors_and_never_replaces_a_file(tmp_path, capsys):
    out = tmp_path / "random.safetensors"
    assert make_random_checkpoint.main(["--config", TINY_SD, "--out", str(out)]) == 0
    summary = restore(build_random_model(TINY_SD), out, verbose=False)
    assert summary.loaded > 400 and not summary.unexpected
    before = out.read_bytes()
    capsys.readouterr()
    assert make_random_checkpoint.main(["--config", TINY_SD, "--out", str(out), "--seed", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"make_random_checkpoint: error: --out '{out}' already exists (perhaps a real model): pick " \
                    "another --out"
    assert out.read_bytes() == before
