r"""Turn an image into a new one guided by a prompt with learned words (SD v1 defaults; LDM configs work too).

--strength sets how far the init image is noised before denoising: 0 returns it through the autoencoder
unchanged, 1 ignores it. The output has the init image's size rounded down to what the model needs (a multiple
of 64 px for SD) unless --H/--W are given. Only the DDIM sampler can start partway, so --plms is refused.

Example:
  python scripts/img2img.py --init_img sketch.png --strength 0.6 --prompt "a painting of * in a forest" \
      --embedding_path logs/cat/checkpoints/embeddings.pt --ckpt models/ldm/stable-diffusion-v1/model.ckpt
"""
import argparse
import sys

from ldm.generate import add_generation_arguments, run_command_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, img2img=True)
    return parser


def main(argv=None) -> int:
    return run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
