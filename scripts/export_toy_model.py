r"""Turn a pretraining run's `last.ckpt` into the safetensors file that ships in `models/ldm/toy/`.

    python scripts/export_toy_model.py --ckpt logs/<autoencoder run>/checkpoints/last.ckpt \
        --out models/ldm/toy/autoencoder.safetensors --force
    python scripts/export_toy_model.py --ckpt logs/<txt2img run>/checkpoints/last.ckpt \
        --out models/ldm/toy/model.safetensors --force

Keys keep their original names, so the file loads wherever the checkpoint would (`ckpt_path`, `--actual_resume`,
`--ckpt`). A run that kept an EMA of the UNet (`model_ema.*`) is exported with the EMA weights as `model.*` and
without the `model_ema.*` copies: one UNet, the one to sample with, so configs load it with `use_ema: False`.
Network weights are written in float16 by default (half the size; the toy samples in float32 all the same);
top-level buffers, the noise schedule and `scale_factor`, stay float32: they are tiny and rounding the schedule
would shift every sampling step. An existing --out, such as the shipped model, is replaced only with --force,
and then in one step (a stopped export leaves the old file).
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file

from ldm.checkpoint import ema_state_dict, load_checkpoint
from ldm.paths import check_output

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
EMA_PREFIX = "model_ema."


def exported_state(state_dict: dict, dtype: torch.dtype, path: str = "checkpoint") -> dict:
    """The weights to ship: EMA folded into `model.*`, floating weights of submodules in `dtype`, fresh tensors."""
    if not state_dict or all(key.startswith("embedding_manager.") for key in state_dict):
        raise ValueError(f"'{path}' holds no model weights (a textual-inversion run's last.ckpt?): export a pretraining run")
    has_ema = any(key.startswith(EMA_PREFIX) for key in state_dict)
    state = ema_state_dict(state_dict, path) if has_ema else state_dict
    exported = {}
    for key, value in state.items():
        if key.startswith(EMA_PREFIX):
            continue
        target = dtype if value.is_floating_point() and "." in key else value.dtype
        exported[key] = value.to(target, copy=True).contiguous()
    return exported


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a pretraining run's checkpoint, e.g. logs/<run>/checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="the .safetensors file to write, e.g. models/ldm/toy/model.safetensors")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="precision of the network weights")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (e.g. the shipped model)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out '{args.out}' must end in .safetensors", file=sys.stderr)
        return 2
    if os.path.isfile(args.out) and not args.force:
        print(f"error: --out '{args.out}' already exists: pass another --out, or --force to replace it", file=sys.stderr)
        return 2
    try:
        check_output(args.out, "--out")
        checkpoint = load_checkpoint(args.ckpt)
        state = exported_state(checkpoint.state_dict, DTYPES[args.dtype], args.ckpt)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    metadata = {"format": "pt", "source": os.path.basename(args.ckpt), "dtype": args.dtype}
    if checkpoint.global_step is not None:
        metadata["global_step"] = str(checkpoint.global_step)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(state, args.out + ".tmp", metadata=metadata)
    os.replace(args.out + ".tmp", args.out)
    ema = "EMA UNet weights" if any(k.startswith(EMA_PREFIX) for k in checkpoint.state_dict) else "no EMA in the run"
    size = os.path.getsize(args.out) / 2**20
    print(f"Wrote {len(state)} tensors ({args.dtype}, {ema}, step {checkpoint.global_step}) to {args.out}: {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
