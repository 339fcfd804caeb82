r"""Score a learned word for a held-out concept of the toy world exactly, with the world classifier as judge.

CLIP scores (scripts/evaluate.py) only approximate "is this the concept?"; in the procedural world every attribute
of a generated image can be read back, so both questions of the Textual Inversion paper get exact answers:
- fidelity: of the images made from "a photo of *" and "a *", the fraction showing the concept (its shape, and its
  colour and texture where the concept fixes them);
- editability: of the images made from prompts that ask for something the concept leaves open, the fraction that
  shows it, and separately the fraction that shows it AND still shows the concept. Prompt kinds (values from the
  world's vocabulary): background "a * on a {black, blue, green, yellow} background" (less the concept's colour,
  which the world never puts on its own colour), count "{two, three} *", colour "a {red, green, blue, purple} *"
  and texture "a {striped, dotted} *", the last two only for concepts that leave colour or texture open.

The same prompts and the same sampling noise are run for three vectors of the placeholder: ours (the learned
vectors), the init-word baseline (the initializer word's token-embedding row, i.e. the prompt with the word itself)
and the random baseline (as many vectors as ours, drawn from N(mean, std) of the token table per dimension), both
built as training starts a word (`initial_vectors` in ldm/modules/embedding_manager.py).

Example:
  python scripts/evaluate_toy.py --embedding_path logs/heart/checkpoints/embeddings.pt --concept heart \
      --grid heart_grid.png
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from ldm.cli import default_device, parse_device, require_at_least
from ldm.data.procedural import HELD_OUT_CONCEPTS, HeldOutConcept, held_out_concept
from ldm.embeddings import Embeddings, load_embeddings
from ldm.evaluation.world_classifier import load_classifier
from ldm.generate import check_ddim_steps, config_timesteps, first_stage_factor, generate, load_model
from ldm.images import log_txt_as_img, make_grid, tensor_to_pil
from ldm.modules.embedding_manager import initial_vectors
from ldm.paths import check_output, require_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shipped toy model and classifier, found from any working folder.
DEFAULT_CONFIG = os.path.join(REPO, "configs", "toy", "finetune.yaml")
DEFAULT_CKPT = os.path.join(REPO, "models", "ldm", "toy", "model.safetensors")
DEFAULT_CLASSIFIER = os.path.join(REPO, "models", "ldm", "toy", "world_classifier.safetensors")

FIDELITY_TEMPLATES = ("a photo of {}", "a {}")
EDIT_VALUES = {
    "background": ("black", "blue", "green", "yellow"),
    "count": ("two", "three"),
    "color": ("red", "green", "blue", "purple"),
    "texture": ("striped", "dotted"),
}
EDIT_TEMPLATES = {
    "background": "a {placeholder} on a {value} background",
    "count": "{value} {placeholder}",
    "color": "a {value} {placeholder}",
    "texture": "a {value} {placeholder}",
}
CONDITIONS = ("ours", "init_word", "random")
DDIM_ETA = 0.0  # deterministic DDIM, as in the paper's evaluation protocol
GRID_IMAGES = 4  # per prompt and condition in the --grid picture
GRID_LABEL_WIDTH = 4  # image widths for the prompt text at the start of each --grid row
COLUMN_TITLES = {"fidelity": "fidelity", "background": "background edit", "count": "count edit",
                 "color": "colour edit", "texture": "texture edit"}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the evaluation; `attribute`/`value` name what an edit prompt asks for (None for fidelity)."""

    kind: str
    text: str
    attribute: str | None = None
    value: str | None = None


def evaluation_prompts(concept: HeldOutConcept, placeholder: str = "*") -> list[EvalPrompt]:
    """The fidelity prompts, then every edit prompt that asks for something the concept leaves open."""
    prompts = [EvalPrompt("fidelity", template.format(placeholder)) for template in FIDELITY_TEMPLATES]
    fixed = {"color": concept.color, "texture": concept.texture}
    for kind, values in EDIT_VALUES.items():
        if fixed.get(kind) is not None:
            continue
        for value in values:
            if kind == "background" and value == concept.color:
                continue
            text = EDIT_TEMPLATES[kind].format(placeholder=placeholder, value=value)
            prompts.append(EvalPrompt(kind, text, kind, value))
    return prompts


def recognised(predictions: dict, concept: HeldOutConcept) -> list[bool]:
    """Per image: does the classifier see the concept (its shape, and its colour/texture where it fixes them)?"""
    required = {"shape": concept.shape, "color": concept.color, "texture": concept.texture}
    required = {attribute: value for attribute, value in required.items() if value is not None}
    count = len(predictions["shape"])
    return [all(predictions[attribute][i] == value for attribute, value in required.items()) for i in range(count)]


def asked_present(predictions: dict, attribute: str, value: str) -> list[bool]:
    """Per image: does the classifier see the attribute value the prompt asked for?"""
    return [label == value for label in predictions[attribute]]


def _fraction(flags: list[bool]) -> float:
    if not flags:
        raise ValueError("there are no images to score: --n_samples must be at least 1")
    return sum(flags) / len(flags)


def score_condition(prompts: list[EvalPrompt], predictions: list[dict], concept: HeldOutConcept) -> dict:
    """Pool the images of all prompts of a kind: {"fidelity": f, kind: {"asked": a, "asked_and_concept": b}},
    plus the same numbers per prompt under "per_prompt"."""
    pooled: dict[str, dict[str, list[bool]]] = {}
    per_prompt = {}
    for prompt, prediction in zip(prompts, predictions, strict=True):
        concept_seen = recognised(prediction, concept)
        if prompt.attribute is None:
            flags = {"recognised": concept_seen}
        else:
            asked = asked_present(prediction, prompt.attribute, prompt.value)
            flags = {"asked": asked, "asked_and_concept": [a and c for a, c in zip(asked, concept_seen)]}
        for name, values in flags.items():
            pooled.setdefault(prompt.kind, {}).setdefault(name, []).extend(values)
        per_prompt[prompt.text] = {"recognised": _fraction(concept_seen)} | {
            name: _fraction(values) for name, values in flags.items()}
    scores = {kind: {name: _fraction(values) for name, values in flags.items()} for kind, flags in pooled.items()}
    scores["fidelity"] = scores["fidelity"]["recognised"]
    scores["per_prompt"] = per_prompt
    return scores


def default_init_word(embeddings: Embeddings, placeholder: str, path: str) -> str:
    """The initializer word the embedding file records for `placeholder`."""
    word = embeddings.initializer_word(placeholder)
    if not word:
        raise ValueError(f"embedding file '{path}' records no initializer word for '{placeholder}': pass --init_word")
    return word


def condition_vectors(model, embeddings: Embeddings, placeholder: str, init_word: str, seed: int) -> dict:
    """The placeholder's vectors under each condition. The baselines are built as training starts a word
    (`initial_vectors`): the init word's row once, so that the placeholder reads exactly as the word itself, and as
    many random vectors as ours, the same for a given seed on every device."""
    learned = embeddings.vectors[placeholder]
    embedder = model.cond_stage_model
    try:
        init_word_vectors = initial_vectors(embedder, init_word, 1)
    except ValueError as error:
        raise ValueError(f"--init_word: {error}") from None
    random = initial_vectors(embedder, None, learned.shape[0], torch.Generator().manual_seed(seed))
    return {"ours": learned, "init_word": init_word_vectors, "random": random}


def classify(classifier, images: list[torch.Tensor], prompts: list[EvalPrompt], n_samples: int) -> list[dict]:
    """The classifier's predictions for each prompt's n_samples images (generated in prompt order)."""
    predictions = []
    for index in range(len(prompts)):
        batch = torch.stack(images[index * n_samples:(index + 1) * n_samples]) * 2.0 - 1.0
        predictions.append(classifier.predict(batch))
    return predictions


def comparison_grid(images: dict, prompts: list[EvalPrompt], n_samples: int) -> torch.Tensor:
    """(3, H, W) in [0, 1]: one row per prompt, its text, then the first GRID_IMAGES images of each condition
    (in CONDITIONS order, blocks a blank image apart)."""
    side = next(iter(images.values()))[0].shape[-1]
    per_cell = min(GRID_IMAGES, n_samples)
    blank = torch.ones(1, 3, side, side)
    labels = (log_txt_as_img((GRID_LABEL_WIDTH * side, side), [p.text for p in prompts]) + 1.0) / 2.0
    rows = []
    for index, label in enumerate(labels):
        start, tiles = index * n_samples, []
        for condition in CONDITIONS:
            tiles += [blank, torch.stack(images[condition][start:start + per_cell])]
        row = make_grid(torch.cat(tiles[1:]), nrow=len(CONDITIONS) * (per_cell + 1), padding=0)
        rows.append(torch.cat([label, row], dim=-1))
    return make_grid(torch.stack(rows), nrow=1, padding=2)


def check_outputs(args) -> None:
    """Fail on the output paths before any image is generated."""
    check_output(args.out, "--out")
    if args.grid:
        if os.path.splitext(args.grid)[1].lower() not in Image.registered_extensions():
            raise ValueError(f"--grid '{args.grid}' has no image file extension: end it in .png")
        check_output(args.grid, "--grid")
        if os.path.realpath(args.grid) == os.path.realpath(args.out):
            raise ValueError(f"--grid '{args.grid}' is also --out: the picture would replace the results; pass "
                             "another --grid")


def evaluate(args) -> tuple[dict, torch.Tensor | None]:
    """Generate and score every condition: the JSON-able results with the settings, and the --grid picture
    (None without --grid)."""
    require_at_least(1, n_samples=args.n_samples, batch_size=args.batch_size)
    check_ddim_steps(args.ddim_steps, config_timesteps(args.config))
    device = parse_device(args.device)
    concept = held_out_concept(args.concept)
    embeddings = load_embeddings(args.embedding_path)
    if args.placeholder not in embeddings.vectors:
        raise ValueError(f"embedding file '{args.embedding_path}' has no '{args.placeholder}' "
                         f"(it holds {', '.join(embeddings.vectors)}): pass --placeholder")
    init_word = args.init_word or default_init_word(embeddings, args.placeholder, args.embedding_path)
    require_file(args.classifier, "--classifier",
                 f"pass the world classifier's weights, shipped as {DEFAULT_CLASSIFIER}")
    classifier = load_classifier(args.classifier, device)
    model = load_model(args.config, args.ckpt, device, embedding_paths=[args.embedding_path])
    side = model.image_size * first_stage_factor(model)
    prompts = evaluation_prompts(concept, args.placeholder)
    texts = [prompt.text for prompt in prompts for _ in range(args.n_samples)]
    results, images = {}, {}
    for condition, vectors in condition_vectors(model, embeddings, args.placeholder, init_word, args.seed).items():
        print(f"evaluate_toy: {condition}: generating and classifying {len(texts)} images", file=sys.stderr, flush=True)
        model.embedding_manager.set_embeddings(Embeddings({**embeddings.vectors, args.placeholder: vectors}),
                                               source=f"the {condition} condition")
        images[condition] = generate(model, texts, n_samples=args.batch_size, n_iter=1, steps=args.ddim_steps,
                                     scale=args.scale, eta=DDIM_ETA, seed=args.seed, height=side, width=side,
                                     precision="full", progress=False)
        predictions = classify(classifier, images[condition], prompts, args.n_samples)
        results[condition] = score_condition(prompts, predictions, concept)
    settings = {
        "config": args.config, "ckpt": args.ckpt, "embedding_path": args.embedding_path, "classifier": args.classifier,
        "placeholder": args.placeholder, "init_word": init_word, "n_samples": args.n_samples,
        "batch_size": args.batch_size, "ddim_steps": args.ddim_steps, "ddim_eta": DDIM_ETA, "scale": args.scale,
        "seed": args.seed, "image_size": side, "device": str(device),
    }
    report = {"concept": asdict(concept), "settings": settings, "prompts": [asdict(p) for p in prompts],
              "results": results}
    return report, comparison_grid(images, prompts, args.n_samples) if args.grid else None


def markdown_table(report: dict) -> str:
    """Rows ours / init word / random; edit cells read "asked (asked and concept recognised)"."""
    kinds = [kind for kind in COLUMN_TITLES if kind in report["results"]["ours"]]
    labels = {"ours": "ours", "init_word": f"init word ({report['settings']['init_word']})", "random": "random"}
    lines = ["| condition | " + " | ".join(COLUMN_TITLES[kind] for kind in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for condition in CONDITIONS:
        scores = report["results"][condition]
        cells = [f"{scores['fidelity']:.3f}"] + [
            f"{scores[kind]['asked']:.3f} ({scores[kind]['asked_and_concept']:.3f})" for kind in kinds[1:]]
        lines.append(f"| {labels[condition]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Edit cells: fraction showing the asked attribute (in brackets: showing it and the concept too).")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", default=DEFAULT_CONFIG, help="model config (default: the repository's configs/toy/finetune.yaml)")
    add("--ckpt", default=DEFAULT_CKPT,
        help="toy model checkpoint (default: the repository's models/ldm/toy/model.safetensors)")
    add("--embedding_path", required=True, help="embedding file with the learned word")
    add("--concept", required=True, choices=sorted(HELD_OUT_CONCEPTS), help="the held-out concept the word learned")
    add("--classifier", default=DEFAULT_CLASSIFIER,
        help="world classifier weights (default: the repository's models/ldm/toy/world_classifier.safetensors)")
    add("--placeholder", default="*", help="the learned word in the prompts (default: %(default)s)")
    add("--init_word", help="word of the init-word baseline (default: the embedding file's initializer word)")
    add("--n_samples", type=int, default=32, help="images per prompt and condition (default: %(default)s)")
    add("--batch_size", type=int, default=64, help="images generated at once (default: %(default)s)")
    add("--ddim_steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    add("--scale", type=float, default=5.0, help="classifier-free guidance scale (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the sampling noise and the random baseline (default: %(default)s)")
    add("--out", default="results.json", help="JSON file for the results (default: %(default)s)")
    add("--grid", help="also write a PNG: per prompt, the first images of ours, the init word and random")
    add("--device", default=default_device(), help="device to run on (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_outputs(args)
        report, grid = evaluate(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        if grid is not None:
            os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
            tensor_to_pil(grid).save(args.grid)
    except (ValueError, OSError) as error:
        print(f"evaluate_toy: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(markdown_table(report))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
