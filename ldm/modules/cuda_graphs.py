"""The UNet's passes replayed as CUDA graphs: training's forward and backward (`cuda_graphs: true`) and
sampling's forward (`--cuda_graphs`).

At small batches a textual-inversion step, and a sampling step, is bound by kernel launches, not arithmetic: SD
v1 at batch 1 runs about 1,500 operations in the UNet's forward and backward for some 2 ms of H100 arithmetic,
and each launch costs the CPU more than the GPU needs to run it. `torch.cuda.make_graphed_callables` records
the passes once per input shape and replays each with one launch. The recorded kernels are the eager ones on the
same weights, so the values are those of the eager step.

Graphs stand in only on CUDA, without gradients (sampling) or in a training forward (gradients on, a text
conditioning that requires grad) of a frozen UNet (the recorded backward computes the conditioning's gradient
only) without gradient checkpointing (its recomputation has not been tried under recording). Anything else, and
the CPU, runs eagerly. Moving or casting the UNet drops the recorded graphs, whose kernels read the old weights.
"""
import inspect

import torch

_CAPTURE_OPTIONS = (
    # Other threads (the data loader pins memory) may call CUDA while a graph is being recorded.
    {"capture_error_mode": "thread_local"}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {}
)


def uses_checkpointing(unet: torch.nn.Module) -> bool:
    return any(getattr(module, "use_checkpoint", False) is True or getattr(module, "checkpoint", False) is True
               for module in unet.modules())


class GraphedUNet:
    """Calls `unet(x, timesteps, context=context)`, through recorded CUDA graphs where they apply.

    `sampling=False` leaves passes without gradients eager: a training run's image logging would otherwise keep a
    recording's memory pool for the whole run. `make_graphed` and `device_type` are there for tests on machines
    without CUDA."""

    def __init__(self, unet: torch.nn.Module, sampling: bool = True, make_graphed=torch.cuda.make_graphed_callables,
                 device_type: str = "cuda"):
        self.unet = unet
        self.sampling = sampling
        self.make_graphed = make_graphed
        self.device_type = device_type
        self.checkpointing = uses_checkpointing(unet)
        self.weights = list(unet.parameters())
        self.graphed = {}  # (shapes, dtypes, grad mode, autocast state) -> graphed callable
        self.failed = False

    def applies(self, x: torch.Tensor, context: torch.Tensor | None) -> bool:
        if self.failed or x.device.type != self.device_type or context is None:
            return False
        if not torch.is_grad_enabled():
            return self.sampling
        return (context.requires_grad and not x.requires_grad and not self.checkpointing
                and not any(w.requires_grad for w in self.weights))

    def __call__(self, x, timesteps, context=None):
        if not self.applies(x, context):
            return self.unet(x, timesteps, context=context)
        device = x.device.type
        key = (*((tuple(t.shape), t.dtype) for t in (x, timesteps, context)),
               torch.is_grad_enabled(), torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if key not in self.graphed:
            try:
                self.graphed[key] = self._record(x, timesteps, context)
            except RuntimeError as error:
                self.failed = True
                print(f"cuda_graphs: recording the UNet failed ({' '.join(str(error).split())[:200]}); "
                      "it runs eagerly from here on")
                return self.unet(x, timesteps, context=context)
        output = self.graphed[key](x, timesteps, context)
        # A replay overwrites the recorded output; samplers may keep it across steps (PLMS keeps past noise).
        return output if torch.is_grad_enabled() else output.clone()

    def clear(self):
        self.graphed.clear()

    def _record(self, x, timesteps, context):
        """Warm up and record the passes on copies of this call's inputs (the backward too where the conditioning
        requires grad); autocast as it is now, minus its weight-cast cache, which a recording may not use (frozen
        weights are never cached anyway)."""
        samples = (x.detach().clone(), timesteps.detach().clone(),
                   context.detach().clone().requires_grad_(context.requires_grad))
        device = x.device.type
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                            cache_enabled=False):
            return self.make_graphed(self._forward, samples, **_CAPTURE_OPTIONS)

    def _forward(self, x, timesteps, context):
        return self.unet(x, timesteps, context=context)
