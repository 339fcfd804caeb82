"""scripts/activation_memory.py maps what the UNet keeps for backward; with frozen weights no convolution input
is among it."""
import importlib.util
import os

import torch

from ldm.modules.lean_ops import LayerNorm
from tests.conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("activation_memory", os.path.join(REPO, "scripts",
                                                                                    "activation_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_unet_map_counts_attention_and_norm_inputs_but_no_frozen_conv_inputs(capsys):
    script = load_script()
    assert script.main(["--model", "tiny-sd", "--batch_size", "2"]) == 0
    rows = [line.strip("|").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")]
    layers = {row[0].strip() for row in rows}
    assert {"CrossAttention", "LayerNorm", "GroupNorm32", "GEGLU"} <= layers
    assert not any(layer.startswith("Conv") for layer in layers)
    # No float32 copies of activations: float32 appears only for attention's per-row log-sum-exp and norm statistics.
    assert {row[1] for row in rows if row[2] == "float32"} <= {"_scaled_dot_product_flash_attention_for_cpu",
                                                                "native_group_norm"}

    unet, params = script.unet_of("tiny-sd", torch.device("cpu"), torch.bfloat16)
    one, two = (sum(script.kept_by_layer(unet, params, batch, torch.bfloat16).values()) for batch in (1, 2))
    assert one > 0 and abs(two - 2 * one) < 0.1 * one  # activations grow with the batch


def test_on_the_cpu_the_map_shows_what_cuda_autocast_keeps():
    """CUDA autocast runs layer_norm in float32, so a stock nn.LayerNorm keeps a float32 copy of its bf16 input
    there; the CPU's autocast does not, and the map emulates CUDA's. Our LayerNorm runs natively on both."""
    script = load_script()
    unet, params = script.unet_of("tiny-sd", torch.device("cpu"), torch.bfloat16)

    def layer_norm_kept():
        kept = script.kept_by_layer(unet, params, 1, torch.bfloat16)
        return {dtype for (layer, op, dtype) in kept if layer == "LayerNorm" and kept[(layer, op, dtype)] > 4096}

    assert layer_norm_kept() == {"bfloat16"}
    for module in unet.modules():
        if type(module) is LayerNorm:
            module.__class__ = torch.nn.LayerNorm
    assert layer_norm_kept() == {"float32"}
