r"""Score a learned word with the Textual Inversion paper's two CLIP metrics.

Image similarity: the mean CLIP cosine between every training image and every generated image (does the word
reproduce the concept?). Text similarity: the mean cosine between each generated image and the prompt with the
placeholders removed (does the image still follow the rest of the prompt?). The paper's protocol, the defaults:
64 samples of "a photo of *", DDIM 50 steps, eta 0, guidance 5.0, batches of 8, at the model's own resolution,
CLIP ViT-B/32. CLIP is read from --clip_weights, a local file; nothing is downloaded.

Generated images are also saved to --outdir (samples/NNNNN.png and a grid), and --images_dir scores such a samples/
folder again without a model (its training images are resized to the samples' size, as in a generation run). An
--outdir whose samples/ holds images, or an existing --out, is refused: runs never mix or overwrite each other.

Examples:
  python scripts/evaluate.py --ckpt models/ldm/text2img-large/model.ckpt \
      --config configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml \
      --embedding_path logs/cat/checkpoints/embeddings.pt --data_dir data/cat --clip_weights ViT-B-32.pt
  python scripts/evaluate.py --images_dir outputs/clip-eval/samples --data_dir data/cat --clip_weights ViT-B-32.pt
"""
import argparse
import json
import os
import sys

import torch

from ldm.cli import default_device, parse_device, require_at_least
from ldm.data.personalized import IMAGE_EXTENSIONS, PersonalizedBase, list_images, load_upright_rgb
from ldm.embeddings import load_embeddings
from ldm.evaluation.clip_eval import CLIPEvaluator, load_clip, remove_placeholders
from ldm.generate import (PRECISIONS, check_ddim_steps, config_timesteps, first_stage_factor, generate, load_model,
                          prompt_warnings, sampling_weights_dtype, save_outputs)
from ldm.images import channels_first
from ldm.paths import check_output

SCORE_FILE = "clip_scores.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--ckpt", "--ckpt_path", dest="ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt",
        help="model checkpoint (default: %(default)s)")
    add("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config (default: %(default)s)")
    add("--embedding_path", nargs="+", action="extend", default=[],
        help="embedding file(s) with the learned words; needed to generate")
    add("--data_dir", required=True, help="folder of the training images")
    add("--images_dir", help="score the images in this folder instead of generating")
    add("--prompt", default="a photo of *",
        help="prompt to generate from; without its placeholders, the text score's reference (default: %(default)s)")
    add("--n_samples", type=int, default=64, help="images to generate (default: %(default)s)")
    add("--batch_size", type=int, default=8, help="images generated at once (default: %(default)s)")
    add("--ddim_steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    add("--scale", type=float, default=5.0, help="classifier-free guidance scale (default: %(default)s)")
    add("--eta", "--ddim_eta", dest="eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    add("--seed", type=int, default=42, help="seed of all sampling noise (default: %(default)s)")
    add("--precision", choices=PRECISIONS, default="full", help="generation precision (default: %(default)s)")
    add("--clip_weights", required=True,
        help="local CLIP checkpoint: OpenAI's ViT-B-32.pt, or an open_clip state dict of --clip_model")
    add("--clip_model", default="ViT-B-32",
        help="open_clip architecture of an open_clip state dict; OpenAI's weights in that form need "
             "ViT-B-32-quickgelu (default: %(default)s)")
    add("--outdir", default="outputs/clip-eval", help="folder for the generated images (default: %(default)s)")
    add("--out", help=f"JSON file for the scores (default: <outdir>/{SCORE_FILE}; with --images_dir, "
                      f"<images_dir>_{SCORE_FILE} beside that folder)")
    add("--device", default=default_device(), help="device to run on (default: %(default)s)")
    return parser.parse_args(argv)


def read_images(folder, size: int | None) -> list[torch.Tensor]:
    """The folder's images as (3, H, W) tensors in [-1, 1], square-cropped and resized to `size` when given."""
    dataset = PersonalizedBase(folder, size=size, flip_p=0.0, set="val")
    return [channels_first(torch.from_numpy(dataset[i]["image"])[None])[0] for i in range(len(dataset))]


def common_square_side(images: list[torch.Tensor]) -> int | None:
    """The side of the images when all are squares of one size, else None."""
    shapes = {tuple(image.shape[-2:]) for image in images}
    if len(shapes) != 1:
        return None
    ((height, width),) = shapes
    return height if height == width else None


def default_out(args) -> str:
    """<outdir>/clip_scores.json; with --images_dir, <images_dir>_clip_scores.json beside that folder, so rescoring
    a run's samples/ never replaces the run's own scores."""
    if not args.images_dir:
        return os.path.join(args.outdir, SCORE_FILE)
    folder = os.path.normpath(args.images_dir)
    if os.path.basename(folder) in (".", ".."):
        folder = os.path.abspath(folder)
    return f"{folder}_{SCORE_FILE}"


def check_inputs(args) -> list[str]:
    """Fail on the image folders, the generation settings and the learned words before CLIP loads or a sample is
    drawn; returns the placeholders of --embedding_path ("*" when none is given)."""
    for path in list_images(args.data_dir, "--data_dir", "the concept's training images"):
        load_upright_rgb(path)  # an unreadable file fails now, not after all the generation
    if args.images_dir:
        samples = os.path.join(args.images_dir, "samples")
        if os.path.isdir(samples):
            raise ValueError(f"--images_dir '{args.images_dir}' is a generation run's --outdir (its grids are not "
                             f"samples): pass its samples folder, '{samples}'")
        list_images(args.images_dir, "--images_dir", "generated images to score, e.g. outputs/clip-eval/samples")
    else:
        if not args.embedding_path:
            raise ValueError("pass --embedding_path with the learned words to generate, or --images_dir to score "
                             "saved images")
        require_at_least(1, n_samples=args.n_samples, batch_size=args.batch_size)
        check_ddim_steps(args.ddim_steps, config_timesteps(args.config))
        check_output(args.outdir, "--outdir", folder=True)
        samples = os.path.join(args.outdir, "samples")
        if os.path.isdir(samples) and any(name.lower().endswith(IMAGE_EXTENSIONS) for name in os.listdir(samples)):
            raise ValueError(f"--outdir '{args.outdir}' holds an earlier run's images in '{samples}', which this "
                             "run's would join: pick another --outdir")
    placeholders = [p for path in args.embedding_path for p in load_embeddings(path).vectors] or ["*"]
    if remove_placeholders(args.prompt, placeholders) == " ".join(args.prompt.split()):  # none of them was removed
        raise ValueError(f"--prompt '{args.prompt}' holds none of the learned words ({', '.join(placeholders)}), so "
                         f"it would score the model without them: write one into --prompt, e.g. "
                         f"'a photo of {placeholders[0]}'")
    return placeholders


def generate_samples(args, device) -> tuple[torch.Tensor, list[str], dict]:
    """(generated images in [-1, 1], the loaded placeholders, settings to report), the images saved to --outdir."""
    model = load_model(args.config, args.ckpt, device, embedding_paths=args.embedding_path,
                       weights_dtype=sampling_weights_dtype(device, args.precision))
    learned_words = list(model.embedding_manager.string_to_token_dict)
    for message in prompt_warnings(model, args.prompt, f"--prompt '{args.prompt}'", learned_words):
        print(f"evaluate: warning: {' '.join(message.split())}", file=sys.stderr)
    side = model.image_size * first_stage_factor(model)
    images = generate(model, [args.prompt] * args.n_samples, n_samples=args.batch_size, n_iter=1,
                      steps=args.ddim_steps, scale=args.scale, eta=args.eta, seed=args.seed, height=side, width=side,
                      precision=args.precision)
    save_outputs(images, args.outdir, args.prompt, n_rows=args.batch_size)
    settings = {
        "ckpt": args.ckpt, "config": args.config, "embedding_path": args.embedding_path,
        "ddim_steps": args.ddim_steps, "scale": args.scale, "eta": args.eta, "batch_size": args.batch_size,
        "seed": args.seed, "image_size": side, "precision": args.precision, "outdir": args.outdir,
    }
    return torch.stack(images) * 2.0 - 1.0, list(model.embedding_manager.string_to_token_dict), settings


def evaluate(args) -> dict:
    """The scores and the settings that produced them."""
    device = parse_device(args.device)
    placeholders = check_inputs(args)
    evaluator = CLIPEvaluator(*load_clip(args.clip_weights, args.clip_model), device=device)
    if args.images_dir:
        generated = read_images(args.images_dir, None)
        source_size = common_square_side(generated)
        settings = {"images_dir": args.images_dir, "embedding_path": args.embedding_path}
    else:
        generated, placeholders, settings = generate_samples(args, device)
        source_size = settings["image_size"]
    sources = read_images(args.data_dir, source_size)
    text_prompt = remove_placeholders(args.prompt, placeholders)
    return {
        "image_similarity": evaluator.img_to_img_similarity(sources, generated),
        "text_similarity": evaluator.txt_to_img_similarity(text_prompt, generated),
        "n_samples": len(generated),
        "prompt": args.prompt,
        "text_prompt": text_prompt,
        "placeholders": placeholders,
        "data_dir": args.data_dir,
        "n_source_images": len(sources),
        "clip_model": args.clip_model,
        "clip_weights": args.clip_weights,
        **settings,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or default_out(args)
    try:
        check_output(out, "--out")
        if os.path.exists(out):
            flag = "--out" if args.out or args.images_dir else "--outdir (or --out)"
            raise ValueError(f"--out '{out}' already exists: pick another {flag}; earlier scores are never "
                             "overwritten")
        scores = evaluate(args)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(scores, handle, indent=2)
    except (ValueError, OSError) as error:
        print(f"evaluate: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"CLIP scores of {scores['n_samples']} images for '{scores['prompt']}' "
          f"(text compared: '{scores['text_prompt']}')")
    print(f"  {'image similarity':<18}{scores['image_similarity']:.4f}")
    print(f"  {'text similarity':<18}{scores['text_similarity']:.4f}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
