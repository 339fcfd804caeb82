"""First-stage autoencoders that map images to the latent space the diffusion model works in.

They are plain `nn.Module`s rather than the original LightningModules because they are always frozen here;
constructor arguments, attribute names and state-dict keys match CompVis latent-diffusion / stable-diffusion v1,
so original configs build them and `first_stage_model.*` weights load key for key. Arguments that only served
training (`image_key`, `monitor`) are accepted so that those configs keep working.
"""
import torch
import torch.nn as nn
from taming.modules.vqvae.quantize import VectorQuantizer2

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def _restore(model, ckpt_path, ignore_keys):
    # Imported lazily: building a model from a config must not depend on the checkpoint-loading code.
    from ldm.checkpoint import restore

    restore(model, ckpt_path, ignore_keys=ignore_keys)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (SD v1's VAE): `encode` gives a Gaussian posterior, `decode` an image."""

    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder must output mean and logvar)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if ckpt_path is not None:
            _restore(self, ckpt_path, ignore_keys)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(nn.Module):
    """Vector-quantised autoencoder (LDM's VQ-f4/f8 first stages) built on taming's `VectorQuantizer2`."""

    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, remap=None, sane_index_shape=False):
        super().__init__()
        self.image_key = image_key
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap,
                                         sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if ckpt_path is not None:
            _restore(self, ckpt_path, ignore_keys)

    def encode(self, x):
        """Returns `(quant, emb_loss, (perplexity, min_encodings, indices))` as taming's quantiser does."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input):
        """Reconstruction and codebook loss; written against the layers so that `VQModelInterface` shares it."""
        quant, diff, _ = self.quantize(self.quant_conv(self.encoder(input)))
        return self.decoder(self.post_quant_conv(quant)), diff


class VQModelInterface(VQModel):
    """VQModel as latent diffusion uses it: latents are pre-quantisation, quantised only when decoded."""

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize=False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return super().decode(quant)


class IdentityFirstStage(nn.Module):
    """No-op first stage for pixel-space diffusion; `vq_interface` makes `quantize` return taming's tuple."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x, *args, **kwargs):
        return x
