"""The generation core and its scripts on tiny random models: seeded reproducibility, output files, several
embedding files at once, img2img's strength endpoints, PLMS, --from-file and the command lines' errors."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import generate as generate_module
from ldm.embeddings import Embeddings, save_embeddings
from ldm.generate import generate, load_model, sampling_weights_dtype, save_outputs
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from scripts import img2img, stable_txt2img, txt2img
from tests.conftest import REPO, TINY_LDM, TINY_SD, draw_images

FAST = dict(n_samples=2, n_iter=1, steps=5, scale=7.5, eta=0.0, height=32, width=32, precision="full", progress=False)
TINY_FLAGS = ["--H", "32", "--W", "32", "--f", "2", "--ddim_steps", "5", "--precision", "full"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_model(tiny_sd_ckpt):
    return load_model(TINY_SD, tiny_sd_ckpt, "cpu")


@pytest.fixture(scope="module")
def init_images(tmp_path_factory):
    folder = draw_images(tmp_path_factory.mktemp("init"), count=2, size=32)
    return [Image.open(os.path.join(folder, f"img_{i}.png")).convert("RGB") for i in range(2)]


def write_embedding(path, placeholder, rows, seed):
    vectors = torch.randn(rows, 32, generator=torch.Generator().manual_seed(seed))
    save_embeddings(Embeddings({placeholder: vectors}), path)
    return str(path), vectors


def test_same_seed_gives_identical_images_and_another_seed_different_ones(sd_model):
    settings = dict(FAST, eta=0.5)  # eta > 0 also draws noise at every step
    first = torch.stack(generate(sd_model, "a photo of a cat", seed=7, **settings))
    again = torch.stack(generate(sd_model, "a photo of a cat", seed=7, **settings))
    other = torch.stack(generate(sd_model, "a photo of a cat", seed=8, **settings))
    assert first.shape == (2, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 1e-3
    assert (first[0] - first[1]).abs().mean() > 1e-3, "the images of one batch must start from different noise"


def test_guidance_mixes_in_the_empty_prompts_prediction_at_the_given_scale(sd_model, monkeypatch):
    calls = []
    sample = DDIMSampler.sample

    def recorded(self, *args, **kwargs):
        calls.append(kwargs)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(DDIMSampler, "sample", recorded)
    guided = torch.stack(generate(sd_model, "a photo of a cat", seed=7, **FAST))
    unguided = torch.stack(generate(sd_model, "a photo of a cat", seed=7, **dict(FAST, scale=1.0)))
    assert calls[0]["unconditional_guidance_scale"] == FAST["scale"]
    empty = sd_model.get_learned_conditioning(FAST["n_samples"] * [""])
    assert torch.equal(calls[0]["unconditional_conditioning"], empty)
    assert calls[1]["unconditional_conditioning"] is None  # scale 1 is the conditional prediction alone
    assert (guided - unguided).abs().mean() > 1e-3


def test_image_size_defaults_to_the_size_the_model_was_trained_at(sd_model):
    native = sd_model.image_size * 2  # the tiny autoencoder downsamples by 2
    images = generate(sd_model, "a cat", seed=0, **dict(FAST, n_samples=1, height=None, width=None))
    assert images[0].shape == (3, native, native)


def test_fixed_code_reuses_the_start_code_for_every_batch(sd_model):
    fixed = torch.stack(generate(sd_model, "a cat", seed=3, fixed_code=True, **dict(FAST, n_iter=2)))
    assert torch.equal(fixed[:2], fixed[2:])
    assert (fixed[0] - fixed[1]).abs().mean() > 1e-3
    fresh = torch.stack(generate(sd_model, "a cat", seed=3, **dict(FAST, n_iter=2)))
    assert torch.equal(fresh[:2], fixed[:2]), "the first batch draws the same noise either way"
    assert (fresh[:2] - fresh[2:]).abs().mean() > 1e-3


def test_plms_and_prompt_lists_with_a_short_last_batch(sd_model):
    prompts = ["a cat", "a dog", "a red house"]
    images = torch.stack(generate(sd_model, prompts, seed=1, sampler="plms", **FAST))
    assert images.shape == (3, 3, 32, 32)
    ddim = torch.stack(generate(sd_model, prompts, seed=1, **FAST))
    assert (images - ddim).abs().mean() > 1e-4, "PLMS must not fall back to DDIM"
    with pytest.raises(ValueError, match="needs eta=0"):
        generate(sd_model, prompts, seed=1, sampler="plms", **dict(FAST, eta=0.5))


def test_autocast_on_the_cpu_stays_full_precision(sd_model):
    settings = dict(FAST, n_samples=1, steps=2, scale=1.0)
    full = torch.stack(generate(sd_model, "a cat", seed=5, **settings))
    autocast = torch.stack(generate(sd_model, "a cat", seed=5, **dict(settings, precision="autocast")))
    assert torch.equal(full, autocast)


def test_full_precision_with_half_weights_is_a_one_line_error(tiny_sd_ckpt):
    model = load_model(TINY_SD, tiny_sd_ckpt, "cpu", weights_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="precision 'full' needs float32 weights, but the model's are stored in "
                                         "torch.bfloat16"):
        generate(model, "a cat", seed=5, **dict(FAST, n_samples=1, steps=2))


def test_non_finite_pixels_are_reported_not_silently_saved_black(sd_model, monkeypatch):
    monkeypatch.setattr(sd_model, "decode_first_stage", lambda z: torch.full((z.shape[0], 3, 32, 32), float("nan")))
    with pytest.warns(UserWarning, match="NaN or infinite pixels, saved as black: .*--precision full"):
        generate(sd_model, "a cat", seed=5, **dict(FAST, n_samples=1, steps=2))


@pytest.mark.parametrize("override, message", [
    (dict(downsampling_factor=8), "--f 8 does not match .* pass --f 2"),
    (dict(latent_channels=3), "--C 3 does not match"),
    (dict(height=30), "--H 30 must be a positive multiple of 4"),
    (dict(sampler="euler"), "sampler 'euler' is unknown"),
    (dict(strength=0.5), "strength applies only to img2img"),
    (dict(steps=600), "--ddim_steps 600 does not suit this model: .*at most 500"),
])
def test_bad_settings_fail_before_sampling(sd_model, override, message):
    with pytest.raises(ValueError, match=message):
        generate(sd_model, "a cat", seed=0, **{**FAST, **override})


def test_img2img_strength_zero_is_the_autoencoder_round_trip(sd_model, init_images):
    (image,) = generate(sd_model, "a cat", seed=0, init_image=init_images[0], strength=0.0, **FAST)[:1]
    x = torch.from_numpy(np.asarray(init_images[0], dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        expected = sd_model.decode_first_stage(sd_model.scale_factor * sd_model.encode_first_stage(x).mode())
    torch.testing.assert_close(image, ((expected[0] + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_img2img_strength_one_ignores_the_input_and_other_strengths_use_it(sd_model, init_images):
    settings = dict(FAST, n_samples=1)

    def run(index, strength):
        image = init_images[index]
        return torch.stack(generate(sd_model, "a cat", seed=4, init_image=image, strength=strength, **settings))

    from_noise = torch.stack(generate(sd_model, "a cat", seed=4, **settings))
    assert torch.equal(run(0, 1.0), from_noise), "strength 1 is txt2img from the same noise"
    assert torch.equal(run(1, 1.0), from_noise)
    half_a, half_b = run(0, 0.5), run(1, 0.5)
    assert (half_a - half_b).abs().mean() > 1e-3
    assert (half_a - from_noise).abs().mean() > 1e-3


def test_img2img_noises_to_the_step_its_first_denoising_step_starts_from(sd_model, init_images, monkeypatch):
    """strength 0.6 of 5 steps denoises 3 steps (indices 2, 1, 0), so the input is noised to step index 2."""
    calls = {}
    encode, decode = DDIMSampler.stochastic_encode, DDIMSampler.decode

    def recording_encode(self, x0, t, **kwargs):
        calls["noised_to"] = t.tolist()
        return encode(self, x0, t, **kwargs)

    def recording_decode(self, x_latent, cond, t_start, **kwargs):
        calls["denoised_from"] = t_start
        return decode(self, x_latent, cond, t_start, **kwargs)

    monkeypatch.setattr(DDIMSampler, "stochastic_encode", recording_encode)
    monkeypatch.setattr(DDIMSampler, "decode", recording_decode)
    generate(sd_model, "a cat", seed=0, init_image=init_images[0], strength=0.6, **FAST)
    assert calls == {"noised_to": [2, 2], "denoised_from": 3}
    # 7 steps of 1000 timesteps run 8 (every 142nd): strength 0.5 is 4 of them.
    generate(sd_model, "a cat", seed=0, init_image=init_images[0], strength=0.5, **dict(FAST, steps=7))
    assert calls == {"noised_to": [3, 3], "denoised_from": 4}


def test_img2img_sizes_and_errors(sd_model, init_images):
    odd = init_images[0].resize((34, 38))
    (image,) = generate(sd_model, "a cat", seed=0, init_image=odd, strength=0.25,
                        **dict(FAST, n_samples=1, height=None, width=None))
    assert image.shape == (3, 36, 32), "rounded down to a multiple of 4 (f=2 times one UNet downsampling)"
    with pytest.raises(ValueError, match="--strength must be between 0 and 1"):
        generate(sd_model, "a cat", seed=0, init_image=odd, strength=1.5, **FAST)
    with pytest.raises(ValueError, match="img2img needs the DDIM sampler"):
        generate(sd_model, "a cat", seed=0, init_image=odd, strength=0.5, sampler="plms", **FAST)
    (image,) = generate(sd_model, "a cat", seed=0, init_image=odd, strength=0.25,
                        **dict(FAST, n_samples=1, height=40, width=None))
    assert image.shape == (3, 40, 32), "the side not given is the init image's"


def test_save_outputs_numbers_continue_and_grids_never_overwrite(tmp_path):
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    first = save_outputs(images, tmp_path, "a photo  of *", n_rows=3)
    samples = sorted(os.listdir(tmp_path / "samples"))
    assert samples == [f"{i:05}.png" for i in range(6)]
    saved = np.asarray(Image.open(tmp_path / "samples" / "00004.png"))
    np.testing.assert_array_equal(saved, (images[4].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    grid_path = tmp_path / "a-photo-of-_-0000.png"
    assert first[-1] == str(grid_path)
    assert Image.open(grid_path).size == (3 * 34 + 2, 2 * 34 + 2), "3 images per row, 2 rows, 2 px padding"
    grid_bytes = grid_path.read_bytes()

    Image.new("RGB", (4, 4)).save(tmp_path / "samples" / "00041.png")
    second = save_outputs(images[:2], tmp_path, "a photo  of *", n_rows=3)
    assert [os.path.basename(p) for p in second] == ["00042.png", "00043.png", "a-photo-of-_-0001.png"]
    assert grid_path.read_bytes() == grid_bytes
    assert save_outputs(images, tmp_path, "x", n_rows=2, skip_grid=True, skip_save=True) == []


def test_sampling_keeps_frozen_weights_in_autocasts_half_dtype_on_an_accelerator_only():
    assert sampling_weights_dtype("cuda", "autocast") == torch.float16
    assert sampling_weights_dtype(torch.device("cuda:1"), "full") == torch.float32
    assert sampling_weights_dtype("cpu", "autocast") == torch.float32  # "autocast" stays float32 on the CPU


def test_load_model_stores_the_frozen_weights_in_the_given_dtype_and_the_learned_vectors_in_float32(tiny_sd_ckpt,
                                                                                                     tmp_path):
    star_path, star = write_embedding(tmp_path / "star.pt", "*", 1, seed=0)
    model = load_model(TINY_SD, tiny_sd_ckpt, "cpu", embedding_paths=[star_path], weights_dtype=torch.bfloat16)
    for name, parameter in model.named_parameters():
        expected = torch.float32 if name.startswith("embedding_manager.") else torch.bfloat16
        assert parameter.dtype == expected, name
    assert torch.equal(model.embedding_manager.vectors("*").detach(), star)


def test_on_a_gpu_the_token_table_waits_in_cpu_memory_and_the_images_are_the_same(sd_model, tiny_sd_ckpt, monkeypatch):
    assert not sd_model.cond_stage_model.token_table_parked  # on the CPU there is nowhere better to wait
    monkeypatch.setattr(LatentDiffusion, "device", property(lambda _: torch.device("cuda")))
    parked = load_model(TINY_SD, tiny_sd_ckpt, "cpu")
    monkeypatch.undo()
    assert parked.cond_stage_model.token_table_parked
    settings = dict(FAST, eta=0.5)
    assert torch.equal(torch.stack(generate(parked, "a photo of *", seed=7, **settings)),
                       torch.stack(generate(sd_model, "a photo of *", seed=7, **settings)))


def test_two_embedding_files_are_merged_and_both_words_are_active(tiny_sd_ckpt, tmp_path, capsys):
    star_path, star = write_embedding(tmp_path / "star.pt", "*", 1, seed=0)
    at_path, at = write_embedding(tmp_path / "at.pt", "@", 2, seed=1)
    model = load_model(TINY_SD, tiny_sd_ckpt, "cpu", embedding_paths=[star_path, at_path])
    assert "Learned words: * (1 vector), @ (2 vectors)" in capsys.readouterr().out
    manager = model.embedding_manager
    torch.testing.assert_close(manager.vectors("*").detach(), star)
    torch.testing.assert_close(manager.vectors("@").detach(), at)

    def conditioning():
        with torch.no_grad():
            return model.get_learned_conditioning(["a photo of * and @"])

    both = conditioning()
    for placeholder in ("*", "@"):
        vectors = manager.vectors(placeholder)
        learned = vectors.detach().clone()
        with torch.no_grad():  # not a uniform shift: the encoder's LayerNorms would remove it
            vectors.copy_(torch.randn(learned.shape, generator=torch.Generator().manual_seed(9)))
        assert (conditioning() - both).abs().max() > 1e-2, f"'{placeholder}' has no effect on the conditioning"
        with torch.no_grad():
            vectors.copy_(learned)
    torch.testing.assert_close(conditioning(), both)


def test_a_placeholder_in_two_files_is_a_one_line_error(tiny_sd_ckpt, tmp_path):
    first, _ = write_embedding(tmp_path / "cat.pt", "*", 1, seed=0)
    second, _ = write_embedding(tmp_path / "dog.pt", "*", 1, seed=1)
    with pytest.raises(ValueError) as error:
        load_model(TINY_SD, tiny_sd_ckpt, "cpu", embedding_paths=[first, second])
    message = str(error.value)
    assert "'*'" in message and first in message and second in message and "\n" not in message
    assert "scripts/merge_embeddings.py --manager_ckpts" in message and "--rename '2:*=NEW'" in message


def test_embedding_files_are_read_and_their_clashes_named_before_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "load_checkpoint", lambda path: pytest.fail("the checkpoint was read"))
    notes = tmp_path / "notes.pt"
    notes.write_text("not an embedding")
    with pytest.raises(ValueError, match=f"'{notes}'"):
        load_model(TINY_SD, "model.ckpt", "cpu", embedding_paths=[str(notes)])
    first, _ = write_embedding(tmp_path / "cat.pt", "*", 1, seed=0)
    second, _ = write_embedding(tmp_path / "dog.pt", "*", 1, seed=1)
    with pytest.raises(ValueError, match="'\\*'"):
        load_model(TINY_SD, "model.ckpt", "cpu", embedding_paths=[first, second])


def test_a_config_without_personalization_gets_an_embedding_manager(tiny_ldm_ckpt, tmp_path):
    config = OmegaConf.load(TINY_LDM)
    del config.model.params.personalization_config
    config_path = tmp_path / "ldm-eval.yaml"
    OmegaConf.save(config, config_path)
    star_path, star = write_embedding(tmp_path / "star.pt", "*", 1, seed=2)
    model = load_model(str(config_path), tiny_ldm_ckpt, "cpu", embedding_paths=[star_path])
    torch.testing.assert_close(model.embedding_manager.vectors("*").detach(), star)
    with torch.no_grad():
        learned = model.get_learned_conditioning(["a photo of *"])
        model.embedding_manager.vectors("*").mul_(-1.0)
        assert (model.get_learned_conditioning(["a photo of *"]) - learned).abs().max() > 1e-2


def test_stable_txt2img_end_to_end_with_prompts_from_a_file(tiny_sd_ckpt, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n\na dog\na red house\n")
    outdir = tmp_path / "out"
    argv = ["--config", TINY_SD, "--ckpt", tiny_sd_ckpt, "--outdir", str(outdir), "--n_samples", "2",
            "--n_iter", "1", "--from-file", str(prompt_file), *TINY_FLAGS]
    assert stable_txt2img.main(argv) == 0
    assert sorted(os.listdir(outdir / "samples")) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(outdir / "prompts-0000.png").size == (2 * 34 + 2, 2 * 34 + 2), "2 per row, 2 rows"


def test_txt2img_ldm_end_to_end_is_reproducible_and_the_speed_flags_draw_the_same(tiny_ldm_ckpt, tmp_path):
    def run(outdir, *flags):
        argv = ["--config", TINY_LDM, "--ckpt_path", tiny_ldm_ckpt, "--outdir", str(outdir), "--n_samples", "2",
                "--n_iter", "2", "--prompt", "a photo of a cat", "--seed", "11", *TINY_FLAGS, *flags]
        assert txt2img.main(argv) == 0
        return [np.asarray(Image.open(outdir / "samples" / name)) for name in sorted(os.listdir(outdir / "samples"))]

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert len(first) == 4
    for one, other in zip(first, second):
        np.testing.assert_array_equal(one, other)
    assert os.path.isfile(tmp_path / "a" / "a-photo-of-a-cat-0000.png")
    speed_flags = ["--channels_last", "--attention_backend", "cudnn"]  # the CPU falls back to its own attention
    for one, other in zip(first, run(tmp_path / "c", *speed_flags)):  # the same sums in another order
        assert np.abs(one.astype(int) - other).max() <= 1


def test_img2img_runs_from_the_repository_root(tiny_sd_ckpt, init_images, tmp_path):
    init_path = tmp_path / "init.png"
    init_images[0].save(init_path)
    outdir = tmp_path / "out"
    argv = ["--config", TINY_SD, "--ckpt", tiny_sd_ckpt, "--init_img", str(init_path), "--strength", "0.5",
            "--n_samples", "1", "--n_iter", "1", "--outdir", str(outdir), *TINY_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "scripts/img2img.py", *argv], cwd=REPO, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(outdir / "samples" / "00000.png").size == (32, 32)
    assert os.path.isfile(outdir / "a-painting-of-a-virus-monster-playing-guitar-0000.png")


def test_txt2img_defaults_are_the_ldm_ones():
    args = txt2img.build_parser().parse_args([])
    assert (args.ddim_steps, args.scale, args.H, args.W, args.n_samples, args.n_iter, args.seed, args.precision) == (
        200, 5.0, None, None, 4, 1, 42, "full")
    assert args.ckpt == "models/ldm/text2img-large/model.ckpt"
    sd = stable_txt2img.build_parser().parse_args(["--embedding_path", "a.pt", "b.pt", "--embedding_path", "c.pt"])
    assert (sd.ddim_steps, sd.scale, sd.H, sd.n_samples, sd.n_iter, sd.precision) == (50, 7.5, None, 3, 2, "autocast")
    # no --H/--W means the model's own size: the originals' 256 px (LDM) and 512 px (SD v1), latents downsampled by 8
    for parser, pixels in ((txt2img, 256), (stable_txt2img, 512)):
        config = OmegaConf.load(os.path.join(REPO, parser.build_parser().parse_args([]).config))
        assert config.model.params.image_size * 8 == pixels
    assert sd.embedding_path == ["a.pt", "b.pt", "c.pt"]
    image = img2img.build_parser().parse_args(["--init_img", "x.png"])
    assert (image.strength, image.H, image.W) == (0.75, None, None)


@pytest.mark.parametrize("script", [stable_txt2img, txt2img, img2img])
def test_a_missing_checkpoint_is_a_one_line_error(script, tmp_path, capsys):
    missing = str(tmp_path / "nowhere.ckpt")
    argv = ["--config", TINY_SD, "--ckpt", missing, *TINY_FLAGS]
    if script is img2img:
        Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
        argv += ["--init_img", str(tmp_path / "init.png")]
    assert script.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and missing in error and "does not exist" in error


@pytest.mark.parametrize("flags, expected", [
    (["--outdir", "{file}"], "--outdir '.*notes.txt': it is a file, not a folder"),
    (["--outdir", "{file}/out"], "--outdir .*: its folder '.*notes.txt' is a file"),
    (["--ddim_steps", "0"], "--ddim_steps must be at least 1, got 0"),
    (["--ddim_steps", "600"], "--ddim_steps 600 does not suit this model: .*at most 500"),
    (["--n_iter", "0"], "--n_iter must be at least 1"),
    (["--n_rows", "-1"], "--n_rows must be at least 0"),
    (["--H", "-32"], "--H must be at least 1"),
    (["--device", "cuda:7"], "--device 'cuda:7': "),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--plms", "--ddim_eta", "0.5"], "--plms is deterministic: drop --ddim_eta 0.5"),
])
def test_command_line_mistakes_fail_before_the_model_loads(tiny_sd_ckpt, tmp_path, monkeypatch, capsys, flags,
                                                           expected):
    (tmp_path / "notes.txt").write_text("not a folder")
    monkeypatch.setattr(generate_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    flags = [flag.format(file=tmp_path / "notes.txt", folder=tmp_path) for flag in flags]
    argv = ["--config", TINY_SD, "--ckpt", tiny_sd_ckpt, "--outdir", str(tmp_path / "out"), *TINY_FLAGS, *flags]
    assert stable_txt2img.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(expected, error), error


def test_img2img_checks_its_init_image_and_strength_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    for flags, expected in [(["--init_img", str(tmp_path / "none.png")], "--init_img '.*none.png' does not exist"),
                            (["--init_img", str(tmp_path)], "--init_img '.*' is a folder"),
                            (["--init_img", "x.png", "--strength", "1.5"], "--strength must be between 0 and 1"),
                            (["--init_img", "x.png", "--plms"], "img2img needs the DDIM sampler")]:
        assert img2img.main(["--outdir", str(tmp_path / "out"), *flags]) == 1
        assert re.search(expected, capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--ckpt", "--config", "--embedding_path"])
def test_a_folder_given_as_a_file_is_named_as_one(tmp_path, capsys, flag):
    """Config and embedding files are checked before the checkpoint (missing here) is read."""
    argv = ["--config", TINY_SD, "--ckpt", str(tmp_path / "none.ckpt"), "--outdir", str(tmp_path / "out")]
    assert stable_txt2img.main(argv + [flag, str(tmp_path)]) == 1
    assert f"'{tmp_path}' is a folder: pass the file inside it" in capsys.readouterr().err


def test_cuda_graphs_on_the_cpu_say_they_do_nothing_and_sampling_goes_on(tiny_sd_ckpt, tmp_path, capsys):
    argv = ["--config", TINY_SD, "--ckpt", tiny_sd_ckpt, "--outdir", str(tmp_path), "--n_samples", "1", "--n_iter", "1",
            "--skip_grid", "--cuda_graphs", "--device", "cpu", *TINY_FLAGS, "--ddim_steps", "2"]
    assert stable_txt2img.main(argv) == 0
    assert "--cuda_graphs has no effect with --device cpu" in capsys.readouterr().err
    assert os.listdir(tmp_path / "samples") == ["00000.png"]


@pytest.fixture(scope="module")
def learned_model(tiny_sd_ckpt, tmp_path_factory):
    """The tiny SD model with '*' (one vector) and diffusers' several-token '<cat-toy>' (three vectors)."""
    folder = tmp_path_factory.mktemp("learned")
    star, _ = write_embedding(folder / "star.pt", "*", 1, seed=0)
    toy, _ = write_embedding(folder / "toy.pt", "<cat-toy>", 3, seed=1)
    return load_model(TINY_SD, tiny_sd_ckpt, "cpu", embedding_paths=[star, toy])


@pytest.mark.parametrize("prompt, warned", [
    ("a photo of a dog", True),
    ("a photo of *, red", False),
    ("A photo of <CAT-TOY>", False),  # prompts name several-token words in any case
    ("a photo of bobcat-toys", True),
])
def test_a_prompt_without_the_learned_words_is_warned_about(learned_model, prompt, warned):
    messages = generate_module.prompt_warnings(learned_model, prompt, f"--prompt '{prompt}'", ["*", "<cat-toy>"])
    expected = [f"--prompt '{prompt}' holds none of the learned words (*, <cat-toy>), so the images show none of them; "
                "write one in it to use it, e.g. 'a photo of *'"]
    assert messages == (expected if warned else [])


def test_a_prompt_longer_than_the_text_encoder_is_warned_about_with_its_token_count(learned_model):
    def warnings_for(prompt):
        return generate_module.prompt_warnings(learned_model, prompt, "--prompt", ["*", "<cat-toy>"])

    assert warnings_for("a photo of * " + "red " * 71) == []  # 75 tokens with start and end: the last that fit
    (message,) = warnings_for("a photo of * " + "red " * 73)
    assert message == ("--prompt is 79 tokens, but the text encoder reads 77 (start and end included): the rest is "
                       "dropped; shorten the prompt")
    (message,) = warnings_for("a photo of <cat-toy> " + "red " * 71)  # its 3 vectors take 3 places
    assert message.startswith("--prompt is 79 tokens")
    (message,) = warnings_for("a photo of " + "red " * 80 + "*")
    assert message.startswith("--prompt is 86 tokens") and "the rest, learned word * included, is dropped" in message


def test_txt2img_warns_in_one_line_per_prompt_and_still_samples(tiny_sd_ckpt, tmp_path, capsys, caplog):
    star, _ = write_embedding(tmp_path / "star.pt", "*", 1, seed=0)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a photo of a dog\na photo of *\n" + "a photo of " + "red " * 80 + "*\n")
    argv = ["--config", TINY_SD, "--ckpt", tiny_sd_ckpt, "--outdir", str(tmp_path / "out"), "--n_samples", "3",
            "--n_iter", "1", "--from-file", str(prompt_file), "--embedding_path", star, "--skip_grid", *TINY_FLAGS,
            "--ddim_steps", "2"]
    assert stable_txt2img.main(argv) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warned) == 2, warned
    assert warned[0].endswith(f": warning: prompt 'a photo of a dog' of --from-file '{prompt_file}' holds none "
                              "of the learned words (*), so the images show none of them; write one in it to use it, "
                              "e.g. 'a photo of *'")
    assert "is 86 tokens, but the text encoder reads 77" in warned[1] and "learned word * included" in warned[1]
    assert "Token indices sequence length" not in err + caplog.text, "transformers' own warning, multi-line"
    assert len(os.listdir(tmp_path / "out" / "samples")) == 3


def test_the_init_image_is_read_as_training_images_are(tmp_path):
    rotated = Image.new("RGB", (48, 32), (200, 30, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert generate_module.load_init_image(str(tmp_path / "rotated.jpg"), 4).shape == (1, 3, 48, 32)

    Image.fromarray(np.full((32, 32), 1000, dtype=np.uint16)).save(tmp_path / "grey16.png")  # dark grey
    grey = generate_module.load_init_image(str(tmp_path / "grey16.png"), 4)
    torch.testing.assert_close(grey, torch.full_like(grey, 4 / 127.5 - 1))  # 1000 / 257 -> 4 of 255, not white

    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert torch.equal(generate_module.load_init_image(str(tmp_path / "clear.png"), 4), torch.ones(1, 3, 32, 32))


def test_a_huge_init_image_is_a_one_line_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "huge.png")
    monkeypatch.setattr(generate_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels is over twice it, as 20000x12000 is Pillow's
    assert img2img.main(["--init_img", str(tmp_path / "huge.png"), "--outdir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and ": error: --init_img" in error and "resize it" in error, error


def test_an_unreadable_init_image_is_a_one_line_error_naming_the_flag(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    monkeypatch.setattr(generate_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert img2img.main(["--init_img", str(tmp_path / "notes.png"), "--outdir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f": error: --init_img: cannot read image '{tmp_path}" in error, error
