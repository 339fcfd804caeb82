"""Convert a textual-inversion embedding between the original, diffusers and AUTOMATIC1111 file formats.

Reads every layout `ldm.embeddings` recognises (original / A1111 `.pt`, A1111 PNG, diffusers `.bin` /
`.safetensors`, `emb_params`) and writes the chosen one; the output extension picks `.pt`/`.bin` or `.safetensors`.
diffusers adds the placeholder to its tokenizer as a new token, so the original's "*" (already a CLIP word) has to
be renamed with --token on the way there.

Example:
  python scripts/convert_embedding.py --input logs/cat/checkpoints/embeddings.pt \
      --output cat-toy/learned_embeds.safetensors --format diffusers --token "<cat-toy>"
"""
import argparse
import sys

from ldm.embeddings import FORMATS, Embeddings, load_embeddings, save_embeddings
from ldm.paths import check_output

# diffusers refuses to add a token its tokenizer already has, and "*" is one of CLIP's words.
CLIP_WORD_PLACEHOLDER = "*"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="embedding file to read (.pt, .bin, .safetensors, .png)")
    parser.add_argument("--output", required=True, help="file to write; .safetensors or .pt/.bin decides the container")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of the output file")
    parser.add_argument("--token", help="new placeholder/token for a single-placeholder embedding, e.g. '<cat-toy>'")
    parser.add_argument("--name", help="name to record: A1111's 'name' entry, which diffusers uses as the token")
    return parser.parse_args(argv)


def renamed(embeddings: Embeddings, token: str) -> Embeddings:
    """The same vectors under `token`; a recorded tokenizer id belonged to the old string, so it is dropped."""
    if len(embeddings.vectors) != 1:
        raise ValueError(
            f"--token renames a single placeholder, but the input holds {len(embeddings.vectors)} "
            f"({', '.join(embeddings.vectors)})"
        )
    ((placeholder, vectors),) = embeddings.vectors.items()
    token_ids = embeddings.token_ids if token == placeholder else {}
    return Embeddings({token: vectors}, token_ids, dict(embeddings.metadata))


def convert(args: argparse.Namespace) -> Embeddings:
    """Write the converted file and return it as read back, so the report shows what loaders will see."""
    check_output(args.output, "--output")
    embeddings = load_embeddings(args.input)
    if args.token:
        embeddings = renamed(embeddings, args.token)
    if args.name:
        embeddings.metadata["name"] = args.name
    if args.format == "diffusers" and CLIP_WORD_PLACEHOLDER in embeddings.vectors:
        raise ValueError(
            f"'{args.input}' uses the placeholder '{CLIP_WORD_PLACEHOLDER}', which is already a word of the CLIP "
            "tokenizer and cannot be added as a diffusers token: pass --token, e.g. --token '<my-concept>'"
        )
    save_embeddings(embeddings, args.output, format=args.format)
    return load_embeddings(args.output)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        embeddings = convert(args)
    except (ValueError, OSError) as error:
        print(f"convert_embedding: error: {error}", file=sys.stderr)
        return 1
    for token, vectors in embeddings.vectors.items():
        print(f"{token}: {vectors.shape[0]} x {vectors.shape[1]} -> {args.output} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
