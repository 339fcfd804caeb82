"""Frozen UNet weights kept in CPU memory, each block's visiting the GPU only while it computes (`offload_unet`).

SD v1's UNet is 1.6 GiB of bf16 weights, most of what textual inversion holds on the GPU. With `offload_unet`
they wait in pinned CPU memory: a block's weights are copied over just before the block runs and dropped when it
returns, and a weight that an op keeps for its backward (a linear's or a convolution's, for the input gradient)
is kept as a reference to the CPU copy and brought back when the backward reads it. The GPU then holds one
block's weights at a time besides the activations, for two host-to-device copies of the UNet per training step
(one per sampling step). A block that gradient checkpointing recomputes in backward, outside its hooks, gets its
weights back for the recomputation through `uploaded`. The kernels and their inputs are the same, so the values
are too.
"""
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn

# id(parameter) -> the WeightOffload that keeps it in CPU memory (and the parameter alive, so the id stays its own).
_OFFLOAD_OF = weakref.WeakValueDictionary()


class _OnHost:
    """What a kept weight becomes until the backward reads it: its CPU copy and the view the op kept."""

    __slots__ = ("host", "size", "stride", "offset")

    def __init__(self, host: torch.Tensor, view: torch.Tensor):
        self.host, self.size, self.stride, self.offset = host, view.shape, view.stride(), view.storage_offset()


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's top-level blocks, in the order they run: the unit of transfer."""
    blocks = []
    for child in unet.children():
        blocks.extend(child if isinstance(child, nn.ModuleList) else [child])
    return blocks


class WeightOffload:
    """Streams the weights of `blocks` from CPU memory to the device given to `park`, block by block; `saving()`
    wraps the forward whose kept weights wait in CPU memory."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.device = torch.device("cpu")
        self.host = {}  # parameter -> its CPU copy
        self.host_of_storage = {}  # storage address of a weight now on the device -> its CPU copy
        for block in blocks:
            block.register_forward_pre_hook(self._upload)
            block.register_forward_hook(self._release)
            for parameter in block.parameters():
                _OFFLOAD_OF[id(parameter)] = self

    def park(self, device):
        """Make `device` the one blocks compute on and move every weight to CPU memory (pinned for CUDA)."""
        self.device = torch.device(device)
        for block in self.blocks:
            for parameter in block.parameters():
                host = parameter.data.to("cpu")
                if self.device.type == "cuda" and not host.is_pinned():
                    host = host.pin_memory()
                parameter.data = self.host[parameter] = host

    def saving(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True, copy=True)

    def _upload(self, block, args):
        for parameter in block.parameters():
            copy = self._to_device(self.host[parameter])
            self.host_of_storage[copy.untyped_storage().data_ptr()] = self.host[parameter]
            parameter.data = copy

    def _release(self, block, args, output):
        for parameter in block.parameters():
            self.host_of_storage.pop(parameter.data.untyped_storage().data_ptr(), None)
            parameter.data = self.host[parameter]

    def waits_on_host(self, parameter) -> bool:
        return parameter.data.data_ptr() == self.host[parameter].data_ptr()

    def _pack(self, tensor):
        host = self.host_of_storage.get(tensor.untyped_storage().data_ptr()) if tensor.device == self.device else None
        return tensor if host is None else _OnHost(host, tensor)

    def _unpack(self, packed):
        if not isinstance(packed, _OnHost):
            return packed
        return self._to_device(packed.host).as_strided(packed.size, packed.stride, packed.offset)


@contextmanager
def uploaded(module: nn.Module):
    """For the duration, each parameter of `module` that an offloaded UNet keeps in CPU memory is replaced by a
    device copy: a gradient-checkpointed block recomputes its forward in backward, where its block's hooks do not
    upload. The copies are plain tensors in the parameters' places, so what the recomputation keeps for the
    backward stays valid after the parameters return."""
    replaced = []
    for owner in module.modules():
        for name, parameter in owner._parameters.items():
            offload = _OFFLOAD_OF.get(id(parameter)) if parameter is not None else None
            if offload is not None and offload.waits_on_host(parameter):
                owner._parameters[name] = offload._to_device(offload.host[parameter])
                replaced.append((owner, name, parameter))
    try:
        yield
    finally:
        for owner, name, parameter in replaced:
            owner._parameters[name] = parameter
