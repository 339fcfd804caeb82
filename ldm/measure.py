"""Measuring training memory on any machine: CUDA's autocast policy emulated on the CPU.

CUDA's autocast runs some functions in float32 whatever their inputs (layer_norm, group_norm, interpolate, ...);
the CPU's leaves them in the input's dtype. A CPU measurement of what a training step keeps or allocates would
miss the float32 copies a GPU run makes, so the measuring scripts run under `CudaAutocastOnCPU`.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# Functions the models call that CUDA autocast runs in float32 and CPU autocast leaves in the input's dtype.
CUDA_AUTOCAST_FLOAT32 = {F.layer_norm, F.group_norm, F.interpolate}


def _to_float32(value):
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value


class CudaAutocastOnCPU(TorchFunctionMode):
    """Runs CUDA autocast's float32 functions in float32 while CPU autocast is on, as they would run on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in CUDA_AUTOCAST_FLOAT32 and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map(_to_float32, args), tree_map(_to_float32, kwargs or {})
        return func(*args, **(kwargs or {}))
