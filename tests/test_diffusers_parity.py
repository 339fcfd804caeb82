"""A whole checkpoint of ours, converted by diffusers' `from_single_file`, computes what our model computes, and
textual-inversion files travel both ways between our code and diffusers.

Everything runs offline on a tiny random-weight model of `configs/tiny/sd-tiny-finetune.yaml`.
"""
import copy

import ftfy
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import build_random_model, restore
from ldm.embeddings import Embeddings, load_embeddings, save_embeddings
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.util import instantiate_from_config
from tests.conftest import TINY_SD
from tests.diffusers_utils import (
    load_converted_pipeline,
    offline_hub,
    original_state_dict,
    randomise_constant_parameters,
    write_diffusers_config_folder,
    write_original_checkpoint,
)

diffusers = pytest.importorskip("diffusers")

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")
# Where diffusers takes the UNet and VAE configs from: our YAML (original_config=) or the local config folder.
CONFIG_SOURCES = ("yaml", "folder")
PROMPTS = [
    "a photo of a cat",
    "",
    "A  Photo\tof a CAT, sitting on a mat!",
    "café naïve, don't   stop...\n\nnow",
    "a " + "very " * 100 + "long prompt",
]
# Text that ftfy changes (curly quotes, an HTML entity, a ligature and full-width letters): SD v1's tokenizer
# cleaned it before BPE, ours does, diffusers' transformers-5 tokenizer does not.
FTFY_PROMPTS = ["it’s “quoted” — ok", "fish &amp; chips", "a ﬁne ｆｕｌｌ-width cat"]
LATENT_SHAPE = (4, 8, 8)
WIDTH = 32  # the tiny text encoder's hidden size, which is also the UNet's context_dim
GUIDANCE_SCALE = 7.5
DDIM_STEPS = 10
TOKEN = "<cat-toy>"
A1111_NAME = "cat-toy"


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def tokenize(tokenizer, prompts) -> torch.Tensor:
    """SD v1's text-encoder input: 77 ids, padded with the end token, as diffusers' encode_prompt builds it."""
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module", autouse=True)
def offline():
    with offline_hub():
        yield


@pytest.fixture(scope="module")
def model():
    return randomise_constant_parameters(build_random_model(TINY_SD)).eval()


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("original")
    state = original_state_dict(model)
    return {suffix: write_original_checkpoint(state, folder / f"tiny-sd{suffix}") for suffix in CHECKPOINT_SUFFIXES}


@pytest.fixture(scope="module")
def pipelines(model, checkpoints, tmp_path_factory):
    config_folder = write_diffusers_config_folder(TINY_SD, tmp_path_factory.mktemp("diffusers-config"),
                                                  original_state_dict(model))
    return {
        (suffix, source): load_converted_pipeline(path, config_folder, TINY_SD if source == "yaml" else None)
        for suffix, path in checkpoints.items()
        for source in CONFIG_SOURCES
    }


@pytest.fixture(scope="module")
def pipe(pipelines):
    return pipelines[".safetensors", "yaml"]


def pipeline_with_own_text_encoder(pipe):
    """A pipeline sharing the UNet and VAE but with its own tokenizer and text encoder, for adding tokens to."""
    components = dict(pipe.components, tokenizer=copy.deepcopy(pipe.tokenizer),
                      text_encoder=copy.deepcopy(pipe.text_encoder))
    return type(pipe)(**components, requires_safety_checker=False)


@pytest.mark.parametrize("source", CONFIG_SOURCES)
@pytest.mark.parametrize("suffix", CHECKPOINT_SUFFIXES)
@torch.no_grad()
def test_converted_pipeline_computes_what_our_model_computes(model, pipelines, suffix, source):
    pipe = pipelines[suffix, source]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *LATENT_SHAPE, generator=generator)
    t = torch.tensor([7, 801])
    context = torch.randn(2, 77, WIDTH, generator=generator)
    ours = model.apply_model(x, t, context)
    assert ours.abs().max() > 1e-2
    assert relative_error(ours, pipe.unet(x, t, encoder_hidden_states=context).sample) < 1e-4

    image = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    our_posterior, their_posterior = model.first_stage_model.encode(image), pipe.vae.encode(image).latent_dist
    assert relative_error(our_posterior.mean, their_posterior.mean) < 1e-4
    assert relative_error(our_posterior.logvar, their_posterior.logvar) < 1e-4
    assert relative_error(model.first_stage_model.decode(x), pipe.vae.decode(x).sample) < 1e-4
    assert pipe.vae.config.scaling_factor == model.scale_factor

    theirs, _ = pipe.encode_prompt(PROMPTS, pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert relative_error(model.cond_stage_model.encode(PROMPTS), theirs) < 1e-4


def test_pipeline_tokenizer_gives_our_ids_and_differs_only_by_ftfy_cleaning(model, pipe):
    """Whitespace, case, punctuation, accents and truncation agree as they are; the FTFY_PROMPTS agree once ftfy
    has cleaned them (as given, diffusers tokenizes them differently from SD v1's training)."""
    ours = model.cond_stage_model.tokenize(PROMPTS + FTFY_PROMPTS)
    assert torch.equal(ours[: len(PROMPTS)], tokenize(pipe.tokenizer, PROMPTS))
    assert torch.equal(ours[len(PROMPTS):], tokenize(pipe.tokenizer, [ftfy.fix_text(p) for p in FTFY_PROMPTS]))


@pytest.mark.parametrize("suffix", CHECKPOINT_SUFFIXES)
def test_restore_reads_the_checkpoint_back_bit_for_bit(model, checkpoints, suffix):
    config = OmegaConf.load(TINY_SD)
    del config.model.params.personalization_config  # an SD v1 file holds no learned vectors
    torch.manual_seed(1)  # a different random start than `model`, so only the restore can make them equal
    fresh = instantiate_from_config(config.model)
    summary = restore(fresh, checkpoints[suffix], verbose=False)

    expected = original_state_dict(model)
    assert (summary.loaded, summary.missing, summary.unexpected) == (len(expected), [], [])
    restored = fresh.state_dict()
    assert restored.keys() == expected.keys()
    assert [key for key in expected if not torch.equal(restored[key], expected[key])] == []


@torch.no_grad()
def test_ddim_sampling_matches_a_diffusers_ddim_loop(model, pipe):
    prompts = ["a photo of a cat", "a red house by the sea"]
    x_T = torch.randn(len(prompts), *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    sampler = DDIMSampler(model)
    ours, _ = sampler.sample(
        S=DDIM_STEPS, batch_size=len(prompts), shape=LATENT_SHAPE, conditioning=model.get_learned_conditioning(prompts),
        eta=0.0, x_T=x_T, unconditional_guidance_scale=GUIDANCE_SCALE,
        unconditional_conditioning=model.get_learned_conditioning(len(prompts) * [""]),
    )

    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    sd_v1 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                 steps_offset=1, clip_sample=False, prediction_type="epsilon")
    assert {key: scheduler.config[key] for key in sd_v1} == sd_v1
    scheduler.set_timesteps(DDIM_STEPS)
    assert scheduler.timesteps.tolist() == sampler.ddim_timesteps[::-1].tolist()
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    theirs = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = pipe.unet(torch.cat([theirs, theirs]), t,
                                         encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        theirs = scheduler.step(eps_uncond + GUIDANCE_SCALE * (eps_cond - eps_uncond), t, theirs, eta=0.0).prev_sample

    assert (ours - x_T).abs().max() > 1.0
    assert relative_error(ours, theirs) < 1e-4
    our_images = model.decode_first_stage(ours)
    their_images = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample
    assert relative_error(our_images, their_images) < 1e-4


@pytest.mark.parametrize(
    "file_name, file_format, placeholder, token",
    [
        ("learned_embeds.safetensors", "diffusers", TOKEN, None),
        ("learned_embeds.bin", "diffusers", TOKEN, None),
        (f"{A1111_NAME}.pt", "a1111", A1111_NAME, TOKEN),
    ],
    ids=["diffusers-safetensors", "diffusers-bin", "a1111-pt"],
)
@torch.no_grad()
def test_our_embedding_files_give_the_same_conditioning_in_diffusers(model, pipe, tmp_path, file_name, file_format,
                                                                      placeholder, token):
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(5))
    save_embeddings(Embeddings({"*": vectors}), tmp_path / "embeddings.pt", format="original")
    save_embeddings(Embeddings({placeholder: vectors}), tmp_path / file_name, format=file_format)
    manager = EmbeddingManager(model.cond_stage_model, placeholder_strings=["*"])
    manager.load(tmp_path / "embeddings.pt")
    ours = model.cond_stage_model.encode(["a photo of *"], embedding_manager=manager)

    pipe = pipeline_with_own_text_encoder(pipe)
    pipe.load_textual_inversion(str(tmp_path / file_name), token=token)
    prompt = f"a photo of {TOKEN}"
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == f"a photo of {TOKEN} {TOKEN}_1"
    theirs, _ = pipe.encode_prompt(prompt, pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert relative_error(ours, theirs) < 1e-5


def write_as_diffusers_training_script_safetensors(path, vectors):
    safetensors.torch.save_file({TOKEN: vectors}, str(path), metadata={"format": "pt"})


def write_as_diffusers_training_script_bin(path, vectors):
    torch.save({TOKEN: vectors}, path)


def write_as_a1111(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": A1111_NAME, "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)


@pytest.mark.parametrize(
    "file_name, write, trigger",
    [
        ("learned_embeds.safetensors", write_as_diffusers_training_script_safetensors, TOKEN),
        ("learned_embeds.bin", write_as_diffusers_training_script_bin, TOKEN),
        (f"{A1111_NAME}.pt", write_as_a1111, A1111_NAME),
    ],
    ids=["diffusers-safetensors", "diffusers-bin", "a1111-pt"],
)
@torch.no_grad()
def test_files_written_by_diffusers_and_a1111_load_in_ours_and_in_diffusers(model, pipe, tmp_path, file_name, write,
                                                                           trigger):
    """Loaded as they are, and prompted with their own word (several tokens of CLIP's vocabulary), they give our
    model the conditioning that diffusers computes."""
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(6))
    path = tmp_path / file_name
    write(path, vectors)

    loaded = load_embeddings(path, expected_dim=WIDTH)
    assert list(loaded.vectors) == [trigger]
    assert torch.equal(loaded.vectors[trigger], vectors)
    manager = EmbeddingManager(model.cond_stage_model)
    manager.load(path)
    prompt = f"a photo of {trigger}, in a box"
    ours = model.cond_stage_model.encode([manager.prompt_for_tokenizer(prompt)], embedding_manager=manager)

    pipe = pipeline_with_own_text_encoder(pipe)
    pipe.load_textual_inversion(str(path))
    token_ids = pipe.tokenizer.convert_tokens_to_ids([trigger, f"{trigger}_1"])
    assert token_ids == [49408, 49409]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_ids], vectors)
    theirs, _ = pipe.encode_prompt(prompt, pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert relative_error(ours, theirs) < 1e-5
