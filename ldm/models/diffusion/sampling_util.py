"""What the DDIM and PLMS samplers share: the timestep subsequence, its coefficients, the DDIM update,
classifier-free guidance and the sampling loop.

Both samplers walk a subsequence of the model's training timesteps and move between them with the DDIM update;
they differ only in which eps they feed that update (PLMS extrapolates from earlier steps). Schedules are computed
in float64 on the CPU (some accelerators lack float64) and kept as float32 on the model's device.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = False) -> np.ndarray:
    """Pick the training timesteps a `num_ddim_timesteps`-step sampler visits, ascending.

    "uniform" is `range(0, T, T // S) + 1` as in the original, so when S does not divide T it yields a few more
    than S steps (S=30 gives 31); keeping that reproduces the original's images step for step. A step that
    would land past the last timestep (S=3 gives 1000) is dropped, where the original crashed.
    "quad" spaces the steps quadratically over the first 80% of the timesteps.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim_num_steps must be between 1 and {num_ddpm_timesteps}, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        if num_ddim_timesteps > num_ddpm_timesteps // 2:
            raise ValueError(f"ddim_num_steps={num_ddim_timesteps} is more than uniform spacing allows; use at most {num_ddpm_timesteps // 2} steps")
        step = num_ddpm_timesteps // num_ddim_timesteps
        timesteps = np.arange(0, num_ddpm_timesteps, step)
    elif ddim_discr_method == "quad":
        timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"ddim_discretize must be 'uniform' or 'quad', got '{ddim_discr_method}'")
    timesteps = timesteps + 1
    timesteps = timesteps[timesteps < num_ddpm_timesteps]
    if verbose:
        print(f"Selected timesteps for the DDIM sampler: {timesteps.tolist()}")
    return timesteps


def make_ddim_sampling_parameters(alphacums: torch.Tensor, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = False):
    """Return (sigmas, alphas, alphas_prev) for the DDIM steps, in the dtype and on the device of `alphacums`.

    alphas_prev[i] is the cumulative alpha of the step taken after step i; after the last step (i=0) that is
    alphas_cumprod[0], not 1, matching the original and diffusers' `set_alpha_to_one=False`.
    """
    index = torch.as_tensor(ddim_timesteps, dtype=torch.long, device=alphacums.device)
    alphas = alphacums[index]
    alphas_prev = torch.cat([alphacums[:1], alphacums[index[:-1]]])
    # Noise scale of each step: eta=0 is the deterministic DDIM ODE, eta=1 the DDPM posterior variance.
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for the DDIM sampler: a_t {alphas.tolist()}; a_(t-1) {alphas_prev.tolist()}")
        print(f"With eta {eta} the sigmas are {sigmas.tolist()}")
    return sigmas, alphas, alphas_prev


@dataclass(frozen=True)
class StepSchedule:
    """The timesteps a sampler visits (ascending) and the float32 coefficients of each step, on one device."""

    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    eta: float

    @classmethod
    def build(cls, timesteps: np.ndarray, sigmas: torch.Tensor, alphas: torch.Tensor, alphas_prev: torch.Tensor,
              eta: float, device: torch.device) -> "StepSchedule":
        """Store coefficients computed in any precision as float32 on `device`."""
        as_buffer = lambda values: values.to(device=device, dtype=torch.float32)
        return cls(timesteps, as_buffer(alphas), as_buffer(alphas_prev), as_buffer(sigmas), float(eta))


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, cond, unconditional_guidance_scale: float = 1.,
               unconditional_conditioning=None) -> torch.Tensor:
    """The model's eps, with classifier-free guidance eps_u + s * (eps_c - eps_u) when a uc is given and s != 1.

    The unconditional and conditional halves go through the model as one doubled batch: one call per step.
    """
    if unconditional_conditioning is None or unconditional_guidance_scale == 1.:
        return model.apply_model(x, t, cond)
    eps_uncond, eps_cond = model.apply_model(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([unconditional_conditioning, cond])).chunk(2)
    return eps_uncond + unconditional_guidance_scale * (eps_cond - eps_uncond)


def ddim_update(schedule: StepSchedule, x: torch.Tensor, eps: torch.Tensor, index: int, temperature: float = 1.,
                generator: torch.Generator | None = None):
    """Move x from step `index` to the next step of `schedule`; returns (x_prev, pred_x0)."""
    a_t, a_prev, sigma = schedule.alphas[index], schedule.alphas_prev[index], schedule.sigmas[index]
    pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    if schedule.eta != 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = x_prev + sigma * temperature * noise
    return x_prev, pred_x0


class StepSampler(ABC):
    """Base of DDIMSampler and PLMSSampler: the schedule, `sample`, and the loop over the steps.

    Subclasses define `_step`, which turns x at one step into x at the next.
    """

    progress_label = "Sampling"

    def __init__(self, model):
        if model.parameterization != "eps":
            raise ValueError(f"{type(self).__name__} needs a model that predicts eps (parameterization: eps), "
                             f"got parameterization '{model.parameterization}'")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.ddim_schedule: StepSchedule | None = None

    @property
    def ddim_timesteps(self) -> np.ndarray:
        return self._require_schedule().timesteps

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = False) -> None:
        """Choose the steps and their coefficients for `sample`, `stochastic_encode` and `decode`."""
        alphas_cumprod = self.model.alphas_cumprod.detach().cpu().double()  # cast on the CPU: MPS has no float64
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"model.alphas_cumprod has {alphas_cumprod.shape[0]} entries but the model has "
                             f"{self.ddpm_num_timesteps} timesteps")
        timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose=verbose)
        self.ddim_schedule = StepSchedule.build(
            timesteps, *make_ddim_sampling_parameters(alphas_cumprod, timesteps, ddim_eta, verbose=verbose),
            ddim_eta, self.model.device)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, callback=None, eta: float = 0.,
               temperature: float = 1., x_T: torch.Tensor | None = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1., unconditional_conditioning=None, verbose: bool = False,
               generator: torch.Generator | None = None, progress: bool = False):
        """Draw `batch_size` samples of `shape` (C, H, W) in S steps; returns (samples, intermediates).

        intermediates holds "x_inter" and "pred_x0": the start, every `log_every_t`-th step and the last step.
        `callback(i)` runs after step i. Start noise and eta noise come from `generator` (on the model's device);
        `temperature` scales the eta noise.
        """
        size = (batch_size, *shape)
        if torch.is_tensor(conditioning) and conditioning.shape[0] != batch_size:
            raise ValueError(f"conditioning has batch size {conditioning.shape[0]} but batch_size is {batch_size}")
        if x_T is not None and tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but batch_size and shape ask for {size}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        if verbose:
            print(f"Data shape for {type(self).__name__} is {size}, eta {eta}")
        x = x_T if x_T is not None else torch.randn(size, generator=generator, device=self.model.device)
        schedule = self.ddim_schedule
        return self._denoise(x, conditioning, schedule, len(schedule.timesteps), callback=callback,
                             temperature=temperature, log_every_t=log_every_t,
                             unconditional_guidance_scale=unconditional_guidance_scale,
                             unconditional_conditioning=unconditional_conditioning, generator=generator,
                             progress=progress)

    def _require_schedule(self) -> StepSchedule:
        if self.ddim_schedule is None:
            raise RuntimeError(f"{type(self).__name__} has no schedule yet: call make_schedule(ddim_num_steps) first")
        return self.ddim_schedule

    def _denoise(self, x, cond, schedule: StepSchedule, num_steps: int, *, callback=None, temperature=1.,
                 log_every_t=None, unconditional_guidance_scale=1., unconditional_conditioning=None,
                 generator=None, progress=False):
        """Run steps num_steps-1 .. 0 of `schedule` from x; returns (x, intermediates)."""
        batch = x.shape[0]

        def predict_eps(x_t, index):
            t = torch.full((batch,), int(schedule.timesteps[index]), device=x_t.device, dtype=torch.long)
            return guided_eps(self.model, x_t, t, cond, unconditional_guidance_scale, unconditional_conditioning)

        def update(x_t, eps, index):
            return ddim_update(schedule, x_t, eps, index, temperature, generator)

        intermediates = {"x_inter": [x], "pred_x0": [x]}
        eps_history = []
        steps = range(num_steps - 1, -1, -1)
        for i, index in enumerate(tqdm(steps, desc=self.progress_label, disable=not progress)):
            x, pred_x0 = self._step(x, index, predict_eps, update, eps_history)
            if callback is not None:
                callback(i)
            if log_every_t and (index % log_every_t == 0 or index == num_steps - 1):
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

    @abstractmethod
    def _step(self, x, index, predict_eps, update, eps_history):
        """Return (x at the next step, pred_x0) from x at step `index`.

        predict_eps(x, index) gives the (guided) eps at a step, update(x, eps, index) applies the DDIM update,
        and eps_history holds this run's earlier eps, newest last, for the subclass to append to.
        """
