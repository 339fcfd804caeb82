"""DDIM sampling (Song et al. 2021) for eps-predicting diffusion models, plus the encode/decode pair img2img uses."""
import torch

from ldm.models.diffusion.sampling_util import StepSampler


class DDIMSampler(StepSampler):
    """Denoises with the DDIM update on a subsequence of the training timesteps; eta > 0 adds fresh noise."""

    progress_label = "DDIM Sampler"

    def _step(self, x, index, predict_eps, update, eps_history):
        return update(x, predict_eps(x, index), index)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, *, noise: torch.Tensor | None = None,
                          generator: torch.Generator | None = None):
        """Noise x0 to step `t` in one jump: sqrt(a) * x0 + sqrt(1 - a) * noise.

        `t` (B,) indexes the steps of the last `make_schedule`, so img2img can start `decode` partway through the
        same schedule.
        """
        alphas = self._require_schedule().alphas[t.to(self.model.device)]
        alphas = alphas.reshape(-1, *[1] * (x0.ndim - 1))
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond, t_start: int, unconditional_guidance_scale: float = 1.,
               unconditional_conditioning=None, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """Denoise x_latent from step t_start - 1 down to step 0 of the last `make_schedule`.

        t_start=0 returns x_latent unchanged; t_start equal to the number of steps is a full `sample` from x_latent.
        Uses the eta given to `make_schedule`, with noise from `generator`.
        """
        schedule = self._require_schedule()
        if not 0 <= t_start <= len(schedule.timesteps):
            raise ValueError(f"t_start must be between 0 and {len(schedule.timesteps)} (the number of steps), "
                             f"got {t_start}")
        x, _ = self._denoise(x_latent, cond, schedule, t_start,
                             unconditional_guidance_scale=unconditional_guidance_scale,
                             unconditional_conditioning=unconditional_conditioning, generator=generator,
                             progress=progress)
        return x
