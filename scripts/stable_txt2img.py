r"""Generate images with Stable Diffusion v1 and learned words (the original stable_txt2img.py's flags and defaults).

Example:
  python scripts/stable_txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50 \
      --embedding_path logs/cat/checkpoints/embeddings_gs-6100.pt \
      --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompt "a photo of *"
"""
import argparse
import sys

from ldm.generate import add_generation_arguments, run_command_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
