"""Diagonal Gaussian posterior of the KL autoencoder, and the closed-form KL between two Gaussians."""
import math

import torch


class DiagonalGaussianDistribution:
    """Gaussian with per-element mean and variance, read from the encoder's `2 * C` output channels.

    The log-variance is clamped to [-30, 20] as in the original so that `exp` stays finite for any weights.
    With `deterministic=True` the distribution collapses onto its mean (zero variance, zero KL and NLL).
    """

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """Reparameterised draw; pass a seeded `torch.Generator` for a reproducible one.

        The noise is drawn on the generator's device and then moved, so a CPU generator also reproduces
        the same draw for a model on an accelerator.
        """
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self):
        return self.mean

    def kl(self, other=None):
        """KL(self || other) summed over C, H, W; `other=None` means the standard normal."""
        if self.deterministic:
            return self.mean.new_zeros(1)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample, dims=(1, 2, 3)):
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return self.mean.new_zeros(1)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); scalars broadcast against tensors."""
    reference = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl needs at least one torch.Tensor argument")
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(reference) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2)
    )
