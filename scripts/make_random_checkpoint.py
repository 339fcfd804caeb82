"""Write a checkpoint of random weights for a config, to try every command without a real model.

    python scripts/make_random_checkpoint.py --config configs/tiny/sd-tiny-finetune.yaml --out models/tiny-sd-random.ckpt

The images such a model makes are noise; the commands, files and formats are the real ones. An --out ending in
.safetensors gets a safetensors state dict; an existing --out is never replaced.
"""
import argparse
import os
import sys

from ldm.checkpoint import write_random_checkpoint
from ldm.cli import read_config
from ldm.paths import check_output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model config (its `model:` block is used)")
    parser.add_argument("--out", required=True, help="where to write the .ckpt (or .safetensors); must not exist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        read_config(args.config)
        check_output(args.out, "--out")
        if os.path.exists(args.out):
            raise ValueError(f"--out '{args.out}' already exists (perhaps a real model): pick another --out")
        path = write_random_checkpoint(args.config, args.out, args.seed)
    except (OSError, ValueError) as error:
        print(f"make_random_checkpoint: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote random weights for {args.config} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
