"""Training loss of the KL autoencoder: pixel reconstruction plus a small KL pull towards N(0, I).

LDM trained its autoencoders with LPIPS and a patch discriminator on top of this; the toy world's flat shapes
are reconstructed well by the pixel terms alone, so neither is built (no perceptual net to download, no second
optimizer). Both terms are summed per image and averaged over the batch, LDM's reduction, so `kl_weight` keeps
the meaning it has in LDM configs (1e-6 there).
"""
import torch
from torch import nn


class ReconstructionKLLoss(nn.Module):
    """`sum |x - x_rec| + mse_weight * sum (x - x_rec)^2 + kl_weight * KL(q(z|x) || N(0, I))`, per image."""

    def __init__(self, kl_weight: float = 1.0e-6, mse_weight: float = 0.0):
        super().__init__()
        self.kl_weight = kl_weight
        self.mse_weight = mse_weight

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior, split: str = "train"):
        """Returns the loss and a dict of logged values (`<split>/total_loss`, `rec_loss` per pixel, `kl_loss`)."""
        error = inputs.float() - reconstructions.float()
        per_pixel = error.abs() + self.mse_weight * error.pow(2)
        batch = inputs.shape[0]
        rec_loss = per_pixel.sum() / batch
        kl_loss = posterior.kl().sum() / batch
        loss = rec_loss + self.kl_weight * kl_loss
        logs = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/rec_loss": per_pixel.detach().mean(),
            f"{split}/kl_loss": kl_loss.detach(),
        }
        return loss, logs
