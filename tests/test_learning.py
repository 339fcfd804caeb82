"""Training really learns: the denoising loss of the training images under "a photo of *" falls with the learned
vector, and a vector moved as far at random does not show the gain.

A random UNet barely listens to its text, so the test model gets strong cross-attention (large attn2 value/output
and proj_out weights): then the part of the loss the text can explain is large enough to measure."""
import glob
import os

import torch

import main as main_module
from ldm.checkpoint import build_random_model
from ldm.embeddings import load_embeddings
from ldm.images import channels_first
from tests.conftest import TINY_SD


def denoising_loss(model, images, vector, draws=48):
    """Mean eps-MSE over the training images with fixed timesteps and noise, "*" set to `vector`."""
    manager = model.embedding_manager
    with torch.no_grad():
        manager.vectors("*").copy_(vector)
        x = channels_first(torch.stack([torch.from_numpy(images[i]["image"]) for i in range(len(images))]))
        z = model.get_first_stage_encoding(model.encode_first_stage(x).mode())
        cond = model.get_learned_conditioning(["a photo of *"] * len(z))
        generator = torch.Generator().manual_seed(1234)
        losses = []
        for _ in range(draws):
            t = torch.randint(0, model.num_timesteps, (len(z),), generator=generator)
            noise = torch.randn(z.shape, generator=generator)
            losses.append(model.p_losses(z, cond, t, noise)[1]["loss_simple"])
        return torch.stack(losses).mean().item()


def text_sensitive_model():
    model = build_random_model(TINY_SD)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "attn2.to_v" in name or "attn2.to_out" in name or "proj_out" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_training_lowers_the_loss_of_the_placeholder_prompt(tmp_path, images):
    model = text_sensitive_model()
    ckpt = tmp_path / "text-sensitive.ckpt"
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}}, ckpt)
    argv = ["--base", TINY_SD, "-t", "--actual_resume", str(ckpt), "--data_root", str(images), "--init_word", "cat",
            "-l", str(tmp_path / "logs"), "lightning.trainer.max_steps=80", "lightning.callbacks.image_logger.params.disabled=True",
            "data.params.train.params.flip_p=0.0"]
    trainer = main_module.main(argv)
    run = glob.glob(str(tmp_path / "logs" / "*"))[0]
    learned = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt")).vectors["*"]

    model.eval()
    dataset = trainer.datamodule.datasets["validation"]
    initial = model.embedding_manager.vectors("*").detach().clone()
    torch.manual_seed(7)
    untrained = initial + torch.randn_like(initial) * (learned - initial).norm() / initial.numel() ** 0.5

    before = denoising_loss(model, dataset, initial)
    after = denoising_loss(model, dataset, learned)
    random_move = denoising_loss(model, dataset, untrained)
    assert after < before - 0.004, (before, after)
    assert random_move > before - 0.001, (before, random_move)
