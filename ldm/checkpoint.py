"""Reading model checkpoints safely and restoring them into our modules.

Real Stable Diffusion `.ckpt` files are Lightning checkpoints that pickle a few Lightning callback objects
and numpy scalars, so `torch.load(weights_only=True)` refuses them. We never fall back to unrestricted
unpickling: the pickle's globals are listed first, Lightning classes are replaced by an inert stand-in,
numpy's data constructors are allowed, and anything else is refused with a message naming it.
"""
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm.paths import GIT_LFS_FIX, GIT_LFS_POINTER, require_file
from ldm.text_encoders import configs_for_width, width_label

SAFETENSORS_SUFFIXES = (".safetensors",)
SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit; a larger length prefix means "not safetensors"
LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
# numpy's data constructors (scalars and arrays in callback state); they build values, never run code.
NUMPY_DATA_GLOBALS = {"multiarray.scalar", "multiarray._reconstruct", "numpy.dtype", "numpy.ndarray"}
# The parts of a LatentDiffusion: a checkpoint that fills none of a part's tensors is another model's.
MODEL_PARTS = ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")
# The top-level modules of a standalone AutoencoderKL / VQModel checkpoint (`loss.` when saved with its loss).
AUTOENCODER_KEYS = {"encoder", "decoder", "quant_conv", "post_quant_conv", "quantize", "loss"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class PickledLightningObject:
    """Inert stand-in for Lightning objects pickled inside checkpoints (callback classes and their state)."""

    def __setstate__(self, state):
        self.state = state


def _numpy_global(name: str):
    module, _, attr = name.rpartition(".")
    for candidate in (module, module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            obj = __import__(candidate, fromlist=[attr])
            return getattr(obj, attr)
        except (ImportError, AttributeError):
            continue
    return None


def _numpy_dtype_classes() -> list:
    """numpy dtypes unpickle as instances of per-dtype classes that the BUILD step must know."""
    import numpy as np

    return [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []


def _safe_global(name: str):
    """The object that stands for pickled global `name`, or None if it is not allowed."""
    if name.startswith(LIGHTNING_PREFIXES):
        return dict if name.endswith(".AttributeDict") else PickledLightningObject
    if name.startswith("numpy.") and (name.startswith("numpy.dtypes.") or any(name.endswith(g) for g in NUMPY_DATA_GLOBALS)):
        return _numpy_global(name)
    if name in ("argparse.Namespace",):
        import argparse

        return argparse.Namespace
    return None


def _describe_bad_file(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(GIT_LFS_POINTER):
        return f"'{path}' is {GIT_LFS_FIX}"
    text = head.lstrip()
    if text.startswith((b"<", b"<!DOCTYPE")):
        return f"'{path}' is an HTML page, not a checkpoint (a failed download?): download the file again"
    if text.startswith((b"model:", b"target:", b"lightning:", b"#", b"---")) or path.endswith((".yaml", ".yml")):
        return f"'{path}' is a YAML config, not a checkpoint: pass configs with --base/--config and the .ckpt with --actual_resume/--ckpt"
    if not head:
        return f"'{path}' is empty: download the checkpoint again"
    return f"'{path}' is truncated or not a PyTorch/safetensors checkpoint: download it again or check the path"


def sniff_format(head: bytes) -> str | None:
    """"safetensors", "zip" (torch's zip format), "pickle" (torch's legacy format) or None, from a file's first
    bytes (at least 9): files get renamed, so their names cannot say which reader they need."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # An 8-byte little-endian header length, then the JSON header; before the pickle test, as that length may
    # begin with 0x80.
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol marker
        return "pickle"
    return None


class UnsafePickleError(ValueError):
    """A pickle names globals outside the allow-list; `names` lists them."""

    def __init__(self, names):
        self.names = list(names)
        super().__init__(", ".join(self.names))


def safe_torch_load(path: str, stand_in, mmap: bool = False):
    """`torch.load(weights_only=True)` that allows a pickled global only where `stand_in(name)` returns the
    object to use for it (None refuses). Raises UnsafePickleError naming refused globals; other failures
    (truncated or foreign files) surface as pickle.UnpicklingError, RuntimeError, EOFError or OSError."""
    is_zip = zipfile.is_zipfile(path)
    allowed: list = []
    if is_zip:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        refused = [n for n in names if stand_in(n) is None]
        if refused:
            raise UnsafePickleError(refused)
        allowed = [(stand_in(n), n) for n in names]
        if any(n.startswith("numpy.") for n in names):
            allowed += _numpy_dtype_classes()
    # torch hands a path ending in .safetensors to safetensors whatever the file holds, so a renamed pickle is read
    # from an open file; mmap needs the path.
    mmap = mmap and is_zip and not os.fspath(path).endswith(".safetensors")
    for _ in range(20):  # legacy (non-zip) files: learn their globals from the refusals, one at a time
        try:
            with torch.serialization.safe_globals(allowed), open(path, "rb") as handle:
                return torch.load(path if mmap else handle, map_location="cpu", weights_only=True, mmap=mmap)
        except (IndexError, KeyError, ValueError, struct.error) as exc:  # how the unpickler meets text or garbage
            raise RuntimeError(f"not pickle data ({type(exc).__name__}: {exc})") from exc
        except pickle.UnpicklingError as exc:
            match = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if not match:
                raise
            name = match.group(1)
            if stand_in(name) is None or any(n == name for _, n in allowed):
                raise UnsafePickleError([name]) from exc
            allowed.append((stand_in(name), name))
    raise UnsafePickleError(["(more than 20 globals)"])


def load_pickled_checkpoint(path: str):
    """A pickled checkpoint as saved, without running its code: Lightning objects become inert stand-ins, numpy data
    constructors are allowed, anything else is a CheckpointError naming the file."""
    try:
        return safe_torch_load(path, _safe_global, mmap=True)
    except UnsafePickleError as exc:
        raise CheckpointError(
            f"'{path}' pickles code we will not run ({', '.join(exc.names[:5])}): re-save it as .safetensors "
            "from a trusted environment, or use a checkpoint from the original release"
        ) from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(_describe_bad_file(path)) from exc


EMBEDDING_FILE_HINT = ("is an embedding file, not a model checkpoint: pass it with --embedding_manager_ckpt (training) "
                       "or --embedding_path (generation), and the model's checkpoint with --actual_resume/--ckpt")


def is_embedding_dict(obj: dict) -> bool:
    """Whether `obj` has the shape of a textual-inversion embedding file (the layouts ldm/embeddings.py reads), so
    that one passed as a model checkpoint is named as such; a lone undotted key is a diffusers token, as every
    model weight's key names its module."""
    if "string_to_param" in obj or set(obj) in ({"emb_params"}, {"clip_l"}):
        return True
    if len(obj) != 1:
        return False
    ((key, value),) = obj.items()
    return (isinstance(key, str) and "." not in key and isinstance(value, torch.Tensor)
            and value.is_floating_point() and value.ndim in (1, 2))


@dataclass
class LoadedCheckpoint:
    state_dict: dict
    path: str
    global_step: int | None = None
    extra: dict = field(default_factory=dict)


def load_checkpoint(path) -> LoadedCheckpoint:
    """Read a pickled checkpoint (Lightning `{"state_dict": ...}` or a bare state dict) or a safetensors state
    dict, whichever the content is, whatever the file's extension says."""
    path = require_file(path, "checkpoint", "check the path (models/README.md says which file goes where)")
    with open(path, "rb") as handle:
        kind = sniff_format(handle.read(16))
    if kind is None:
        raise CheckpointError(_describe_bad_file(path))
    if kind == "safetensors":
        try:
            obj = load_file(path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(_describe_bad_file(path)) from exc
    else:
        obj = load_pickled_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict"}
        step = obj.get("global_step")
        return LoadedCheckpoint(obj["state_dict"], path, int(step) if step is not None else None, extra)
    if is_embedding_dict(obj):
        raise CheckpointError(f"'{path}' {EMBEDDING_FILE_HINT}")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}' is neither a state dict nor a Lightning checkpoint (keys: {', '.join(list(obj)[:5])})")
    return LoadedCheckpoint(obj, path)


def ema_state_dict(state_dict: dict, path: str = "checkpoint") -> dict:
    """Swap the UNet weights for the EMA shadow copies LitEma stored as `model_ema.<name without dots>`."""
    swapped = dict(state_dict)
    found = 0
    for key in state_dict:
        if key.startswith("model."):
            ema_key = "model_ema." + key[len("model."):].replace(".", "")
            if ema_key in state_dict:
                swapped[key] = state_dict[ema_key]
                found += 1
    if not found:
        raise CheckpointError(f"'{path}' has no EMA weights (it is an EMA-only or pruned file): set use_ema: False")
    return swapped


def _context_width_hint(mismatches, path):
    for key, ckpt_shape, model_shape in mismatches:
        if "attn2.to_k" in key:
            have, want = ckpt_shape[1], model_shape[1]
            return (
                f"'{path}' is a {width_label(have)} checkpoint but the config builds a {width_label(want)} model "
                f"({key} {tuple(ckpt_shape)} vs {tuple(model_shape)}): use a config from {configs_for_width(have)}"
            )
    key, ckpt_shape, model_shape = mismatches[0]
    return (
        f"'{path}' does not match the config: {len(mismatches)} tensors differ in shape "
        f"(first: {key} {tuple(ckpt_shape)} vs {tuple(model_shape)}): check that config and checkpoint are the same model"
    )


@dataclass
class RestoreSummary:
    path: str
    loaded: int
    missing: list
    unexpected: list

    def __str__(self):
        def head(keys):
            return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")

        text = f"Restored {self.loaded} tensors from {self.path}: {len(self.missing)} missing, {len(self.unexpected)} unexpected"
        if self.missing:
            text += f"\n  missing: {head(self.missing)}"
        if self.unexpected:
            text += f"\n  unexpected: {head(self.unexpected)}"
        return text


def _describe_keys(keys) -> str:
    """What a state dict seems to be, from the first components of its keys."""
    groups = sorted({key.split(".")[0] for key in keys})
    if not groups:
        return "it holds no tensors"
    if set(groups) <= AUTOENCODER_KEYS:
        return "it is a standalone autoencoder's checkpoint"
    if groups == ["first_stage_model"]:
        return "it holds only first_stage_model keys, an autoencoder's"
    if groups == ["embedding_manager"]:
        return "it holds only learned embeddings (pass such files with --embedding_path or --embedding_manager_ckpt)"
    return f"its keys start with {', '.join(groups[:6])}" + (" ..." if len(groups) > 6 else "")


def _unfilled(own: dict, state: dict, ignore_keys) -> str | None:
    """Why `state` is not a checkpoint of `own`'s model: it fills none of its tensors, or none of one of its
    parts (UNet, text encoder, autoencoder) that `ignore_keys` leaves to be restored; None when it is."""
    if not any(key in own for key in state):
        return f"shares no tensor with the model ({_describe_keys(state)})"
    for part in MODEL_PARTS:
        needed = [key for key in own if key.startswith(part) and not key.startswith(tuple(ignore_keys))]
        if needed and not any(key in own for key in state if key.startswith(part)):
            others = [key for key in state if key.startswith(part)]
            found = f"its {part}* keys have other names, e.g. {others[0]}" if others else _describe_keys(state)
            return f"has none of the model's {len(needed)} {part}* tensors ({found}, where the model has {needed[0]})"
    return None


def restore(module: torch.nn.Module, source, ignore_keys=(), use_ema: bool = False, verbose: bool = True) -> RestoreSummary:
    """Load a checkpoint (path or LoadedCheckpoint) into `module` non-strictly, refusing shape mismatches."""
    ckpt = source if isinstance(source, LoadedCheckpoint) else load_checkpoint(source)
    state = ema_state_dict(ckpt.state_dict, ckpt.path) if use_ema else ckpt.state_dict
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_keys)) and not k.startswith("model_ema.")}
    own = module.state_dict()
    mismatches = [(k, v.shape, own[k].shape) for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatches:
        raise CheckpointError(_context_width_hint(mismatches, ckpt.path))
    problem = _unfilled(own, state, ignore_keys)
    if problem:
        raise CheckpointError(f"'{ckpt.path}' {problem}: use the checkpoint of the model the config builds, or the "
                              "config of the checkpoint's model")
    result = module.load_state_dict(state, strict=False)
    summary = RestoreSummary(ckpt.path, len(state) - len(result.unexpected_keys), list(result.missing_keys),
                             list(result.unexpected_keys))
    if verbose:
        print(summary)
    return summary


class _ParametersLeftUnfilled(torch.overrides.TorchFunctionMode):
    """Random fills of parameters return them untouched (buffers and other tensors are filled as usual). The
    torch.nn.init functions that dispatch are caught where they are called, by name (transformers swaps in wrappers
    of its own while it initialises); the others end in the Tensor methods uniform_ and normal_."""

    FILLS = {"uniform_", "normal_", "kaiming_uniform_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", None) in self.FILLS and isinstance(target, torch.nn.Parameter):
            return target
        return func(*args, **kwargs)


def random_init_skipped():
    """Context: parameters built inside keep their memory as allocated instead of random values, for weights that a
    checkpoint overwrites at once. Drawing is single-threaded; for SD v1's billion weights it took 12 s of a 21 s
    build on a 2-core CPU, at every start of main.py and the sampling scripts. A mode, not patched functions,
    so that a library imported inside (transformers keeps its own references to torch.nn.init) is unaffected."""
    return _ParametersLeftUnfilled()


def fills_every_parameter(checkpoint: LoadedCheckpoint, prefix: str, module: torch.nn.Module, ignore_keys=()) -> bool:
    """Whether `restore(..., ignore_keys)` of `checkpoint` sets every parameter of `module`, registered as `prefix`."""
    ignored = tuple(ignore_keys)
    keys = (f"{prefix}.{name}" for name, _ in module.named_parameters())
    return all(key in checkpoint.state_dict and not key.startswith(ignored) for key in keys)


def build_filled_by(checkpoint: LoadedCheckpoint | None, prefix: str, build, ignore_keys=()):
    """`build()`, the module to be registered as `prefix` and then restored from `checkpoint`, without drawing the
    random weights that the checkpoint overwrites. Where it turns out not to set every parameter (a partial file,
    `ignore_keys`), the module is built again the usual way, so the weights it leaves are initialised as always."""
    if checkpoint is None:
        return build()
    with random_init_skipped():
        module = build()
    if module is None or fills_every_parameter(checkpoint, prefix, module, ignore_keys):
        return module
    del module  # freed first, so that the part is never held twice
    return build()


def build_random_model(config, seed: int = 0, device=None) -> torch.nn.Module:
    """The model of a config (a path or a loaded config) with every weight random, zero-initialised layers included
    (for tests, demos and benchmarks: a zero output layer would hide most of the network), built on `device`."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(config) if isinstance(config, (str, os.PathLike)) else config.copy()
    config.model.params.pop("ckpt_path", None)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = instantiate_from_config(config.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("embedding_manager.") and not p.any():
                p.normal_(0, 0.02)
    return model


def write_random_checkpoint(config_path, path, seed: int = 0) -> str:
    """Save `build_random_model(config_path)` as an original-format Lightning-style checkpoint, or as a bare
    safetensors state dict when `path` ends in .safetensors (what other tools expect of that suffix)."""
    path = os.fspath(path)
    model = build_random_model(config_path, seed)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(SAFETENSORS_SUFFIXES):
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path
