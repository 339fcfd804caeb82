"""Frozen networks' passes replayed as CUDA graphs: the UNet's training forward and backward and the text
encoder's (`cuda_graphs: true`), and the UNet's sampling forward (`--cuda_graphs`).

At small batches a textual-inversion step, and a sampling step, is bound by kernel launches, not arithmetic: SD
v1 at batch 1 runs about 1,500 operations in the UNet's forward and backward and 430 in the text encoder's, for
some 2 ms of H100 arithmetic, and each launch costs the CPU more than the GPU needs to run it.
`torch.cuda.make_graphed_callables` records the passes once per input shape and replays each with one launch. The
recorded kernels are the eager ones on the same weights, so the values are those of the eager step.

Graphs stand in only on CUDA, for frozen weights, where the recorded backward computes what the step needs (the
gradient of the learned words' path through the network); anything else, and the CPU, runs eagerly. Moving or
casting a network drops its recorded graphs, whose kernels read the old weights.
"""
import abc
import contextlib
import inspect

import torch

# Other threads (the data loader's pin-memory thread) may call CUDA while a graph records; in the default "global"
# mode such a call breaks the recording, in "thread_local" mode only this thread's calls are checked.
# make_graphed_callables takes the mode in torch 2.14, not in 2.11 (the GPU machine's): older versions need
# `thread_local_capture`.
_TAKES_CAPTURE_MODE = "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters
_CAPTURE_OPTIONS = {"capture_error_mode": "thread_local"} if _TAKES_CAPTURE_MODE else {}


@contextlib.contextmanager
def thread_local_capture():
    """For the moment, `torch.cuda.graph` records in "thread_local" mode unless told otherwise: torch versions
    whose make_graphed_callables takes no capture mode (2.11) always record with the class's default."""
    original = torch.cuda.graph

    class ThreadLocalGraph(original):
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="thread_local", **kwargs):
            super().__init__(cuda_graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode, **kwargs)

    torch.cuda.graph = ThreadLocalGraph
    try:
        yield
    finally:
        torch.cuda.graph = original


def uses_checkpointing(module: torch.nn.Module) -> bool:
    return any(getattr(child, "use_checkpoint", False) is True or getattr(child, "checkpoint", False) is True
               for child in module.modules())


class GraphedPasses(abc.ABC):
    """Calls `_forward(*inputs)` through recorded CUDA graphs where `applies(*inputs)`, once per input signature
    (shapes, dtypes, grad and inference mode, autocast state; a recording made in inference mode holds inference
    tensors, which a replay outside it cannot refill). `make_graphed` and `device_type` are there for tests on
    machines without CUDA."""

    name = "the network"  # in the one line a failed recording prints

    def __init__(self, module: torch.nn.Module, make_graphed=torch.cuda.make_graphed_callables,
                 device_type: str = "cuda"):
        self.module = module
        self.make_graphed = make_graphed
        self.device_type = device_type
        self.weights = list(module.parameters())
        self.graphed = {}  # input signature -> graphed callable
        self.failed = False

    def applies(self, *inputs) -> bool:
        return not self.failed and inputs[0].device.type == self.device_type

    @abc.abstractmethod
    def _forward(self, *inputs):
        """The network's pass on `inputs`, eagerly."""

    def frozen(self) -> bool:
        return not any(weight.requires_grad for weight in self.weights)

    def __call__(self, *inputs):
        if not self.applies(*inputs):
            return self._forward(*inputs)
        # Recording and replaying work on the current CUDA device; on another, the recording would be empty.
        device = inputs[0].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return self._graphed_call(*inputs)

    def _graphed_call(self, *inputs):
        device = inputs[0].device.type
        key = (*((tuple(t.shape), t.dtype, t.requires_grad) for t in inputs), torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if key not in self.graphed:
            stream = torch.cuda.current_stream() if device == "cuda" else None
            try:
                self.graphed[key] = self._record(*inputs)
            except RuntimeError as error:
                if stream is not None:  # a capture that fails as it ends leaves its side stream current
                    torch.cuda.set_stream(stream)
                self.failed = True
                print(f"cuda_graphs: recording {self.name} failed ({' '.join(str(error).split())[:200]}); "
                      "it runs eagerly from here on")
                return self._forward(*inputs)
            shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
            print(f"cuda_graphs: recorded {self.name} for inputs of shape {shapes}")
        output = self.graphed[key](*inputs)
        # A replay overwrites the recorded output; samplers may keep it across steps (PLMS keeps past noise).
        return output if torch.is_grad_enabled() else output.clone()

    def clear(self):
        self.graphed.clear()

    def _record(self, *inputs):
        """Warm up and record the passes on copies of this call's inputs (the backward too where an input requires
        grad); autocast as it is now, minus its weight-cast cache, which a recording may not use (frozen weights
        are never cached anyway)."""
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        device = inputs[0].device.type
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                            cache_enabled=False):
            with contextlib.nullcontext() if _CAPTURE_OPTIONS else thread_local_capture():
                return self.make_graphed(self._forward, samples, **_CAPTURE_OPTIONS)


class GraphedUNet(GraphedPasses):
    """Calls `unet(x, timesteps, context=context)`: graphed for sampling (no gradients) and for a training forward
    of a frozen UNet whose text conditioning requires grad, without gradient checkpointing (its recomputation has
    not been tried under recording).

    `sampling=False` leaves passes without gradients eager: a training run's image logging would otherwise keep a
    recording's memory pool for the whole run."""

    name = "the UNet"

    def __init__(self, unet: torch.nn.Module, sampling: bool = True, **options):
        super().__init__(unet, **options)
        self.sampling = sampling
        self.checkpointing = uses_checkpointing(unet)

    def applies(self, x, timesteps, context) -> bool:
        if not super().applies(x) or context is None:
            return False
        if not torch.is_grad_enabled():
            return self.sampling
        return context.requires_grad and not x.requires_grad and not self.checkpointing and self.frozen()

    def __call__(self, x, timesteps, context=None):
        return super().__call__(x, timesteps, context)

    def _forward(self, x, timesteps, context):
        return self.module(x, timesteps, context=context)


class GraphedTextEncoder(GraphedPasses):
    """Calls `conditioner.encode_embeddings(embeds)`: graphed in training, where the embeddings carry the learned
    words (they require grad) through a frozen encoder; a sampling call encodes once per batch and stays eager."""

    name = "the text encoder"

    def applies(self, embeds) -> bool:
        return super().applies(embeds) and torch.is_grad_enabled() and embeds.requires_grad and self.frozen()

    def _forward(self, embeds):
        return self.module.encode_embeddings(embeds)
