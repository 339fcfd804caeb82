"""Rebuild bert-base-uncased's WordPiece `vocab.txt` from the id-to-text model in the `blingfire` wheel.

The package ships the result (`ldm/modules/encoders/vocab/bert-base-uncased-vocab.txt`) so that the LDM-BERT
tokenizer needs no download; this script only documents and reproduces where that file came from.
blingfire has no plain vocabulary, but it can decode any id: a token decoded after the word "a" is separated from
it by a space exactly when it starts a word, otherwise it is a `##` continuation piece.

Usage: python scripts/build_bert_vocab.py [output_path]
"""
import hashlib
import os
import sys

import blingfire
import numpy as np

VOCAB_SIZE = 30522
ID_OF_A = 1037
EXPECTED_MD5 = "64800d5d8528ce344256daf115d4965e"
# blingfire lowercases these special tokens when decoding; bert-base-uncased spells them in capitals.
UPPERCASE_SPECIALS = {"[unk]", "[cls]", "[sep]", "[mask]"}
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "ldm", "modules", "encoders", "vocab", "bert-base-uncased-vocab.txt",
)


def decode(handle, ids) -> str:
    return blingfire.ids_to_text(handle, np.asarray(ids, dtype=np.uint32), skip_special_tokens=False)


def vocab_entry(handle, token_id: int) -> str:
    """The vocab.txt spelling of one id: its text, with `##` when it continues a word."""
    alone = decode(handle, [token_id])
    if alone in UPPERCASE_SPECIALS:
        return alone.upper()
    after_a = decode(handle, [ID_OF_A, token_id])
    if after_a == "a " + alone:
        return alone
    if after_a == "a" + alone:
        return "##" + alone
    raise RuntimeError(f"id {token_id}: cannot tell word start from piece ({alone!r} vs {after_a!r})")


def build_vocab_text() -> str:
    model_path = os.path.join(os.path.dirname(blingfire.__file__), "bert_base_tok.i2w")
    handle = blingfire.load_model(model_path)
    try:
        return "".join(vocab_entry(handle, i) + "\n" for i in range(VOCAB_SIZE))
    finally:
        blingfire.free_model(handle)


def main(output_path: str = DEFAULT_OUTPUT) -> None:
    data = build_vocab_text().encode("utf-8")
    digest = hashlib.md5(data).hexdigest()
    if digest != EXPECTED_MD5:
        raise SystemExit(f"built vocab has md5 {digest}, expected {EXPECTED_MD5}; is blingfire 0.1.8 installed?")
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    with open(output_path, "wb") as handle:
        handle.write(data)
    print(f"wrote {output_path} ({len(data)} bytes, md5 {digest})")


if __name__ == "__main__":
    main(*sys.argv[1:])
