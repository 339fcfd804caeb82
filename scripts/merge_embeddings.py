"""Merge several textual-inversion embedding files into one, so one prompt can combine concepts
("a photo of * in the style of @").

The text-encoder family is read from the files: 768-wide vectors are SD v1 (CLIP tokenizer), 1280-wide are LDM
(BERT tokenizer); other widths use the family the files' metadata records, else -sd picks CLIP and its absence
BERT, as in the original script. Every merged placeholder must be one token of that tokenizer and differ from the
others in string and token id. Placeholders may hold different numbers of vectors; all files must be equally wide.
Each placeholder keeps the initializer word its file records (under its merged name); the output may not be an input,
and an existing output is replaced only with --force.

Conflicts (a placeholder already taken, or not a single token) are resolved with --rename N:OLD=NEW, which renames
placeholder OLD of the N-th file of --manager_ckpts (counted from 1) to NEW; OLD may not contain '='. Without a
--rename for it, a conflict is asked about at the terminal, or is an error when stdin is not a terminal.

Example:
  python scripts/merge_embeddings.py --manager_ckpts cat.pt style.pt --rename 2:*=@ --output_path cat_style.pt
"""
import argparse
import os
import sys

from ldm.embeddings import Embeddings, common_width, load_embeddings, merge_embeddings, save_embeddings
from ldm.modules.encoders.tokenizers import TOKENIZER_NAMES, family_tokenizer, one_token_problem, ordinary_token_id
from ldm.paths import check_output
from ldm.text_encoders import model_family, width_label


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manager_ckpts", nargs="+", required=True, help="embedding files to merge, in order")
    parser.add_argument("--output_path", required=True, help="merged file to write (.pt, the original layout)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output_path")
    parser.add_argument("-sd", "--stable_diffusion", action="store_true",
                        help="the files are for SD v1 (CLIP tokenizer); only needed when their width does not say so")
    parser.add_argument("--rename", action="append", default=[], metavar="N:OLD=NEW",
                        help="rename placeholder OLD of the N-th input file (from 1) to NEW; repeatable")
    return parser.parse_args(argv)


def parse_renames(specs: list[str], file_count: int) -> dict[tuple[int, str], str]:
    """{(file number, old placeholder): new placeholder} from the --rename N:OLD=NEW flags."""
    renames = {}
    for spec in specs:
        number, colon, names = spec.partition(":")
        old, equals, new = names.partition("=")
        if not (colon and equals and number.isdigit() and old and new):
            raise ValueError(f"--rename '{spec}' is not N:OLD=NEW, e.g. --rename 2:*=@")
        if not 1 <= int(number) <= file_count:
            raise ValueError(f"--rename '{spec}': file number {number} is not between 1 and {file_count}")
        key = (int(number), old)
        if key in renames:
            raise ValueError(f"--rename gives placeholder '{old}' of file {number} two new names")
        renames[key] = new
    return renames


def choose_family(width: int, files: list[Embeddings], stable_diffusion: bool) -> str:
    """The family ("sd-v1" or "ldm") from the width, else from the files' recorded model family, else from -sd."""
    recorded = {embeddings.metadata.get("model_family") for embeddings in files} - {None}
    family = model_family(width, next(iter(recorded)) if len(recorded) == 1 else None)
    if family is None and len(recorded) > 1:
        raise ValueError(f"the files record different model families ({', '.join(sorted(recorded))}); merge one kind")
    family = family or ("sd-v1" if stable_diffusion else "ldm")
    if stable_diffusion and family != "sd-v1":
        raise ValueError(
            f"-sd asks for the CLIP tokenizer, but the files are {width_label(width)} embeddings for "
            f"{TOKENIZER_NAMES[family]}: drop -sd"
        )
    return family


class MergedPlaceholders:
    """The placeholders merged so far, checked against one tokenizer as the EmbeddingManager will check them."""

    def __init__(self, family: str):
        self.family = family
        self.tokenizer = family_tokenizer(family)
        self.token_ids: dict[str, int] = {}
        self.sources: dict[str, str] = {}

    def problem(self, name: str) -> str | None:
        """Why `name` cannot join the merged placeholders, or None when it can."""
        problem = one_token_problem(self.tokenizer, name)
        if problem is not None:
            return problem
        token = ordinary_token_id(self.tokenizer, name)
        if name in self.sources:
            return f"is already taken by '{self.sources[name]}'"
        for other, token_id in self.token_ids.items():
            if token_id == token:
                return f"is the same token as '{other}' from '{self.sources[other]}'"
        return None

    def add(self, name: str, source: str):
        self.token_ids[name] = ordinary_token_id(self.tokenizer, name)
        self.sources[name] = source


def resolve_name(placeholder: str, path: str, number: int, renamed_to: str | None, merged: MergedPlaceholders,
                 interactive: bool, input_fn) -> str:
    """The name under which a file's placeholder is merged: its own, its --rename, or one typed at the terminal."""
    name = renamed_to or placeholder
    problem = merged.problem(name)
    if problem is None:
        return name
    if renamed_to is not None:
        raise ValueError(f"--rename {number}:{placeholder}={renamed_to}: '{renamed_to}' {problem}; choose another NEW")
    if not interactive:
        raise ValueError(
            f"placeholder '{placeholder}' of '{path}' {problem}: pass --rename {number}:{placeholder}=NEW "
            "with a NEW that is one token"
        )
    prompt = f"Placeholder '{placeholder}' of '{path}' {problem}. Enter a replacement: "
    while True:
        try:
            name = input_fn(prompt).strip()
        except KeyboardInterrupt:  # Ctrl-C at the prompt is no answer, as Ctrl-D is
            raise EOFError from None
        problem = merged.problem(name)
        if problem is None:
            return name
        prompt = f"'{name}' {problem}. Enter another replacement: "


def merge(paths: list[str], renames: dict[tuple[int, str], str], stable_diffusion: bool, interactive: bool,
          input_fn) -> Embeddings:
    """The merged embeddings, each placeholder under the name it resolves to, with this family's token ids."""
    files = [(path, load_embeddings(path)) for path in paths]
    for (number, old), new in renames.items():
        path, embeddings = files[number - 1]
        if old not in embeddings.vectors:
            raise ValueError(f"--rename {number}:{old}={new}: '{path}' has no placeholder '{old}' "
                             f"(it has {', '.join(embeddings.vectors)})")
    family = choose_family(common_width(files), [embeddings for _, embeddings in files], stable_diffusion)
    merged = MergedPlaceholders(family)
    names = []  # per file, {placeholder: merged name}
    for number, (path, embeddings) in enumerate(files, start=1):
        file_names = {}
        for placeholder in embeddings.vectors:
            name = resolve_name(placeholder, path, number, renames.get((number, placeholder)), merged,
                                interactive, input_fn)
            merged.add(name, path)
            file_names[placeholder] = name
        names.append(file_names)
    combined = merge_embeddings(files, names)
    return Embeddings(combined.vectors, merged.token_ids, {"model_family": family, **combined.metadata})


def main(argv=None, input_fn=input) -> int:
    args = parse_args(argv)
    try:
        check_output(args.output_path, "--output_path")
        if any(os.path.realpath(path) == os.path.realpath(args.output_path) for path in args.manager_ckpts):
            raise ValueError(f"--output_path '{args.output_path}' is also one of --manager_ckpts, which would be "
                             "replaced: pass another --output_path")
        if os.path.exists(args.output_path) and not args.force:
            raise ValueError(f"--output_path '{args.output_path}' already exists: pass another --output_path, or "
                             "--force to replace it")
        renames = parse_renames(args.rename, len(args.manager_ckpts))
        embeddings = merge(args.manager_ckpts, renames, args.stable_diffusion, sys.stdin.isatty(), input_fn)
        save_embeddings(embeddings, args.output_path, format="original")
    except EOFError:
        print("merge_embeddings: error: no replacement placeholder was entered, nothing was written; pass "
              "--rename N:OLD=NEW", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"merge_embeddings: error: {error}", file=sys.stderr)
        return 1
    for name, source in embeddings.metadata["merged_from"].items():
        renamed = f" (was '{source['placeholder']}')" if source["placeholder"] != name else ""
        print(f"{name}: {source['file']}{renamed}")
    print(f"wrote {len(embeddings.vectors)} placeholders to {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
