"""Pretraining with main.py: the toy KL autoencoder and text-to-image LDM from scratch, the EMA, the export script,
and the exported file loading back into the toy configs. The runs use the shipped toy configs with a few steps,
a small batch and a short slice of the procedural world."""
import glob
import os

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import main as main_module
from ldm.data.procedural import ProceduralCaptions
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.losses import ReconstructionKLLoss
from ldm.util import instantiate_from_config
from scripts import export_toy_model
from tests.conftest import REPO

TOY_AE = os.path.join(REPO, "configs", "toy", "autoencoder.yaml")
TOY_TXT2IMG = os.path.join(REPO, "configs", "toy", "txt2img.yaml")
TOY_FINETUNE = os.path.join(REPO, "configs", "toy", "finetune.yaml")
SEED = 23  # main.py's default --seed
SHORT_RUN = [
    "lightning.trainer.max_steps=4", "lightning.trainer.val_check_interval=2", "lightning.trainer.limit_val_batches=1",
    "lightning.modelcheckpoint.params.every_n_train_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=2",
    "lightning.callbacks.image_logger.params.max_images=2", "data.params.batch_size=4",
    "data.params.train.params.length=64", "data.params.validation.params.length=4",
]


def only_run(logroot):
    runs = glob.glob(os.path.join(logroot, "*"))
    assert len(runs) == 1, runs
    return runs[0]


def initial_model(run):
    """The model main.py built before training: the run's saved config, instantiated after the same seeding."""
    config = OmegaConf.load(glob.glob(os.path.join(run, "configs", "*-project.yaml"))[0])
    pl.seed_everything(SEED)
    return instantiate_from_config(config.model)


def grids(run, split):
    return os.listdir(os.path.join(run, "images", split))


def test_autoencoder_pretrains_from_scratch(tmp_path):
    main_module.main(["--base", TOY_AE, "-t", "-l", str(tmp_path / "logs"), *SHORT_RUN, "lightning.trainer.max_steps=12",
                      "lightning.trainer.val_check_interval=6", "lightning.callbacks.image_logger.params.batch_frequency=6",
                      "model.base_learning_rate=7.5e-4"])
    run = only_run(tmp_path / "logs")
    assert os.listdir(os.path.join(run, "checkpoints")) == ["last.ckpt"]
    last = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    assert last["global_step"] == 12

    fresh = initial_model(run)
    trained = initial_model(run)
    trained.load_state_dict(last["state_dict"], strict=True)
    assert set(last["state_dict"]) == set(fresh.state_dict())
    unchanged = [n for n, p in fresh.named_parameters() if torch.equal(p, trained.get_parameter(n))]
    assert unchanged == []

    batch = torch.utils.data.default_collate([ProceduralCaptions(size=32, length=8, split="val")[i] for i in range(8)])
    x = trained.get_input(batch, "image")
    with torch.no_grad():
        error_before = (fresh(x, sample_posterior=False)[0] - x).abs().mean()
        error_after = (trained(x, sample_posterior=False)[0] - x).abs().mean()
    assert error_after < 0.95 * error_before, (error_before, error_after)

    for split in ("train", "val"):
        for key in ("inputs", "reconstructions", "samples"):
            for step in (6, 12):
                assert any(g.startswith(f"{key}_gs-{step:06}") for g in grids(run, split)), (split, key, step)


@pytest.fixture(scope="module")
def txt2img_run(tmp_path_factory):
    """A 4-step pretraining of the toy text-to-image model on top of a random, frozen toy autoencoder."""
    folder = tmp_path_factory.mktemp("txt2img")
    first_stage = OmegaConf.load(TOY_TXT2IMG).model.params.first_stage_config
    first_stage.params.ckpt_path = None
    torch.manual_seed(0)
    autoencoder = os.path.join(folder, "autoencoder.safetensors")
    save_file(instantiate_from_config(first_stage).state_dict(), autoencoder)
    trainer = main_module.main([
        "--base", TOY_TXT2IMG, "-t", "-l", str(folder / "logs"), *SHORT_RUN,
        f"model.params.first_stage_config.params.ckpt_path={autoencoder}",
        "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
    ])
    run = only_run(folder / "logs")
    return trainer, run, autoencoder


def test_txt2img_pretraining_trains_unet_and_bert_not_the_vae(txt2img_run):
    trainer, run, autoencoder = txt2img_run
    assert os.listdir(os.path.join(run, "checkpoints")) == ["last.ckpt"]
    last = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    state = last["state_dict"]
    initial = initial_model(run).state_dict()
    assert set(state) == set(initial)

    def changed(prefix):
        keys = [k for k in state if k.startswith(prefix) and state[k].is_floating_point()]
        return {k: not torch.equal(state[k], initial[k]) for k in keys}

    assert all(changed("model.diffusion_model.").values())
    bert = changed("cond_stage_model.")
    # The LM head is kept only for LDM-BERT's key layout; nothing reaches it.
    assert [k for k, moved in bert.items() if not moved] == ["cond_stage_model.transformer.to_logits.weight", "cond_stage_model.transformer.to_logits.bias"]
    vae = load_file(autoencoder)
    assert all(torch.equal(state[f"first_stage_model.{k}"], v) for k, v in vae.items())

    assert state["model_ema.num_updates"].item() == 4
    ema, final, start = state["model_ema.diffusion_modelout2weight"], state["model.diffusion_model.out.2.weight"], initial["model.diffusion_model.out.2.weight"]
    assert not torch.equal(ema, final) and not torch.equal(ema, start)
    assert 0 < state["scale_factor"].item() != 1.0

    for key in ("inputs", "reconstruction", "conditioning", "samples", "samples_scaled"):
        assert any(g.startswith(f"{key}_gs-000002") for g in grids(run, "train")), key
    assert {"val/loss_simple", "val/loss_simple_ema"} <= set(trainer.callback_metrics)


def test_exported_model_loads_into_the_toy_configs(txt2img_run, tmp_path, capsys):
    _, run, autoencoder = txt2img_run
    last = os.path.join(run, "checkpoints", "last.ckpt")
    half, full = str(tmp_path / "model.safetensors"), str(tmp_path / "model-fp32.safetensors")
    assert export_toy_model.main(["--ckpt", last, "--out", half]) == 0
    assert export_toy_model.main(["--ckpt", last, "--out", full, "--dtype", "fp32"]) == 0
    before = os.path.getmtime(half)
    assert export_toy_model.main(["--ckpt", last, "--out", half, "--dtype", "fp32"]) == 2  # an existing file stays
    assert "--out '" + half + "' already exists: pass another --out, or --force" in capsys.readouterr().err
    assert os.path.getmtime(half) == before
    assert export_toy_model.main(["--ckpt", last, "--out", half, "--force"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["model-fp32.safetensors", "model.safetensors"]  # no .tmp left behind
    trained = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    exported, exported32 = load_file(half), load_file(full)

    assert not any(k.startswith("model_ema.") for k in exported) and set(exported) == set(exported32)
    for key, value in exported32.items():
        if key.startswith("model."):
            ema_key = "model_ema." + key[len("model."):].replace(".", "")
            assert torch.equal(value, trained[ema_key]), key
        else:
            assert torch.equal(value, trained[key]), key
    assert exported["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert exported["cond_stage_model.transformer.token_emb.weight"].dtype == torch.float16
    assert exported["alphas_cumprod"].dtype == torch.float32 and exported["scale_factor"].dtype == torch.float32

    capsys.readouterr()
    finetune = OmegaConf.load(TOY_FINETUNE)
    finetune.model.params.ckpt_path = half
    model = instantiate_from_config(finetune.model)
    assert f"from {half}: 0 missing, 0 unexpected" in capsys.readouterr().out
    for key, value in exported.items():
        assert torch.equal(model.state_dict()[key], value.float()), key
    assert model.embedding_manager is not None

    txt2img = OmegaConf.load(TOY_TXT2IMG)
    txt2img.model.params.update(ckpt_path=half, use_ema=False)
    txt2img.model.params.first_stage_config.params.ckpt_path = autoencoder
    instantiate_from_config(txt2img.model)
    out = capsys.readouterr().out
    assert f"from {autoencoder}: 0 missing, 0 unexpected" in out and f"from {half}: 0 missing, 0 unexpected" in out


def test_exporting_a_textual_inversion_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"embedding_manager.string_to_param_dict.*": torch.zeros(1, 4)}, "global_step": 3}, path)
    assert export_toy_model.main(["--ckpt", str(path), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "holds no model weights" in capsys.readouterr().err


def test_a_config_with_nothing_to_train_says_so(tmp_path):
    with pytest.raises(ValueError, match="nothing to train.*unfreeze_model"):
        main_module.main(["--base", TOY_TXT2IMG, "-t", "-l", str(tmp_path), *SHORT_RUN, "model.params.unfreeze_model=false",
                          "model.params.first_stage_config.params.ckpt_path=null"])


def test_caption_dropout_is_seeded_and_has_the_configured_rate(txt2img_run):
    model = txt2img_run[0].lightning_module
    captions = [f"caption {i}" for i in range(2000)]

    def dropped(p, seed=0):
        model.ucg_training = {"caption": {"p": p, "val": ""}}
        return model.drop_conditioning({"caption": captions}, torch.Generator().manual_seed(seed))["caption"]

    try:
        assert dropped(0.0) == captions and dropped(1.0) == [""] * 2000
        half = dropped(0.5)
        assert half == dropped(0.5) and half != dropped(0.5, seed=1)
        assert all(c in ("", original) for c, original in zip(half, captions))
        assert abs(half.count("") / 2000 - 0.5) < 0.05
    finally:
        model.ucg_training = {"caption": {"p": 0.1, "val": ""}}


def test_lit_ema_follows_the_ramped_decay_and_swaps_weights_in_and_out():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    ema = LitEma(model, decay=0.9)
    assert set(ema.state_dict()) == {"decay", "num_updates", "0weight", "0bias", "1weight"}
    expected = model[0].weight.detach().clone()
    for n in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
    torch.testing.assert_close(ema.get_buffer("0weight"), expected)
    assert ema.num_updates.item() == 3

    trained = model[0].weight.detach().clone()
    with ema.applied_to(model):
        torch.testing.assert_close(model[0].weight.detach(), expected)
    assert torch.equal(model[0].weight, trained)


def test_reconstruction_kl_loss_sums_per_image_and_averages_over_the_batch():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 2, 2, generator=generator))
    loss, logs = ReconstructionKLLoss(kl_weight=0.01, mse_weight=0.5)(x, y, posterior, split="val")
    per_pixel = (x - y).abs() + 0.5 * (x - y) ** 2
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum() / 2
    torch.testing.assert_close(loss, per_pixel.sum() / 2 + 0.01 * kl)
    torch.testing.assert_close(logs["val/rec_loss"], per_pixel.mean())
    torch.testing.assert_close(logs["val/kl_loss"], kl)


def test_lit_ema_without_the_ramp_keeps_it_off_after_a_reload():
    model = torch.nn.Linear(2, 2)
    fixed = LitEma(model, decay=0.5, use_num_updates=False)
    ramped = LitEma(model, decay=0.5)
    ramped.load_state_dict(fixed.state_dict())
    assert not ramped.ramps_up and ramped.num_updates.item() == -1
    with torch.no_grad():
        model.weight.add_(1.0)
    ramped(model)
    assert ramped.num_updates.item() == -1  # decay 0.5 as stored, no ramp
    assert torch.allclose(ramped.state_dict()["weight"], model.weight - 0.5)
