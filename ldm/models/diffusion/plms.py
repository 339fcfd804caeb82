"""PLMS sampling (pseudo linear multistep, Liu et al. 2022): DDIM's update fed with an extrapolated eps."""
from ldm.models.diffusion.sampling_util import StepSampler

# Adams-Bashforth weights, newest eps first, for 1, 2 and 3 earlier eps: (numerators, denominator).
ADAMS_BASHFORTH = {
    1: ((3, -1), 2),
    2: ((23, -16, 5), 12),
    3: ((55, -59, 37, -9), 24),
}


class PLMSSampler(StepSampler):
    """Deterministic sampler that reaches DDIM's quality in fewer steps by reusing the eps of earlier steps.

    The first step has no history, so it is an improved-Euler step (two model calls); later steps use
    Adams-Bashforth of order 2, 3 and then 4 over the cached eps (one call each).
    """

    progress_label = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = False) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMSSampler is deterministic and needs eta=0 (got eta={ddim_eta}); "
                             "use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _step(self, x, index, predict_eps, update, eps_history):
        eps = predict_eps(x, index)
        if eps_history:
            numerators, denominator = ADAMS_BASHFORTH[len(eps_history)]
            newest_first = [eps, *reversed(eps_history)]
            eps_prime = sum(n * e for n, e in zip(numerators, newest_first)) / denominator
        else:
            x_euler, _ = update(x, eps, index)
            eps_prime = (eps + predict_eps(x_euler, max(index - 1, 0))) / 2
        eps_history.append(eps)
        if len(eps_history) > 3:
            eps_history.pop(0)
        return update(x, eps_prime, index)
