"""First-stage autoencoders that map images to the latent space the diffusion model works in.

Constructor arguments, attribute names and state-dict keys match CompVis latent-diffusion / stable-diffusion v1,
so original configs build them and `first_stage_model.*` weights load key for key. `AutoencoderKL` is a
LightningModule, as in LDM, so that `main.py` can pretrain one (the toy model's first stage); inside
LatentDiffusion it is only ever used frozen. The VQ models are plain modules: nothing here trains them, and
arguments that only served their training (`monitor`) are accepted so that those configs keep working.
"""
import pytorch_lightning as pl
import torch
import torch.nn as nn
from taming.modules.vqvae.quantize import VectorQuantizer2

from ldm.checkpoint import restore
from ldm.images import channels_first
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.random_streams import BatchPositions, batches_per_step, step_generator
from ldm.util import instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    """KL-regularised autoencoder (SD v1's VAE): `encode` gives a Gaussian posterior, `decode` an image.

    Trained by `lossconfig` (e.g. `ldm.modules.losses.ReconstructionKLLoss`) with Adam at `learning_rate`,
    which main.py sets; its posterior noise is a pure function of (seed, step) so that resumed runs repeat.
    """

    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, seed=23):
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
        self.monitor = monitor
        self.seed = seed
        self.batch_positions = BatchPositions()
        self.learning_rate = 4.5e-6  # LDM's base rate; main.py replaces it with the scaled one
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if ckpt_path is not None:
            restore(self, ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True, generator=None):
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # --- training ---------------------------------------------------------------------------------
    def get_input(self, batch, key):
        return channels_first(batch[key])

    def training_step(self, batch, batch_idx):
        inputs = self.get_input(batch, self.image_key)
        position = self.batch_positions.next(self.global_step, batches_per_step(self))
        generator = step_generator(self.seed, position, self.device, self.global_rank)
        reconstructions, posterior = self(inputs, generator=generator)
        loss, logs = self.loss(inputs, reconstructions, posterior, split="train")
        self.log("aeloss", loss, prog_bar=True, logger=False, on_step=True)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        # A fixed stream per validation batch makes val/rec_loss comparable across the run.
        inputs = self.get_input(batch, self.image_key)
        generator = step_generator(self.seed + 1, batch_idx, self.device, self.global_rank)
        reconstructions, posterior = self(inputs, generator=generator)
        _, logs = self.loss(inputs, reconstructions, posterior, split="val")
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=inputs.shape[0])

    def configure_optimizers(self):
        # LDM's autoencoder optimizer, without the discriminator's second one.
        modules = (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv)
        return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=self.learning_rate, betas=(0.5, 0.9))

    @torch.no_grad()
    def log_images(self, batch, N=8, seed=0):
        """Inputs, their reconstructions (posterior mean) and decodings of N(0, I) latents."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        posterior = self.encode(x)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(posterior.mean.shape, generator=generator, device=self.device, dtype=posterior.mean.dtype)
        return {"inputs": x, "reconstructions": self.decode(posterior.mode()), "samples": self.decode(noise)}

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
            restore(self, ckpt_path, ignore_keys=ignore_keys)

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
