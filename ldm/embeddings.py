"""Textual-inversion embedding files: read every layout users share, write the three that loaders expect.

Embeddings trained here must work in other tools and the other way round, but each tool wrote its own layout
(original repo, AUTOMATIC1111, diffusers, kohya/Civitai). Files are recognised by their content, never their
name, and pickles are opened only with `torch.load(weights_only=True)`: a file that needs anything beyond the
tensors, containers and the `nn.ParameterDict` the original repo pickled is refused, never executed.

Layouts read:
- original `.pt`: {"string_to_token": {placeholder: id}, "string_to_param": ParameterDict or dict {placeholder: (k, D)}}
- AUTOMATIC1111 `.pt`: the same keys with the fixed key "*" plus "name" (the trigger), "step", "sd_checkpoint*";
  its PNG images carry that dict as base64 JSON in the `sd-ti-embedding` text chunk
- diffusers `learned_embeds.bin` / `.safetensors`: {token: (D,) or (k, D)}
- `emb_params` `.pt` / `.safetensors` (kohya, A1111, Civitai) and `clip_l` (SD 1.5 files of diffusers' pivotal
  tuning script): one tensor; like A1111 we name it after the file stem
"""
import base64
import binascii
import contextlib
import io
import json
import os
import pickle
import re
import secrets
import zipfile
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch
from PIL import Image

from ldm.checkpoint import UnsafePickleError, safe_torch_load, sniff_format
from ldm.paths import GIT_LFS_FIX, GIT_LFS_POINTER, require_file
from ldm.text_encoders import width_label

FORMATS = ("original", "diffusers", "a1111")

# A 77-token prompt holds 75 tokens between its start and end tokens, so no usable embedding has more vectors.
MAX_VECTORS_PER_TOKEN = 75
ACCEPTED = (
    "accepted: original .pt (string_to_token + string_to_param), AUTOMATIC1111 .pt / PNG (sd-ti-embedding chunk), "
    "diffusers learned_embeds .bin / .safetensors, emb_params .pt / .safetensors"
)

# The only class beyond torch's weights-only defaults that the original repo pickled; nn.Parameter itself is
# rebuilt through torch._utils._rebuild_parameter, which torch already allows.
ORIGINAL_PICKLE_GLOBALS = (torch.nn.ParameterDict,)

# AUTOMATIC1111 always stores its vectors under "*" with CLIP's id for "*"; the trigger is the file's "name".
A1111_KEY = "*"
A1111_KEY_TOKEN_ID = 265
# Written for placeholders whose tokenizer id is unknown; never a real id.
UNKNOWN_TOKEN_ID = -1
PNG_CHUNK = "sd-ti-embedding"
SAFETENSORS_METADATA_KEY = "textual_inversion.metadata"
SAFETENSORS_TOKEN_IDS_KEY = "textual_inversion.token_ids"

_PICKLE_SUFFIXES = (".pt", ".bin")
_SAFETENSORS_SUFFIX = ".safetensors"
_SUFFIXES = {
    "original": _PICKLE_SUFFIXES,
    "diffusers": _PICKLE_SUFFIXES + (_SAFETENSORS_SUFFIX,),
    "a1111": _PICKLE_SUFFIXES + (_SAFETENSORS_SUFFIX,),
}


def _as_vectors(placeholder, value) -> torch.Tensor:
    """A private float32 CPU (k, D) copy: callers may hand in live, trainable or half-precision tensors."""
    if not isinstance(placeholder, str) or not placeholder:
        raise ValueError(f"placeholder {placeholder!r} is not a non-empty string")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"'{placeholder}' holds {_describe_value(value)}, not a tensor of vectors")
    if not value.is_floating_point():
        raise ValueError(f"'{placeholder}' holds {_describe_value(value)}: embedding vectors must be floating point")
    if value.ndim not in (1, 2) or value.numel() == 0:
        raise ValueError(f"'{placeholder}' holds a tensor of shape {tuple(value.shape)}; expected (D,) or (k, D)")
    copy = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
    return copy.reshape(-1, value.shape[-1]).contiguous()  # safetensors refuses strided views


@dataclass
class Embeddings:
    """Learned vectors per placeholder, with the tokenizer ids and free-form JSON-able metadata a file recorded."""

    vectors: dict[str, torch.Tensor]
    token_ids: dict[str, int] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = {placeholder: _as_vectors(placeholder, value) for placeholder, value in self.vectors.items()}
        unknown = sorted(set(self.token_ids) - set(self.vectors))
        if unknown:
            raise ValueError(f"token ids given for placeholders without vectors: {unknown}")
        self.token_ids = {placeholder: int(token_id) for placeholder, token_id in self.token_ids.items()}
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be a dict, not {type(self.metadata).__name__}")

    def initializer_word(self, placeholder: str) -> str | None:
        """The word `placeholder` started from, where the metadata records one (initializer_words aligned with
        placeholder_strings, as EmbeddingManager.save writes them)."""
        words = self.metadata.get("initializer_words") or []
        placeholders = self.metadata.get("placeholder_strings") or list(self.vectors)
        if placeholder in placeholders and len(words) == len(placeholders):
            return words[placeholders.index(placeholder)] or None
        return None

    def renamed(self, old: str, new: str) -> "Embeddings":
        """The same vectors with placeholder `old` called `new`, in its place, so that the recorded
        placeholder_strings still align with initializer_words; its token id and A1111's `name` belonged to the
        old string and are dropped."""
        if old not in self.vectors:
            raise ValueError(f"there is no placeholder '{old}' to rename (there are {', '.join(self.vectors)})")
        if new == old:
            return self
        if new in self.vectors:
            raise ValueError(f"cannot rename '{old}' to '{new}': '{new}' is another placeholder of the same file")
        vectors = {new if placeholder == old else placeholder: v for placeholder, v in self.vectors.items()}
        token_ids = {placeholder: i for placeholder, i in self.token_ids.items() if placeholder != old}
        metadata = {key: value for key, value in self.metadata.items() if key != "name"}
        if metadata.get("placeholder_strings"):
            metadata["placeholder_strings"] = [new if p == old else p for p in metadata["placeholder_strings"]]
        return Embeddings(vectors, token_ids, metadata)

    @property
    def dim(self) -> int:
        widths = {placeholder: vectors.shape[-1] for placeholder, vectors in self.vectors.items()}
        if not widths:
            raise ValueError("there are no embeddings")
        if len(set(widths.values())) > 1:
            described = ", ".join(f"'{p}' is {w}-wide" for p, w in widths.items())
            raise ValueError(f"the embeddings disagree in width: {described}")
        return next(iter(widths.values()))

    def check_width(self, width: int, source: str) -> None:
        """Refuse vectors made for another model's text encoder up front, naming both models; `source` names them."""
        if self.dim != width:
            raise ValueError(
                f"the vectors of {source} are {width_label(self.dim)}; this model's text encoder is "
                f"{width_label(width)}: use embeddings trained for this model"
            )


def common_width(files: list[tuple[str, Embeddings]]) -> int:
    """The one width of `files` ((source, embeddings) pairs); files of different models cannot share a prompt."""
    widths = {source: embeddings.dim for source, embeddings in files}
    if len(set(widths.values())) > 1:
        described = ", ".join(f"'{source}' is {width_label(width)}" for source, width in widths.items())
        raise ValueError(f"cannot merge embeddings of different widths ({described}): merge files of one model only")
    return next(iter(widths.values()))


def merge_embeddings(files: list[tuple[str, Embeddings]], names: list[dict[str, str]] | None = None) -> Embeddings:
    """Every placeholder of `files` ((source, embeddings) pairs) in one Embeddings, in file order, so that one
    prompt can combine their concepts; `names` renames them, a {placeholder: new name} per file.

    A name that two files share is refused: a prompt could not say which vectors it means. The metadata records
    each name's initializer word and, under "merged_from", {name: {"file": source, "placeholder": its name
    there}}; no training step, so every vector is active. A renamed placeholder's recorded token id is dropped.
    """
    width = common_width(files)
    vectors, token_ids, words, merged_from = {}, {}, {}, {}
    for (source, embeddings), renamed in zip(files, names or [{}] * len(files), strict=True):
        for placeholder, placeholder_vectors in embeddings.vectors.items():
            name = renamed.get(placeholder, placeholder)
            if name in merged_from:
                raise ValueError(
                    f"placeholder '{name}' is defined in both '{merged_from[name]['file']}' and '{source}': merge "
                    f"them with scripts/merge_embeddings.py --manager_ckpts <both files> --rename '2:{name}=NEW'"
                )
            vectors[name] = placeholder_vectors
            if name == placeholder and placeholder in embeddings.token_ids:
                token_ids[name] = embeddings.token_ids[placeholder]
            words[name] = embeddings.initializer_word(placeholder)
            merged_from[name] = {"file": source, "placeholder": placeholder}
    metadata = {
        "dim": width,
        "placeholder_strings": list(vectors),
        "initializer_words": list(words.values()),
        "num_vectors_per_token": max(v.shape[0] for v in vectors.values()),
        "merged_from": merged_from,
    }
    return Embeddings(vectors, token_ids, metadata)


def replace_learned_words(text: str, replacements: dict[str, str]) -> str:
    """`text` with each learned word of `replacements` replaced, found as the generation scripts find it in a
    prompt: in any case (both tokenizers lowercase), and where it begins or ends with a letter or digit only as a
    whole word ("cat-toy" is not in "bobcat-toys"); where two words overlap, the longer one."""
    if not replacements:
        return text
    words = sorted(replacements, key=len, reverse=True)
    pattern = "|".join("(" + (r"(?<![^\W_])" if word[0].isalnum() else "") + re.escape(word)
                       + (r"(?![^\W_])" if word[-1].isalnum() else "") + ")" for word in words)
    return re.sub(pattern, lambda match: replacements[words[match.lastindex - 1]], text, flags=re.IGNORECASE)


def load_embeddings(path, expected_dim: int | None = None) -> Embeddings:
    """Read any supported embedding file; `expected_dim` turns a wrong-model file into a clear error up front."""
    path = require_file(path, "embedding file", "check the path")
    try:
        embeddings = _read(path)
        embeddings.dim  # raises for mixed widths
        _check_usable(embeddings)
    except ValueError as error:
        raise ValueError(f"cannot load embeddings from '{path}': {error}") from error
    if expected_dim is not None:
        embeddings.check_width(expected_dim, f"embedding file '{path}'")
    return embeddings


def _check_usable(embeddings: Embeddings) -> None:
    """Refuse vectors that no prompt can hold, and NaN or infinite ones (a diverged training run's), which would
    otherwise surface far from the file: as black images at generation, or a nan loss in training."""
    for placeholder, vectors in embeddings.vectors.items():
        if vectors.shape[0] > MAX_VECTORS_PER_TOKEN:
            raise ValueError(
                f"'{placeholder}' holds {vectors.shape[0]} vectors, but at most {MAX_VECTORS_PER_TOKEN} fit in a "
                f"77-token prompt (with its start and end tokens): use an embedding of at most "
                f"{MAX_VECTORS_PER_TOKEN} vectors"
            )
        bad = int((~torch.isfinite(vectors)).sum())
        if bad:
            raise ValueError(
                f"'{placeholder}' holds {bad} NaN or infinite values (its training diverged): use an embedding "
                "saved before the loss became nan"
            )


def save_embeddings(embeddings: Embeddings, path, format: str = "original") -> None:
    """Write `embeddings` atomically in one of FORMATS; `.safetensors` or a pickle (`.pt`/`.bin`) by extension.

    - "original": the original repo's dict with plain tensors in plain dicts (loads with weights_only=True, and in
      A1111), plus "name" (the first placeholder), "step", "sd_checkpoint*" and our "metadata"; a placeholder
      without a known token id is written with id -1.
    - "diffusers": {token: (k, D)}; `.safetensors` keeps metadata and token ids in its string header, `.bin` keeps
      neither (diffusers' loader accepts only the one key).
    - "a1111": the AUTOMATIC1111 dict (`.pt`/`.bin`, name = metadata "name" or the placeholder) or
      {"emb_params": (k, D)} (`.safetensors`, trigger = file stem when read back, as in A1111).
    diffusers and A1111 read one token per file, so those two formats refuse several placeholders.
    """
    path = os.fspath(path)
    if format not in FORMATS:
        raise ValueError(f"unknown embedding format '{format}'; choose one of {', '.join(FORMATS)}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES[format]:
        raise ValueError(
            f"cannot write '{path}' in the {format} format: use a file name ending in {' or '.join(_SUFFIXES[format])}"
        )
    embeddings.dim  # raises for empty or mixed-width embeddings before anything is written
    if format != "original" and len(embeddings.vectors) != 1:
        raise ValueError(
            f"the {format} format holds one token per file (its loaders read only one), but there are "
            f"{len(embeddings.vectors)}: save each placeholder to its own file or use format='original'"
        )
    try:
        metadata = json.loads(json.dumps(embeddings.metadata))
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot write '{path}': the metadata is not JSON-serialisable ({error})") from error
    as_safetensors = suffix == _SAFETENSORS_SUFFIX
    if format == "original":
        data = _pickled(_original_dict(embeddings, metadata))
    elif format == "diffusers" and as_safetensors:
        data = safetensors.torch.save(dict(embeddings.vectors), _safetensors_header(metadata, embeddings.token_ids))
    elif format == "diffusers":
        data = _pickled(dict(embeddings.vectors))
    elif as_safetensors:
        (vectors,) = embeddings.vectors.values()
        data = safetensors.torch.save({"emb_params": vectors}, _safetensors_header(metadata, {}))
    else:
        data = _pickled(_a1111_dict(embeddings, metadata))
    _write_atomically(path, data)


def _original_dict(embeddings: Embeddings, metadata: dict) -> dict:
    placeholders = list(embeddings.vectors)
    return {
        "string_to_token": {
            p: torch.tensor(embeddings.token_ids.get(p, UNKNOWN_TOKEN_ID), dtype=torch.int64) for p in placeholders
        },
        "string_to_param": dict(embeddings.vectors),
        "name": placeholders[0],
        "step": int(metadata.get("step") or 0),
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "metadata": metadata,
    }


def _a1111_dict(embeddings: Embeddings, metadata: dict) -> dict:
    ((placeholder, vectors),) = embeddings.vectors.items()
    return {
        "string_to_token": {A1111_KEY: A1111_KEY_TOKEN_ID},
        "string_to_param": {A1111_KEY: vectors},
        "name": metadata.get("name") or placeholder,
        "step": int(metadata.get("step") or 0),
        "sd_checkpoint": metadata.get("sd_checkpoint"),
        "sd_checkpoint_name": metadata.get("sd_checkpoint_name"),
        "metadata": metadata,
    }


def _safetensors_header(metadata: dict, token_ids: dict) -> dict:
    """safetensors headers hold only strings: our metadata and token ids travel JSON-encoded."""
    header = {"format": "pt"}
    if metadata:
        header[SAFETENSORS_METADATA_KEY] = json.dumps(metadata)
    if token_ids:
        header[SAFETENSORS_TOKEN_IDS_KEY] = json.dumps(token_ids)
    return header


def _pickled(obj) -> bytes:
    """torch's legacy (non-zip) format: A1111's safe loader refuses the zip entries that torch >= 2.5 adds
    (`.format_version`, `byteorder`, ...), and every torch and diffusers reads the legacy one."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _write_atomically(path: str, data: bytes) -> None:
    """Write beside the target and rename over it, so a crash never leaves a half-written embedding."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _read(path: str) -> Embeddings:
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError("the file is empty")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(GIT_LFS_POINTER):
        raise ValueError(f"it is {GIT_LFS_FIX}")
    if head.startswith(b"\x89PNG\r\n\x1a\n") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return _read_image(path)
    kind = sniff_format(head)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("zip", "pickle"):
        return _interpret(_torch_load(path), path)
    raise _unrecognised(_describe_head(head))


def _torch_load(path: str):
    """torch.load(weights_only=True) with only ORIGINAL_PICKLE_GLOBALS allowed; anything else is refused by name."""
    allowed = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in ORIGINAL_PICKLE_GLOBALS}
    try:
        return safe_torch_load(path, allowed.get)
    except UnsafePickleError as error:
        raise _refusal(", ".join(error.names)) from error
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        raise ValueError(f"it is a pickle that torch's weights-only loader cannot read ({reason})") from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"it is a truncated or corrupt PyTorch file ({_first_sentence(error)})") from error


def _read_safetensors(path: str) -> Embeddings:
    try:
        with safetensors.safe_open(path, framework="pt") as reader:
            header = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"it is a truncated or corrupt safetensors file ({_first_sentence(error)})") from error
    try:
        if SAFETENSORS_METADATA_KEY in header:
            metadata = json.loads(header[SAFETENSORS_METADATA_KEY])
        else:
            metadata = {key: value for key, value in header.items() if key != "format"}
        token_ids = json.loads(header.get(SAFETENSORS_TOKEN_IDS_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise ValueError(f"its {SAFETENSORS_METADATA_KEY} header entries are not valid JSON ({error})") from error
    return _interpret(tensors, path, metadata, token_ids)


def _read_image(path: str) -> Embeddings:
    """AUTOMATIC1111's shareable images: the embedding dict as base64 JSON in a PNG text chunk."""
    try:
        with Image.open(path) as image:
            payload = image.info.get(PNG_CHUNK)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"it is a damaged or oversized image ({_first_sentence(error)})") from error
    if not isinstance(payload, str):
        raise ValueError(
            f"it is an image without an '{PNG_CHUNK}' text chunk; embeddings hidden in the pixels "
            "(A1111's other image variant) are not supported: use the .pt file instead"
        )
    try:
        data = json.loads(base64.b64decode(payload), object_hook=_decode_a1111_tensor)
    except (binascii.Error, ValueError, TypeError) as error:
        raise ValueError(f"its '{PNG_CHUNK}' chunk is not base64-encoded embedding JSON ({error})") from error
    return _interpret(data, path)


def _decode_a1111_tensor(entry: dict):
    """A1111 encodes each tensor as {"TORCHTENSOR": nested lists}; float32 values survive JSON exactly."""
    if "TORCHTENSOR" in entry:
        return torch.tensor(entry["TORCHTENSOR"], dtype=torch.float32)
    return entry


def _interpret(obj, path: str, metadata: dict | None = None, token_ids: dict | None = None) -> Embeddings:
    """Tell the layouts apart by their keys and build Embeddings from whichever one `obj` is."""
    metadata, token_ids = dict(metadata or {}), dict(token_ids or {})
    if not isinstance(obj, dict):
        raise _unrecognised(f"{_describe_value(obj)} rather than a dict of embeddings")
    if "string_to_param" in obj:
        return _from_string_to_param(obj)
    if set(obj) in ({"emb_params"}, {"clip_l"}):  # kohya/Civitai; SD 1.5 pivotal tuning (diffusers' script)
        stem = os.path.splitext(os.path.basename(path))[0]
        return Embeddings({stem: next(iter(obj.values()))}, metadata=metadata)
    encoder_keys = sorted(set(obj) & {"clip_l", "clip_g", "t5"})
    if encoder_keys:
        raise ValueError(
            f"it is an SDXL/Flux embedding with one vector set per text encoder (keys {', '.join(encoder_keys)}), "
            "trained for a model this project does not run: use an embedding trained for SD v1 or LDM"
        )
    if _is_token_dict(obj):
        return Embeddings(obj, {p: i for p, i in token_ids.items() if p in obj}, metadata)
    raise _unrecognised(_describe_dict(obj))


def _from_string_to_param(obj: dict) -> Embeddings:
    """Original and AUTOMATIC1111 dicts; A1111's fixed key "*" is renamed to its trigger, the "name" entry."""
    params = obj["string_to_param"]
    if isinstance(params, torch.nn.ParameterDict):
        # named_parameters also works for ParameterDicts pickled by torch versions that had no `_keys`.
        params = dict(params.named_parameters(remove_duplicate=False))
    if not isinstance(params, dict) or not params:
        raise ValueError(f"its string_to_param is {_describe_value(params)}, not a non-empty dict of tensors")
    name = obj.get("name")
    if set(params) == {A1111_KEY} and isinstance(name, str) and name:
        params = {name: params[A1111_KEY]}
    recorded = obj.get("string_to_token") or {}
    if not isinstance(recorded, dict):
        raise ValueError(f"its string_to_token is {_describe_value(recorded)}, not a dict")
    token_ids = {}
    for placeholder in params:
        if placeholder in recorded:
            token_id = _token_id(placeholder, recorded[placeholder])
            if token_id != UNKNOWN_TOKEN_ID:
                token_ids[placeholder] = token_id
    stored = obj.get("metadata")
    if isinstance(stored, dict):
        metadata = stored
    else:
        fields = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
        metadata = {key: obj[key] for key in fields if isinstance(obj.get(key), (str, int))}
    return Embeddings(params, token_ids, metadata)


def _token_id(placeholder: str, value) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"its string_to_token entry for '{placeholder}' is {_describe_value(value)}, not a token id")


def _is_token_dict(obj: dict) -> bool:
    """{token: (D,) or (k, D)} with one shared D, as diffusers writes. The dtype and the number of vectors are
    checked once the layout is known (Embeddings, `_check_usable`), so that integer vectors or too many of them
    are named as such rather than as an unknown layout."""
    if not obj or not all(isinstance(key, str) for key in obj):
        return False
    values = list(obj.values())
    if not all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) and v.numel() > 0 for v in values):
        return False
    return len({v.shape[-1] for v in values}) == 1


def _describe_dict(obj: dict) -> str:
    keys = list(obj)
    shown = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    if "state_dict" in obj or len(keys) > 16:
        return f"a model checkpoint or state dict ({len(keys)} entries: {shown}), not an embedding"
    return f"a dict with keys {shown} that matches no embedding layout"


def _describe_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _describe_head(head: bytes) -> str:
    text = head.decode("utf-8", errors="ignore")  # the 64-byte head may end inside a character
    if not text.strip() or not "".join(text.split()).isprintable():
        return "an unrecognised binary file"
    first_line = text.strip().splitlines()[0]
    return f"a text file (YAML, JSON or similar) starting with {first_line[:40]!r}"


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text.split(". ")[0] if text else type(error).__name__


def _unpickler_reason(error: BaseException) -> str:
    """torch wraps the actual reason in a paragraph of advice; keep the reason."""
    _, _, reason = str(error).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[0] if lines else _first_sentence(error)


def _refusal(globals_named: str) -> ValueError:
    return ValueError(
        f"it is a pickle that needs {globals_named}, which the weights-only loader does not allow; refusing to run "
        "pickled code: re-save the embedding from a trusted environment as .safetensors"
    )


def _unrecognised(what: str) -> ValueError:
    return ValueError(f"it looks like {what}; {ACCEPTED}")
