"""The diffusion UNet: attention numerics, faithfulness to diffusers' converted SD v1 UNet, real gradient
checkpointing with frozen weights, and the parameter count / key names of the released configs."""
import math

import numpy as np
import pytest
import torch

from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.openaimodel import (
    AttentionBlock,
    UNetModel,
    attention_head_layout,
    qkv_attention,
)
from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding
from ldm.util import count_params

SD_V1_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=True,
    legacy=False,
)

# Tiny UNets with the SD v1 layout: cross-attention on all levels but the last.
TINY_SD_LIKE = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 1],
    num_res_blocks=2,
    channel_mult=[1, 1, 2],
    num_heads=2,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    legacy=False,
)
TINY_LDM_LIKE = dict(TINY_SD_LIKE, num_res_blocks=1, num_heads=4, transformer_depth=2, context_dim=48)


def explicit_attention(q, k, v, scale):
    weights = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * scale, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def randomize(module, seed=0):
    """Overwrite every parameter, the zero-initialised output convs included, so no branch hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


def test_cross_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=32, context_dim=24, heads=4, dim_head=8).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], 4, 8).transpose(1, 2)
    q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
    heads = explicit_attention(q, k, v, scale=8 ** -0.5)
    expected = attn.to_out(heads.transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x, context), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("legacy_order", [True, False])
def test_qkv_attention_matches_explicit_softmax_in_both_channel_orders(legacy_order):
    torch.manual_seed(0)
    batch, heads, ch, length = 2, 3, 8, 5
    q, k, v = (torch.randn(batch, heads, ch, length) for _ in range(3))
    stacked = torch.stack([q, k, v], dim=2 if legacy_order else 1)
    qkv = stacked.reshape(batch, 3 * heads * ch, length)
    expected = explicit_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), ch ** -0.5)
    expected = expected.transpose(-1, -2).reshape(batch, heads * ch, length)
    torch.testing.assert_close(qkv_attention(qkv, heads, legacy_order), expected, rtol=1e-5, atol=1e-6)


def test_head_layout_follows_the_original_rules():
    assert attention_head_layout(640, 8, -1, legacy=False, use_spatial_transformer=True) == (8, 80)
    assert attention_head_layout(640, 8, 64, legacy=False, use_spatial_transformer=True) == (10, 64)
    assert attention_head_layout(640, 8, 64, legacy=True, use_spatial_transformer=True) == (10, 64)
    assert attention_head_layout(640, 8, -1, legacy=True, use_spatial_transformer=False) == (8, -1)
    unet = UNetModel(8, 3, 64, 3, 1, [2], channel_mult=[1, 2], num_head_channels=32, num_heads_upsample=1)
    blocks = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    assert [b.num_heads for b in blocks] == [4, 4, 4, 4]


def test_timestep_embedding_is_cosines_then_sines():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 6, max_period=100)
    freqs = 100.0 ** (-np.arange(3) / 3)
    expected = np.concatenate([np.cos(3.0 * freqs), np.sin(3.0 * freqs)])
    np.testing.assert_allclose(emb[1].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(emb[0].numpy(), [1, 1, 1, 0, 0, 0])
    assert timestep_embedding(t, 7).shape == (2, 7)


def test_linear_beta_schedule_is_linear_in_sqrt_beta():
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000), rtol=1e-14)
    cosine = make_beta_schedule("cosine", 1000)
    assert 0 < cosine.min() and cosine.max() <= 0.999
    with pytest.raises(ValueError, match="unknown"):
        make_beta_schedule("quadratic", 10)


def to_diffusers(unet, unet_params, latent_size):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=latent_size * 8)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


@pytest.mark.filterwarnings("ignore:`image_size` is deprecated:FutureWarning")
@pytest.mark.parametrize("unet_params", [TINY_SD_LIKE, TINY_LDM_LIKE], ids=["sd-v1-like", "ldm-text2img-like"])
def test_unet_matches_diffusers_conversion(unet_params):
    unet = randomize(UNetModel(**unet_params)).eval()
    reference = to_diffusers(unet, unet_params, latent_size=8)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 871])
    context = torch.randn(2, 5, unet_params["context_dim"])
    with torch.no_grad():
        ours = unet(x, t, context=context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    assert ours.abs().max() > 1e-2
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_gradient_checkpointing_with_frozen_weights_gives_same_output_and_context_grad():
    results = {}
    for use_checkpoint in (False, True):
        unet = randomize(UNetModel(**dict(TINY_SD_LIKE, use_checkpoint=use_checkpoint)))
        unet.requires_grad_(False)
        torch.manual_seed(2)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        context = torch.randn(1, 5, 32).requires_grad_(True)
        cross_attn_calls = count_calls(unet.input_blocks[1][1].transformer_blocks[0].attn2)
        res_block_calls = count_calls(unet.input_blocks[2][0].in_layers)
        out = unet(x, t, context=context)
        out.square().mean().backward()
        results[use_checkpoint] = (out.detach(), context.grad, len(cross_attn_calls), len(res_block_calls))
    out_plain, grad_plain, attn_plain, res_plain = results[False]
    out_ckpt, grad_ckpt, attn_ckpt, res_ckpt = results[True]
    assert grad_plain.abs().max() > 0
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad_ckpt, grad_plain, rtol=1e-5, atol=1e-7)
    assert (attn_plain, res_plain) == (1, 1)
    assert (attn_ckpt, res_ckpt) == (2, 2), "checkpointed blocks must be recomputed in the backward pass"


def test_class_conditional_unet_without_transformer_checkpoints_consistently():
    params = dict(
        image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=[2],
        channel_mult=[1, 2], num_classes=5, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
        use_new_attention_order=True,
    )
    grads, outputs = [], []
    for use_checkpoint in (False, True):
        unet = randomize(UNetModel(**params, use_checkpoint=use_checkpoint))
        torch.manual_seed(3)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        out = unet(x, torch.tensor([10, 20]), y=torch.tensor([1, 4]))
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(unet.middle_block[1].qkv.weight.grad)
    assert outputs[0].shape == (2, 3, 8, 8)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        unet(x, torch.tensor([10, 20]))


@pytest.mark.parametrize("context_dim, millions", [(768, 859.52), (1280, 872.30)])
def test_released_configs_have_the_original_size_and_keys(context_dim, millions):
    with torch.device("meta"):
        unet = UNetModel(**dict(SD_V1_UNET, context_dim=context_dim))
    n_params = count_params(unet)
    assert round(n_params / 1e6, 2) == millions
    if context_dim == 768:
        assert n_params == 859_520_964
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(shapes) == 686
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, context_dim)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"] == (320, 320)
    assert shapes["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
    assert shapes["input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"] == (320, 1280)
    assert shapes["input_blocks.1.1.norm.weight"] == (320,)
    assert shapes["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes["middle_block.1.proj_out.weight"] == (1280, 1280, 1, 1)
    assert shapes["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.bias"] == (320,)
    assert shapes["time_embed.2.weight"] == (1280, 1280)
    assert shapes["out.2.weight"] == (4, 320, 3, 3)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in shapes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embed=16), "n_embed"),
        (dict(context_dim=None), "context_dim"),
        (dict(num_heads=-1), "num_heads"),
        (dict(dims=3), "dims must be 2"),
        (dict(dims=1), "dims must be 2"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**dict(TINY_SD_LIKE, **overrides))


@pytest.mark.parametrize("recompute_feedforward", [False, True])
def test_training_passes_run_on_the_meta_device_where_flops_are_counted(recompute_feedforward):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNetModel(**dict(TINY_SD_LIKE, recompute_feedforward=recompute_feedforward)).requires_grad_(False)
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
        context = torch.randn(2, 77, TINY_SD_LIKE["context_dim"], requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, context=context).sum().backward()
    assert context.grad.shape == context.shape and counter.get_total_flops() > 0
