"""What the UNet keeps for its backward pass in one training forward, by layer and by the op that made it.

Textual inversion's training memory beyond the weights is mostly these kept activations, so this is the map to
read before changing a layer. The UNet of a config runs once with random weights under the training precision,
with a gradient only towards its text conditioning (frozen weights), and autograd's saved-tensor hooks count
each kept storage once (weights excluded). Runs on any device; on a CPU that computes bf16 natively (AVX512-BF16,
AMX) SD v1 at batch 1 takes seconds (elsewhere bf16 is emulated: minutes; --precision fp32 takes 30 s), and
the ops that CUDA autocast runs in float32 but the CPU's does not (layer_norm, group_norm, interpolate) run in
float32 whenever autocast is on for them, so that the map shows what a training run on a GPU keeps.

Examples:
  python scripts/activation_memory.py                          # SD v1, batch 1, 512 px, bf16, CPU
  python scripts/activation_memory.py --model ldm --batch_size 4
"""
import argparse
import collections
import contextlib
import os
import sys

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.cli import NAMED_CONFIGS, parse_device
from ldm.measure import CudaAutocastOnCPU
from ldm.util import instantiate_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LastOp(TorchDispatchMode):
    """Remembers the last op run: the one whose output autograd is about to keep."""

    name = "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.name = func.overloadpacket.__name__
        return func(*args, **(kwargs or {}))


def unet_of(model_name: str, device: torch.device, dtype: torch.dtype,
            recompute_feedforward: bool = False) -> tuple[torch.nn.Module, dict]:
    """The config's UNet with random frozen weights in `dtype` (as training stores them), and its model params."""
    config = OmegaConf.load(os.path.join(REPO, NAMED_CONFIGS[model_name]))
    params = config.model.params
    params.unet_config.params.recompute_feedforward = recompute_feedforward
    torch.manual_seed(0)
    with torch.device(device):
        unet = instantiate_from_config(params.unet_config)
    return unet.requires_grad_(False).to(dtype), params


def kept_by_layer(unet: torch.nn.Module, params, batch_size: int, dtype: torch.dtype) -> collections.Counter:
    """Bytes kept for backward, keyed by (innermost module class, last op run before the tensor was kept: mostly
    the op that made it, dtype)."""
    device = next(unet.parameters()).device
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    modules = ["UNetModel"]

    def enter(module, args):
        modules.append(type(module).__name__)

    def leave(module, args, output):
        modules.pop()

    for module in unet.modules():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    last_op = LastOp()
    seen, kept = set(), collections.Counter()

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kept[(modules[-1], last_op.name, str(tensor.dtype).removeprefix("torch."))] += storage.nbytes()
        return tensor

    size = params.image_size
    x = torch.randn(batch_size, params.channels, size, size, device=device, dtype=dtype)
    context = torch.randn(batch_size, 77, params.unet_config.params.context_dim, device=device, requires_grad=True)
    timesteps = torch.full((batch_size,), 500, device=device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    as_on_cuda = CudaAutocastOnCPU() if device.type == "cpu" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast, as_on_cuda, last_op:
        output = unet(x, timesteps, context=context)
    del output
    return kept


def report(kept: collections.Counter, title: str) -> str:
    total = sum(kept.values())
    lines = [f"# {title}", "", "| layer | last op before it was kept | dtype | MiB | share |", "|---|---|---|---|---|"]
    for (module, op, dtype), size in kept.most_common():
        lines.append(f"| {module} | {op} | {dtype} | {size / 2**20:.1f} | {size / total:.1%} |")
    lines += ["", f"Total kept for backward: {total / 2**20:.1f} MiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=NAMED_CONFIGS, default="sd", help="which config's UNet (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=1, help="default: %(default)s")
    parser.add_argument("--precision", choices=DTYPES, default="bf16",
                        help="frozen weights and autocast dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="default: %(default)s")
    parser.add_argument("--recompute_feedforward", action="store_true",
                        help="the UNet's recompute_feedforward: GEGLU keeps its input, not its projection")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    try:
        device = parse_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    dtype = DTYPES[args.precision]
    unet, params = unet_of(args.model, device, dtype, args.recompute_feedforward)
    kept = kept_by_layer(unet, params, args.batch_size, dtype)
    print(report(kept, f"Kept for backward: {args.model} UNet, batch {args.batch_size}, {args.precision}, {device}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
