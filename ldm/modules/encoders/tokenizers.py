"""Offline construction of the two text tokenizers, so that nothing is fetched from the Hugging Face hub.

CLIP (SD v1): the BPE table of openai/clip-vit-large-patch14 is the `bpe_simple_vocab_16e6.txt.gz` that
open_clip_torch installs; from it we build a transformers `CLIPTokenizer` with the same 49,408 ids
(bos 49406, eos 49407, pad 49407 as in SD v1).
BERT (LDM): the bert-base-uncased WordPiece vocabulary ships with this package (see `scripts/build_bert_vocab.py`).
"""
import functools
import gzip
import importlib.util
import os

import ftfy
import regex
from transformers import BertTokenizerFast, CLIPTokenizer

CLIP_CONTEXT_LENGTH = 77
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The first line of the BPE file is a version header; CLIP keeps the next 49152 - 256 - 2 merges.
CLIP_MERGE_COUNT = 49152 - 256 - 2
BERT_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab", "bert-base-uncased-vocab.txt")
TOKENIZER_NAMES = {"sd-v1": "CLIP (SD v1)", "ldm": "BERT (LDM)"}  # by model family, for messages


def clean_clip_text(text: str) -> str:
    """The cleaning SD v1's slow CLIP tokenizer applied before BPE; the transformers 5 tokenizer skips it.

    Without it curly quotes, HTML entities and ligatures give different ids than the ones SD v1 was trained on.
    """
    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip()


def is_clip(tokenizer) -> bool:
    return type(tokenizer).__name__.startswith("CLIP")


def tokenizer_family(tokenizer) -> str | None:
    """The model family whose stock tokenizer is of `tokenizer`'s kind (the inverse of `family_tokenizer`)."""
    if is_clip(tokenizer):
        return "sd-v1"
    return "ldm" if type(tokenizer).__name__.startswith("Bert") else None


def text_token_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` without special tokens or padding; CLIP text is cleaned first, as SD v1's tokenizer did. Not
    truncated, so transformers' warning of a sequence longer than the model reads is silenced (callers count)."""
    return tokenizer(clean_clip_text(text) if is_clip(tokenizer) else text, add_special_tokens=False,
                     verbose=False).input_ids


def ordinary_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when it is one ordinary token, the only kind a placeholder or initializer word can be:
    not split, not unknown (every unknown string shares [UNK]), not special ([PAD], [CLS], CLIP's EOS)."""
    ids = text_token_ids(tokenizer, text)
    return ids[0] if len(ids) == 1 and ids[0] not in tokenizer.all_special_ids else None


def token_pieces(tokenizer, text: str) -> list[str]:
    """The tokens `text` becomes, as an error shows them (without CLIP's end-of-word mark)."""
    ids = text_token_ids(tokenizer, text)
    return [piece.removesuffix("</w>") for piece in tokenizer.convert_ids_to_tokens(ids)]


def one_token_problem(tokenizer, text: str) -> str | None:
    """Why `text` cannot be a placeholder or an initializer word, which must be one ordinary token
    (`ordinary_token_id`); None when it can. One wording for the EmbeddingManager and for merging files."""
    if ordinary_token_id(tokenizer, text) is not None:
        return None
    ids, pieces = text_token_ids(tokenizer, text), token_pieces(tokenizer, text)
    if not ids:
        return "maps to no token"
    if ids == [tokenizer.unk_token_id]:
        return f"is unknown to the tokenizer (it becomes {pieces[0]})"
    if len(ids) == 1:
        return f"is the tokenizer's special token {pieces[0]}"
    name = TOKENIZER_NAMES.get(tokenizer_family(tokenizer), type(tokenizer).__name__)
    return f"is not one {name} token (it becomes {pieces})"


def _byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet in id order: printable bytes as themselves, then the others as chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable_count = 256 - len(printable)
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(unprintable_count)]


def _open_clip_bpe_path() -> str:
    """Locate open_clip's BPE file without importing open_clip (its import takes seconds)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the CLIP vocabulary comes from open_clip_torch's {CLIP_BPE_FILE}; install open_clip_torch "
            "or pass tokenizer_path= pointing at a local CLIP tokenizer folder"
        )
    return os.path.join(spec.submodule_search_locations[0], CLIP_BPE_FILE)


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Parse the BPE file once per process; tokenizers built from it are cheap and independent."""
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1:CLIP_MERGE_COUNT + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    symbols = _byte_symbols()
    merged = ["".join(pair) for pair in merges]
    tokens = symbols + [s + "</w>" for s in symbols] + merged + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(tokenizer_path: str | None = None) -> CLIPTokenizer:
    """A fresh CLIP tokenizer: openai/clip-vit-large-patch14's ids by default, or the user's local tokenizer folder.

    Each call returns a new object, so adding tokens to one conditioner's tokenizer never leaks into another's.
    """
    if tokenizer_path is not None:
        if not os.path.isdir(tokenizer_path):
            raise ValueError(f"tokenizer_path '{tokenizer_path}' is not a folder holding a Hugging Face CLIP tokenizer")
        return CLIPTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_CONTEXT_LENGTH)


def bert_tokenizer(vocab_path: str | None = None, max_length: int = 77) -> BertTokenizerFast:
    """A lowercasing WordPiece tokenizer from a `vocab.txt` (the shipped bert-base-uncased one by default)
    or from a local Hugging Face tokenizer folder."""
    vocab_path = vocab_path or BERT_VOCAB_FILE
    if os.path.isdir(vocab_path):
        return BertTokenizerFast.from_pretrained(vocab_path, local_files_only=True, model_max_length=max_length)
    if not os.path.isfile(vocab_path):
        raise ValueError(f"BERT vocabulary '{vocab_path}' does not exist; pass a vocab.txt file or a tokenizer folder")
    with open(vocab_path, encoding="utf-8") as handle:
        vocab = {line.rstrip("\n"): index for index, line in enumerate(handle)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=max_length)


def family_tokenizer(model_family: str):
    """The stock tokenizer of a model family as embedding files record it: "sd-v1" CLIP, "ldm" BERT."""
    if model_family not in ("sd-v1", "ldm"):
        raise ValueError(f"model family '{model_family}' has no tokenizer here; use 'sd-v1' or 'ldm'")
    return clip_tokenizer() if model_family == "sd-v1" else bert_tokenizer()
