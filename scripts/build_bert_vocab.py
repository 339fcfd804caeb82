"""Rebuild bert-base-uncased's WordPiece `vocab.txt` from the id-to-text model in the `blingfire` wheel.

The package ships the result (`ldm/modules/encoders/vocab/bert-base-uncased-vocab.txt`) so that the LDM-BERT
tokenizer needs no download; this script only documents and reproduces where that file came from.
blingfire has no plain vocabulary, but it can decode any id: a token decoded after the word "a" is separated from
it by a space exactly when it starts a word, otherwise it is a `##` continuation piece.

Usage: python scripts/build_bert_vocab.py [output_path]
"""
import argparse
import hashlib
import importlib.util
import os

import numpy as np

from ldm.paths import check_output

VOCAB_SIZE = 30522
ID_OF_A = 1037
EXPECTED_MD5 = "64800d5d8528ce344256daf115d4965e"
# blingfire lowercases these special tokens when decoding; bert-base-uncased spells them in capitals.
UPPERCASE_SPECIALS = {"[unk]", "[cls]", "[sep]", "[mask]"}
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "ldm", "modules", "encoders", "vocab", "bert-base-uncased-vocab.txt",
)


def vocab_entry(decode, token_id: int) -> str:
    """The vocab.txt spelling of one id: its text, with `##` when it continues a word (`decode`: ids to text)."""
    alone = decode([token_id])
    if alone in UPPERCASE_SPECIALS:
        return alone.upper()
    after_a = decode([ID_OF_A, token_id])
    if after_a == "a " + alone:
        return alone
    if after_a == "a" + alone:
        return "##" + alone
    raise RuntimeError(f"id {token_id}: cannot tell word start from piece ({alone!r} vs {after_a!r})")


def build_vocab_text() -> str:
    import blingfire  # only this script needs it: imported once main() has checked that it is installed

    handle = blingfire.load_model(os.path.join(os.path.dirname(blingfire.__file__), "bert_base_tok.i2w"))

    def decode(ids) -> str:
        return blingfire.ids_to_text(handle, np.asarray(ids, dtype=np.uint32), skip_special_tokens=False)

    try:
        return "".join(vocab_entry(decode, i) + "\n" for i in range(VOCAB_SIZE))
    finally:
        blingfire.free_model(handle)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_path", nargs="?", default=DEFAULT_OUTPUT, help="where to write vocab.txt "
                        "(default: the copy the package ships)")
    output_path = parser.parse_args(argv).output_path
    if importlib.util.find_spec("blingfire") is None:
        raise SystemExit("build_bert_vocab: error: this script needs blingfire: pip install blingfire==0.1.8")
    try:
        check_output(output_path, "output_path")
    except ValueError as error:
        raise SystemExit(f"build_bert_vocab: error: {error}") from None
    data = build_vocab_text().encode("utf-8")
    digest = hashlib.md5(data).hexdigest()
    if digest != EXPECTED_MD5:
        raise SystemExit(f"built vocab has md5 {digest}, expected {EXPECTED_MD5}; is blingfire 0.1.8 installed?")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "wb") as handle:
        handle.write(data)
    print(f"wrote {output_path} ({len(data)} bytes, md5 {digest})")


if __name__ == "__main__":
    main()
