"""LitEma: the exponential moving average of LDM pretraining, with the original checkpoint key names."""
from contextlib import contextmanager

import torch


class LitEma(torch.nn.Module):
    """Exponential moving average of a module's trainable weights, kept as LDM kept it so checkpoints match:
    one buffer per parameter named after it without dots (`model_ema.diffusion_modelout2weight`), plus `decay`
    and `num_updates`. The decay ramps up as (1 + n) / (10 + n) so that short runs average recent weights."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        # num_updates >= 0 on the host: reading the buffer at every step would wait for the GPU's queued work.
        self.ramps_up = use_num_updates
        self.shadow_names = {name: name.replace(".", "") for name, p in model.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            if name in self.shadow_names:
                self.register_buffer(self.shadow_names[name], p.detach().clone())

    def _pairs(self, model):
        return [(p, getattr(self, self.shadow_names[name])) for name, p in model.named_parameters() if name in self.shadow_names]

    @torch.no_grad()
    def forward(self, model: torch.nn.Module):
        """Move every shadow weight a step (1 - decay) towards the model's current weight."""
        decay = self.decay
        if self.ramps_up:
            self.num_updates += 1
            decay = torch.minimum(decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for p, shadow in self._pairs(model):
            shadow.lerp_(p.detach().to(shadow.dtype), (1.0 - decay).to(shadow.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.ramps_up = bool(self.num_updates >= 0)

    @contextmanager
    def applied_to(self, model: torch.nn.Module):
        """Run the block with the averaged weights in `model`, then put the trained weights back."""
        pairs = self._pairs(model)
        trained = [p.detach().clone() for p, _ in pairs]
        with torch.no_grad():
            for p, shadow in pairs:
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), weight in zip(pairs, trained):
                    p.copy_(weight)
