"""The shipped full-size configs build the released architectures (on the meta device, so at no cost)."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import check_config_tree, count_params, instantiate_from_config
from tests.conftest import REPO


def build_on_meta(relative_path):
    config = OmegaConf.load(os.path.join(REPO, relative_path))
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def millions(module):
    return round(count_params(module) / 1e6, 2)


def test_sd_v1_inference_config_matches_the_release():
    model = build_on_meta("configs/stable-diffusion/v1-inference.yaml")
    assert millions(model.model) == 859.52
    assert millions(model.first_stage_model) == 83.65
    assert millions(model.cond_stage_model) == 123.06
    state = model.state_dict()
    expected_shapes = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "alphas_cumprod": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes <= {"model", "first_stage_model", "cond_stage_model", "embedding_manager"} | {
        k for k in state if "." not in k
    }


@pytest.mark.parametrize("config", ["configs/latent-diffusion/txt2img-1p4B-eval.yaml", "configs/latent-diffusion/txt2img-1p4B-finetune.yaml"])
def test_ldm_text2img_large_configs_match_the_release(config):
    model = build_on_meta(config)
    assert millions(model.model) == 872.30
    assert millions(model.first_stage_model) == 83.65
    state = model.state_dict()
    assert tuple(state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 1280)
    assert tuple(state["cond_stage_model.transformer.token_emb.weight"].shape) == (30522, 1280)
    assert tuple(state["cond_stage_model.transformer.attn_layers.layers.63.1.net.2.weight"].shape) == (1280, 5120)


def test_every_shipped_config_parses_and_names_importable_targets():
    from ldm.util import get_obj_from_str

    for folder, _, files in os.walk(os.path.join(REPO, "configs")):
        for name in files:
            if not name.endswith(".yaml"):
                continue
            config = OmegaConf.to_container(OmegaConf.load(os.path.join(folder, name)))
            check_config_tree(config)  # no key the code does not know, bar the original's unused ones
            stack = [config]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if "target" in node:
                        assert get_obj_from_str(node["target"]) is not None, (name, node["target"])
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)


@pytest.mark.parametrize("path, key, message", [
    ("model.params.personalization_config.params", "num_vectors_per_tokens",
     "'model.params.personalization_config.params.num_vectors_per_tokens' is not a setting of EmbeddingManager "
     ".*did you mean 'num_vectors_per_token'"),
    ("model.params", "cache_latent", "'model.params.cache_latent' .*did you mean 'cache_latents'"),
    ("model.params.unet_config.params", "use_checkpiont", "did you mean 'use_checkpoint'"),
    ("model.params.unet_config.params", "sparkle", "'model.params.unet_config.params.sparkle' is not a setting of "
                                                   "UNetModel .*; it takes .*use_checkpoint"),
    ("data.params.validation.params", "repeatz", "'data.params.validation.params.repeatz' .*did you mean 'repeats'"),
    ("data.params", "batchsize", "did you mean 'batch_size'"),
])
def test_a_misspelt_config_key_is_named_with_the_key_meant(path, key, message):
    """A typo in a class that takes other keys (EmbeddingManager, LatentDiffusion, the data module) used to warn
    and train with the default; in the others it was a TypeError traceback."""
    config = OmegaConf.load(os.path.join(REPO, "configs", "tiny", "sd-tiny-finetune.yaml"))
    OmegaConf.update(config, f"{path}.{key}", 4)
    with pytest.raises(ValueError, match=message):
        check_config_tree(config)


COMPVIS_SCHEDULER = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",  # a module this project does not have
                     "params": {"warm_up_steps": [10000], "cycle_lengths": [10000000000000], "f_start": [1.e-6],
                                "f_max": [1.], "f_min": [1.]}}


@pytest.mark.parametrize("key, value", [("scheduler_config", COMPVIS_SCHEDULER), ("reset_ema", True),
                                        ("load_only_unet", True), ("lr_scheduler", True), ("make_it_fit", True)])
def test_keys_of_other_repositories_configs_are_let_through(key, value):
    """CompVis's own v1-inference.yaml has scheduler_config, later configs other keys this code does not use:
    LatentDiffusion warns about them (they are not near-misses of its own keys) and builds, and what they hold is
    not looked into (nothing builds it)."""
    config = OmegaConf.load(os.path.join(REPO, "configs", "stable-diffusion", "v1-inference.yaml"))
    config.model.params[key] = value
    check_config_tree(config)


@pytest.mark.parametrize("width, configs", [(768, "configs/stable-diffusion/"), (32, "configs/tiny/"),
                                            (128, "configs/toy/"), (1024, "the matching model family")])
def test_a_checkpoint_of_another_width_names_the_configs_that_fit_it(width, configs):
    from ldm.checkpoint import _context_width_hint

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    message = _context_width_hint([(key, (320, width), (320, 1280))], "model.ckpt")
    assert message.startswith(f"'model.ckpt' is a {width}-wide") and f"use a config from {configs}" in message
