r"""Train the procedural world's attribute classifier on the CPU and report its accuracy on fresh scenes.

The classifier scores generated images of the toy model (concept fidelity and editability); it sees the whole
world while training, held-out concepts included. Weights go to --out (.safetensors) with the label names beside
it (.json); an existing --out, such as the shipped classifier, is replaced only with --force.

Example:
  python scripts/train_world_classifier.py --size 32 --steps 600 --out models/ldm/toy/world_classifier.safetensors \
      --force
"""
import argparse
import os
import time

import torch

from ldm.evaluation.world_classifier import evaluate_accuracy, label_file, save_classifier, train_classifier
from ldm.paths import check_output


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="image side the classifier reads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=600, help="training batches (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=128, help="scenes per batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training scenes and weights (default: %(default)s)")
    parser.add_argument("--eval_seed", type=int, default=2024,
                        help="seed of the fresh evaluation scenes; keep it apart from --seed (default: %(default)s)")
    parser.add_argument("--eval_count", type=int, default=2000, help="evaluation scenes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; this net's small convolutions run fastest on one (default: %(default)s)")
    parser.add_argument("--out", default="models/ldm/toy/world_classifier.safetensors",
                        help="weights file (.safetensors); the label names go beside it as .json "
                             "(default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out and its .json")
    args = parser.parse_args(argv)
    # All checked now, not after minutes of training; a batch is half native, half shrunk scenes, so at least 2.
    for flag, value, minimum in (("--steps", args.steps, 1), ("--batch_size", args.batch_size, 2),
                                 ("--eval_count", args.eval_count, 1), ("--threads", args.threads, 1)):
        if value < minimum:
            parser.error(f"{flag} must be at least {minimum}, got {value}")
    if args.size < 32 or args.size % 8:  # WorldClassifier's trunk halves the image three times
        parser.error(f"--size must be a multiple of 8 and at least 32, got {args.size}")
    if args.eval_seed == args.seed:
        parser.error("--eval_seed equals --seed; evaluate on scenes the classifier never saw")
    if os.path.splitext(args.out)[1].lower() != ".safetensors":
        parser.error(f"--out '{args.out}' must end in .safetensors (the label names go beside it as .json)")
    try:
        check_output(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    existing = [str(path) for path in (args.out, label_file(args.out)) if os.path.exists(path)]
    if existing and not args.force:
        parser.error(f"--out: '{existing[0]}' already exists: pass another --out, or --force to replace it")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(step, losses):
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {sum(losses.values()):.4f}  " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items()))

    start = time.perf_counter()
    model = train_classifier(args.size, args.steps, args.seed, args.batch_size, log=log)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    save_classifier(model, args.out)
    print(f"saved {args.out}")
    for size in sorted({args.size, 2 * args.size}):
        accuracy = evaluate_accuracy(model, args.eval_count, args.eval_seed, size)
        print(f"accuracy on {args.eval_count} fresh {size} px scenes: " + "  ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
