r"""Generate images with the LDM text2img-large model (LDM-BERT) and learned words.

Defaults are the original txt2img.py's (200 DDIM steps, scale 5.0, 256 px, 4 samples, 1 iteration, float32:
--precision autocast samples in fp16, which LDM-BERT was not checked in); its README example uses 50 steps:
  python scripts/txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50 \
      --embedding_path logs/cat/checkpoints/embeddings_gs-6100.pt \
      --ckpt_path models/ldm/text2img-large/model.ckpt --prompt "a photo of *"
Unlike the original it has --seed (default 42), so runs are reproducible.
"""
import argparse
import sys

from ldm.generate import add_generation_arguments, run_command_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser)
    parser.set_defaults(
        ddim_steps=200, scale=5.0, n_samples=4, n_iter=1, precision="full",
        config="configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml",
        ckpt="models/ldm/text2img-large/model.ckpt",
    )
    return parser


def main(argv=None) -> int:
    return run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
