"""First-stage autoencoders: faithfulness to diffusers' SD VAE, attention, posterior, VQ and the SD v1 layout."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.models.autoencoder import (
    AutoencoderKL,
    IdentityFirstStage,
    VQModel,
    VQModelInterface,
)
from ldm.modules.diffusionmodules.model import AttnBlock, Encoder
from ldm.modules.distributions.distributions import (
    DiagonalGaussianDistribution,
    normal_kl,
)
from ldm.util import count_params

IDENTITY_LOSS = {"target": "torch.nn.Identity"}
TINY_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}
SD_V1_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def randomize_(module, seed=0):
    """Overwrite every parameter with seeded noise, so that no default initialisation can hide a wrong wiring."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            scale = 1.0 / math.sqrt(parameter[0].numel()) if parameter.ndim > 1 else 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def max_relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.filterwarnings("ignore:.*image_size.*:FutureWarning")
def test_kl_autoencoder_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    ours = randomize_(AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4)).eval()
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    original_config = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {
        "params": {"embed_dim": 4, "ddconfig": TINY_DDCONFIG}}}}}
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint, image_size=32)
    reference = diffusers.AutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)

    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        posterior = ours.encode(image)
        expected = reference.encode(image).latent_dist
        latent = posterior.mode()
        decoded, expected_decoded = ours.decode(latent), reference.decode(latent).sample

    assert posterior.mean.shape == (2, 4, 16, 16)
    assert max_relative_error(posterior.mean, expected.mean) < 1e-4
    assert max_relative_error(posterior.logvar, expected.logvar) < 1e-4
    assert decoded.shape == (2, 3, 32, 32)
    assert max_relative_error(decoded, expected_decoded) < 1e-4


def test_attention_block_equals_explicit_softmax():
    block = randomize_(AttnBlock(32), seed=2).eval()
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (proj(h).flatten(2) for proj in (block.q, block.k, block.v))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
        attended = torch.einsum("bcj,bij->bci", v, weights).reshape(x.shape)
        expected = x + block.proj_out(attended)
        actual = block(x)
    assert max_relative_error(actual, expected) < 1e-5


def test_attention_block_gives_sdpa_what_its_fused_kernels_take(monkeypatch):
    """4-D (batch, heads, positions, channels) with contiguous channels; 3-D or strided inputs send CUDA to the
    math kernel, which keeps the (H*W)^2 scores in float32."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v):
        seen.extend((t.dim(), t.stride(-1)) for t in (q, k, v))
        return sdpa(q, k, v)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    AttnBlock(32)(torch.randn(2, 32, 5, 7))
    assert seen == [(4, 1)] * 3


def test_level_attention_is_built_where_asked_and_applied():
    ddconfig = dict(TINY_DDCONFIG, attn_resolutions=[16])
    model = randomize_(AutoencoderKL(ddconfig, IDENTITY_LOSS, embed_dim=4), seed=12).eval()
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert "decoder.up.1.attn.1.proj_out.weight" in keys and "decoder.up.0.attn.0.q.weight" not in keys

    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        with_attention = model(image, sample_posterior=False)[0]
        for name, parameter in model.named_parameters():
            if ".attn.0.proj_out." in name:
                parameter.zero_()
        without_level_attention = model(image, sample_posterior=False)[0]
    assert not torch.allclose(with_attention, without_level_attention)


def test_only_vanilla_attention_is_built():
    with pytest.raises(ValueError, match="attn_type 'linear'"):
        Encoder(**TINY_DDCONFIG, use_linear_attn=True)
    with pytest.raises(ValueError, match="attn_type 'none'"):
        Encoder(**TINY_DDCONFIG, attn_type="none")


def gaussian_parameters(mean, logvar, shape=(2, 3, 64, 64)):
    """Encoder-style moments: constant per-channel mean and log-variance stacked on dim 1."""
    means = torch.tensor(mean).view(1, -1, 1, 1).expand(shape)
    logvars = torch.tensor(logvar).view(1, -1, 1, 1).expand(shape)
    return torch.cat([means, logvars], dim=1)


def test_posterior_sampling_is_seeded_and_has_the_right_moments():
    posterior = DiagonalGaussianDistribution(gaussian_parameters([0.5, -1.0, 2.0], [0.0, -2.0, 1.0]))
    first = posterior.sample(generator=torch.Generator().manual_seed(7))
    again = posterior.sample(generator=torch.Generator().manual_seed(7))
    other = posterior.sample(generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)

    sample_mean = first.mean(dim=(0, 2, 3))
    sample_std = first.std(dim=(0, 2, 3))
    torch.testing.assert_close(sample_mean, torch.tensor([0.5, -1.0, 2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(sample_std, torch.tensor([1.0, math.exp(-1.0), math.exp(0.5)]), atol=0, rtol=0.03)
    assert torch.equal(posterior.mode(), posterior.mean)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_posterior_clamps_logvar_and_deterministic_collapses_to_mean():
    posterior = DiagonalGaussianDistribution(gaussian_parameters([0.0, 0.0, 0.0], [100.0, -100.0, 3.0]))
    assert posterior.logvar[:, 0].unique().tolist() == [20.0]
    assert posterior.logvar[:, 1].unique().tolist() == [-30.0]
    assert posterior.logvar[:, 2].unique().tolist() == [3.0]

    deterministic = DiagonalGaussianDistribution(gaussian_parameters([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]), True)
    assert torch.equal(deterministic.sample(), deterministic.mean)
    assert deterministic.kl().tolist() == [0.0]


def test_posterior_kl_and_nll_match_torch_distributions():
    generator = torch.Generator().manual_seed(4)
    p = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3, generator=generator))
    q = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3, generator=generator))
    torch_p = torch.distributions.Normal(p.mean, p.std)
    torch_q = torch.distributions.Normal(q.mean, q.std)
    standard = torch.distributions.Normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))

    torch.testing.assert_close(p.kl(), torch.distributions.kl_divergence(torch_p, standard).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(q), torch.distributions.kl_divergence(torch_p, torch_q).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(q), normal_kl(p.mean, p.logvar, q.mean, q.logvar).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(), normal_kl(p.mean, p.logvar, 0.0, 0.0).sum(dim=(1, 2, 3)))
    x = q.mean
    torch.testing.assert_close(p.nll(x), -torch_p.log_prob(x).sum(dim=(1, 2, 3)))


def tiny_vq(cls, seed=5):
    ddconfig = dict(TINY_DDCONFIG, double_z=False)
    model = randomize_(cls(ddconfig, IDENTITY_LOSS, n_embed=16, embed_dim=3, sane_index_shape=True), seed=seed)
    return model.eval()


def test_vq_model_quantises_onto_the_codebook():
    model = tiny_vq(VQModel)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        h = model.quant_conv(model.encoder(image))
        quant, emb_loss, (_, _, indices) = model.encode(image)
        reconstruction, diff = model(image)

    codebook = model.quantize.embedding.weight
    assert indices.shape == (2, 16, 16)
    assert len(indices.unique()) > 1
    torch.testing.assert_close(quant, codebook[indices].permute(0, 3, 1, 2), atol=1e-6, rtol=0)
    nearest = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 3), codebook).argmin(dim=1)
    assert torch.equal(indices.flatten(), nearest)
    torch.testing.assert_close(emb_loss, 1.25 * F.mse_loss(quant, h))
    torch.testing.assert_close(diff, emb_loss)
    torch.testing.assert_close(reconstruction, model.decode(quant))
    assert reconstruction.shape == image.shape


def test_vq_interface_quantises_when_decoding():
    plain = tiny_vq(VQModel)
    interface = tiny_vq(VQModelInterface, seed=99)
    interface.load_state_dict(plain.state_dict(), strict=True)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        h = interface.encode(image)
        quant = interface.quantize(h)[0]
        decoded = interface.decode(h)
        unquantised = interface.decode(h, force_not_quantize=True)
        torch.testing.assert_close(h, plain.quant_conv(plain.encoder(image)))
        torch.testing.assert_close(decoded, plain.decode(quant))
        torch.testing.assert_close(unquantised, plain.decode(h))
        torch.testing.assert_close(interface(image)[0], plain(image)[0])
    assert not torch.allclose(decoded, unquantised)


def test_identity_first_stage_passes_through():
    x = torch.randn(1, 3, 8, 8)
    stage = IdentityFirstStage(vq_interface=True)
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x
    assert stage.quantize(x)[0] is x
    assert IdentityFirstStage().quantize(x) is x


def test_ckpt_path_restores_weights(tmp_path):
    source = randomize_(AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4), seed=11)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    restored = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ckpt_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_sd_v1_layout_on_meta_device():
    with torch.device("meta"):
        model = AutoencoderKL(SD_V1_DDCONFIG, IDENTITY_LOSS, embed_dim=4)
    assert count_params(model) == 83_653_863
    assert round(count_params(model) / 1e6, 2) == 83.65
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 248
    assert shapes["encoder.down.0.block.0.conv1.weight"] == (128, 128, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.1.downsample.conv.weight"] == (256, 256, 3, 3)
    assert shapes["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes
