"""DDIM and PLMS samplers: agreement with diffusers' DDIMScheduler, seeded noise, classifier-free guidance in one
model call, PLMS accuracy on data whose exact eps is known, and the img2img encode/decode helpers."""
import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_util import make_ddim_timesteps

CHANNELS, SIZE, COND_TOKENS, COND_DIM = 4, 8, 3, 8
SHAPE = (CHANNELS, SIZE, SIZE)


class StubDiffusion(torch.nn.Module):
    """The interface the samplers use, with SD v1's noise schedule and a fixed random conv net as eps model.

    `calls` records the batch size of every apply_model call.
    """

    def __init__(self):
        super().__init__()
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32))
        self.register_buffer("alphas_cumprod", torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))
        self.num_timesteps = 1000
        self.parameterization = "eps"
        self.calls = []
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(CHANNELS, 16, 3, padding=1)
        self.cond_proj = torch.nn.Linear(COND_DIM, 16)
        self.conv_out = torch.nn.Conv2d(16, CHANNELS, 3, padding=1)

    @property
    def device(self):
        return self.betas.device

    def apply_model(self, x, t, cond):
        self.calls.append(x.shape[0])
        return self.eps(x, t, cond)

    def eps(self, x, t, cond):
        hidden = self.conv_in(x) + torch.sin(t.float() / 100)[:, None, None, None]
        if cond is not None:
            hidden = hidden + self.cond_proj(cond.mean(1))[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(hidden))


class GaussianDataDiffusion(StubDiffusion):
    """Data x0 ~ N(mu, s^2 I): x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I), so the exact eps is analytic."""

    def __init__(self, mu, std):
        super().__init__()
        self.mu, self.std = mu, std

    def eps(self, x, t, cond):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.std ** 2 + 1 - a)


def diffusers_ddim(num_steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(num_steps)
    return scheduler


def ddim_step_by_hand(model, x, eps, t, t_prev):
    """One deterministic DDIM step from timestep t to t_prev, straight from the paper's formula."""
    a, a_prev = model.alphas_cumprod[t], model.alphas_cumprod[t_prev]
    pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def make_cond(batch, seed):
    return torch.randn(batch, COND_TOKENS, COND_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model():
    return StubDiffusion()


@pytest.fixture
def x_T():
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_matches_diffusers(model, x_T, num_steps):
    scheduler = diffusers_ddim(num_steps)
    cond = make_cond(2, seed=2)
    expected = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model.eps(expected, torch.full((2,), int(t)), cond)
            expected = scheduler.step(eps, t, expected, eta=0.0).prev_sample
    sampler = DDIMSampler(model)
    samples, intermediates = sampler.sample(num_steps, 2, SHAPE, conditioning=cond, x_T=x_T)
    np.testing.assert_array_equal(sampler.ddim_timesteps[::-1], scheduler.timesteps.numpy())
    assert relative_error(samples, expected) < 1e-4
    assert len(model.calls) == num_steps
    assert torch.equal(intermediates["x_inter"][-1], samples) and torch.equal(intermediates["x_inter"][0], x_T)


def test_ddim_with_eta_matches_diffusers_given_the_same_noise(model):
    """Replays our generator's draws (start noise, then one per step) as diffusers' variance_noise."""
    eta, num_steps = 0.7, 10
    scheduler = diffusers_ddim(num_steps)
    replay = torch.Generator().manual_seed(5)
    expected = torch.randn(2, *SHAPE, generator=replay)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model.eps(expected, torch.full((2,), int(t)), None)
            noise = torch.randn(2, *SHAPE, generator=replay)
            expected = scheduler.step(eps, t, expected, eta=eta, variance_noise=noise).prev_sample
    samples, _ = DDIMSampler(model).sample(num_steps, 2, SHAPE, eta=eta, generator=torch.Generator().manual_seed(5))
    assert relative_error(samples, expected) < 1e-4


def test_ddim_with_eta_is_reproducible_per_seed(model, x_T):
    sampler = DDIMSampler(model)

    def draw(seed):
        return sampler.sample(10, 2, SHAPE, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(seed))[0]

    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1
    deterministic, _ = sampler.sample(10, 2, SHAPE, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    assert (first - deterministic).abs().max() > 0.1


def test_guidance_doubles_the_batch_in_one_call_and_combines_eps(model, x_T):
    cond, uncond, scale = make_cond(2, seed=3), make_cond(2, seed=4), 7.5
    sampler = DDIMSampler(model)
    _, intermediates = sampler.sample(5, 2, SHAPE, conditioning=cond, x_T=x_T, log_every_t=1,
                                      unconditional_guidance_scale=scale, unconditional_conditioning=uncond)
    assert model.calls == [4] * 5
    first_t, second_t = (int(t) for t in sampler.ddim_timesteps[::-1][:2])
    t = torch.full((2,), first_t)
    with torch.no_grad():
        eps_uncond, eps_cond = model.eps(x_T, t, uncond), model.eps(x_T, t, cond)
        expected = ddim_step_by_hand(model, x_T, eps_uncond + scale * (eps_cond - eps_uncond), first_t, second_t)
    assert relative_error(intermediates["x_inter"][1], expected) < 1e-5

    model.calls.clear()
    unguided, _ = sampler.sample(5, 2, SHAPE, conditioning=cond, x_T=x_T, unconditional_conditioning=uncond)
    plain, _ = sampler.sample(5, 2, SHAPE, conditioning=cond, x_T=x_T)
    assert model.calls == [2] * 10 and torch.equal(unguided, plain)


def test_plms_first_step_is_improved_euler_with_one_extra_call(model, x_T):
    cond, uncond, scale = make_cond(2, seed=3), make_cond(2, seed=4), 3.0
    sampler = PLMSSampler(model)
    _, intermediates = sampler.sample(5, 2, SHAPE, conditioning=cond, x_T=x_T, log_every_t=1,
                                      unconditional_guidance_scale=scale, unconditional_conditioning=uncond)
    assert model.calls == [4] * 6
    first_t, second_t = (int(t) for t in sampler.ddim_timesteps[::-1][:2])

    def guided(x, timestep):
        t = torch.full((2,), timestep)
        eps_uncond = model.eps(x, t, uncond)
        return eps_uncond + scale * (model.eps(x, t, cond) - eps_uncond)

    with torch.no_grad():
        eps_start = guided(x_T, first_t)
        x_euler = ddim_step_by_hand(model, x_T, eps_start, first_t, second_t)
        eps_mean = (eps_start + guided(x_euler, second_t)) / 2
        expected = ddim_step_by_hand(model, x_T, eps_mean, first_t, second_t)
    assert relative_error(intermediates["x_inter"][1], expected) < 1e-5


def test_plms_later_steps_are_adams_bashforth_over_earlier_eps(model, x_T):
    sampler = PLMSSampler(model)
    _, intermediates = sampler.sample(10, 2, SHAPE, x_T=x_T, log_every_t=1)
    states, timesteps = intermediates["x_inter"], [int(t) for t in sampler.ddim_timesteps[::-1]]
    with torch.no_grad():
        eps = [model.eps(x, torch.full((2,), t), None) for x, t in zip(states[:5], timesteps)]
    # Weights of the newest eps first; orders 2, 3, 4, and order 4 again once the history is full.
    weights = {1: [3 / 2, -1 / 2], 2: [23 / 12, -16 / 12, 5 / 12], 3: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
               4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for step, step_weights in weights.items():
        combined = sum(w * e for w, e in zip(step_weights, eps[step::-1]))
        expected = ddim_step_by_hand(model, states[step], combined, timesteps[step], timesteps[step + 1])
        assert relative_error(states[step + 1], expected) < 1e-5, f"step {step}"


def test_plms_at_20_steps_is_closer_to_the_ode_solution_than_ddim():
    mu = 0.5 * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(7))
    std = 0.5
    model = GaussianDataDiffusion(mu, std)
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(8))
    ddim_20, _ = DDIMSampler(model).sample(20, 2, SHAPE, x_T=x_T)
    plms_20, _ = PLMSSampler(model).sample(20, 2, SHAPE, x_T=x_T)

    # DDIM with 500 steps over the same span: the 20-step runs start at timestep 951, which is step 475 of 500.
    reference_sampler = DDIMSampler(model)
    reference_sampler.make_schedule(500)
    start = int(np.flatnonzero(reference_sampler.ddim_timesteps == 951)[0])
    ddim_500 = reference_sampler.decode(x_T, None, start + 1)

    # The probability-flow ODE keeps (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) constant for Gaussian data.
    alphas = model.alphas_cumprod.double()
    a_start, a_end = alphas[951], alphas[0]
    whitened = (x_T.double() - a_start.sqrt() * mu) / (a_start * std ** 2 + 1 - a_start).sqrt()
    exact = a_end.sqrt() * mu + (a_end * std ** 2 + 1 - a_end).sqrt() * whitened
    assert relative_error(ddim_500.double(), exact) < 0.01

    ddim_error, plms_error = relative_error(ddim_20, ddim_500), relative_error(plms_20, ddim_500)
    assert plms_error < 0.25 * ddim_error


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_the_original_scripts_keyword_call_works(model, x_T, sampler_class, capsys):
    """The original txt2img/stable_txt2img call `sample` with these keywords; verbose=False prints nothing."""
    cond, uncond = make_cond(2, seed=3), make_cond(2, seed=4)
    samples, _ = sampler_class(model).sample(S=5, conditioning=cond, batch_size=2, shape=list(SHAPE), verbose=False,
                                             unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
                                             eta=0.0, x_T=x_T)
    expected, _ = sampler_class(model).sample(5, 2, SHAPE, cond, x_T=x_T, unconditional_guidance_scale=5.0,
                                              unconditional_conditioning=uncond)
    assert torch.equal(samples, expected)
    assert capsys.readouterr().out == ""


def test_plms_rejects_eta(model):
    with pytest.raises(ValueError, match="eta=0"):
        PLMSSampler(model).sample(10, 2, SHAPE, eta=0.5)


def test_stochastic_encode_jumps_to_the_indexed_step(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(50)
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(10))
    index = torch.tensor([20, 35])
    encoded = sampler.stochastic_encode(x0, index, noise=noise)
    a = model.alphas_cumprod[torch.as_tensor(sampler.ddim_timesteps[index.numpy()])].view(-1, 1, 1, 1)
    assert torch.allclose(encoded, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-6, atol=1e-6)

    seeded = [sampler.stochastic_encode(x0, index, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(*seeded)


def test_decode_spans_zero_to_a_full_sample(model, x_T):
    cond, uncond = make_cond(2, seed=3), make_cond(2, seed=4)
    sampler = DDIMSampler(model)
    with pytest.raises(RuntimeError, match="make_schedule"):
        sampler.decode(x_T, cond, 5)
    sampled, _ = sampler.sample(10, 2, SHAPE, conditioning=cond, x_T=x_T, unconditional_guidance_scale=5.0,
                                unconditional_conditioning=uncond)
    assert torch.equal(sampler.decode(x_T, cond, 0), x_T)
    decoded = sampler.decode(x_T, cond, 10, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond)
    assert torch.equal(decoded, sampled)
    with pytest.raises(ValueError, match="t_start"):
        sampler.decode(x_T, cond, 11)


def test_schedule_is_float32_on_the_model_device_and_follows_the_original_spacing(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(50, ddim_eta=1.0)
    schedule = sampler.ddim_schedule
    for values in (schedule.alphas, schedule.alphas_prev, schedule.sigmas):
        assert values.dtype == torch.float32 and values.device == model.device
    assert torch.equal(schedule.alphas_prev[1:], schedule.alphas[:-1])
    assert schedule.alphas_prev[0] == model.alphas_cumprod[0]
    a, a_prev = schedule.alphas[10].item(), schedule.alphas_prev[10].item()
    assert schedule.sigmas[10].item() == pytest.approx(math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)))

    assert len(make_ddim_timesteps("uniform", 30, 1000)) == 31
    assert make_ddim_timesteps("uniform", 3, 1000).tolist() == [1, 334, 667]
    assert make_ddim_timesteps("quad", 10, 1000)[-1] == 801
    with pytest.raises(ValueError, match="at most 500"):
        make_ddim_timesteps("uniform", 600, 1000)
    with pytest.raises(ValueError, match="ddim_discretize"):
        make_ddim_timesteps("cosine", 10, 1000)


def test_bad_inputs_raise_clear_errors(model, x_T):
    sampler = DDIMSampler(model)
    with pytest.raises(ValueError, match="batch size 3"):
        sampler.sample(10, 2, SHAPE, conditioning=make_cond(3, seed=0))
    with pytest.raises(ValueError, match="x_T has shape"):
        sampler.sample(10, 3, SHAPE, x_T=x_T)
    model.parameterization = "x0"
    with pytest.raises(ValueError, match="parameterization"):
        DDIMSampler(model)
