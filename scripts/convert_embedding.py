r"""Convert a textual-inversion embedding between the original, diffusers and AUTOMATIC1111 file formats.

Reads every layout `ldm.embeddings` recognises (original / A1111 `.pt`, A1111 PNG, diffusers `.bin` /
`.safetensors`, `emb_params`) and writes the chosen one; the output extension picks `.pt`/`.bin` or `.safetensors`.
diffusers adds the placeholder to its tokenizer as a new token, so a placeholder its CLIP vocabulary already holds
(the original's "*", any single character) has to be renamed with --token on the way there. An original-format
file records each placeholder's tokenizer id, as the original's loader needs (a placeholder of several tokens,
such as diffusers' "<cat-toy>", has none: a note says so).

Example:
  python scripts/convert_embedding.py --input logs/cat/checkpoints/embeddings.pt \
      --output cat-toy/learned_embeds.safetensors --format diffusers --token "<cat-toy>"
"""
import argparse
import os
import sys

from ldm.embeddings import FORMATS, Embeddings, load_embeddings, save_embeddings
from ldm.modules.encoders.tokenizers import clip_tokenizer, family_tokenizer, ordinary_token_id
from ldm.paths import check_output
from ldm.text_encoders import SD_V1_WIDTH, model_family, model_family_of_width, width_label


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="embedding file to read (.pt, .bin, .safetensors, .png)")
    parser.add_argument("--output", required=True, help="file to write; .safetensors or .pt/.bin decides the container")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of the output file")
    parser.add_argument("--token", help="new placeholder/token for a single-placeholder embedding, e.g. '<cat-toy>'")
    parser.add_argument("--name", help="with --format a1111: its 'name' entry, the word diffusers and this project "
                                       "read (A1111 reads the file name); default: --token, else the file name")
    return parser.parse_args(argv)


def renamed(embeddings: Embeddings, token: str) -> Embeddings:
    """The one placeholder of `embeddings` renamed to `token`."""
    if len(embeddings.vectors) != 1:
        raise ValueError(
            f"--token renames a single placeholder, but the input holds {len(embeddings.vectors)} "
            f"({', '.join(embeddings.vectors)})"
        )
    return embeddings.renamed(next(iter(embeddings.vectors)), token)


def with_token_ids(embeddings: Embeddings, tokenizer) -> Embeddings:
    """Record the tokenizer id of each placeholder that is one token of `tokenizer`, its model's (the original's
    loader finds placeholders by id)."""
    token_ids = dict(embeddings.token_ids)
    for placeholder in set(embeddings.vectors) - set(token_ids):
        token_id = ordinary_token_id(tokenizer, placeholder)
        if token_id is not None:
            token_ids[placeholder] = token_id
    return Embeddings(embeddings.vectors, token_ids, embeddings.metadata)


def check_new_clip_tokens(embeddings: Embeddings, source: str):
    """diffusers adds the token to its CLIP tokenizer and refuses one the vocabulary already holds."""
    vocabulary = clip_tokenizer().get_vocab()
    for placeholder in embeddings.vectors:
        if placeholder in vocabulary:
            raise ValueError(
                f"'{source}' uses the placeholder '{placeholder}', which is already in the CLIP tokenizer's "
                "vocabulary, so diffusers cannot add it as a new token: pass --token, e.g. --token '<my-concept>'"
            )


def convert(args: argparse.Namespace) -> Embeddings:
    """Write the converted file and return it as read back, so the report shows what loaders will see."""
    check_output(args.output, "--output")
    if os.path.exists(args.output) and not args.force:
        raise ValueError(f"--output '{args.output}' already exists: pass another --output, or --force to replace it")
    for flag, word in (("--token", args.token), ("--name", args.name)):
        if word is not None and not word.strip():  # else taken as not given, and the error would ask for it
            raise ValueError(f"{flag} is empty: pass a word, e.g. {flag} '<cat-toy>', or leave {flag} out")
    if args.name and args.format != "a1111":
        raise ValueError("--name sets the 'name' entry of the a1111 format: use it with --format a1111, or rename "
                         "the placeholder with --token")
    folder, file_name = os.path.split(args.output)
    stem, suffix = os.path.splitext(file_name)
    if args.format == "a1111" and suffix.lower() == ".safetensors":
        for flag, word in (("--token", args.token), ("--name", args.name)):
            if word and word != stem:
                raise ValueError(f"{flag} '{word}': an a1111 .safetensors file holds only the vectors (emb_params) "
                                 f"and its word is the file name, here '{stem}': name the file "
                                 f"'{os.path.join(folder, word + suffix)}' instead, or write a .pt")
    embeddings = load_embeddings(args.input)
    if args.token:
        embeddings = renamed(embeddings, args.token)
    if args.name:
        embeddings.metadata["name"] = args.name
    elif args.format == "a1111" and not args.token:  # the word A1111 reads, the file name, for every reader
        embeddings.metadata["name"] = stem
    if args.format != "original" and model_family_of_width(embeddings.dim) == "ldm":
        print(f"convert_embedding: warning: '{args.input}' holds {width_label(embeddings.dim)} vectors; diffusers "
              f"and A1111 run SD models ({width_label(SD_V1_WIDTH)} for SD v1), which cannot use them", file=sys.stderr)
    if args.format == "diffusers":
        check_new_clip_tokens(embeddings, args.input)
    family = model_family(embeddings.dim, embeddings.metadata.get("model_family"))
    if args.format == "original" and family is not None:
        embeddings = with_token_ids(embeddings, family_tokenizer(family))
        for placeholder in sorted(set(embeddings.vectors) - set(embeddings.token_ids)):
            print(f"convert_embedding: note: '{placeholder}' is not one token of its model's tokenizer, so the original "
                  "repository's scripts cannot use it (this project's read it as written in prompts); --token '*' "
                  "makes it one", file=sys.stderr)
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
