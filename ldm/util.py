"""Config-driven construction, the LDM idiom: build `target(**params)` from YAML, refusing misspelt keys first."""
import difflib
import importlib
import inspect

import torch
import yaml
from omegaconf import OmegaConf


def get_obj_from_str(dotted_path: str):
    """Import `package.module.Name` and return `Name`."""
    module, _, name = dotted_path.rpartition(".")
    if not module:
        raise ValueError(f"target '{dotted_path}' is not a dotted path such as 'ldm.models.autoencoder.AutoencoderKL'")
    return getattr(importlib.import_module(module), name)


def load_yaml(path):
    """An OmegaConf config of keys from a YAML file; a file that is not one (a syntax error, a binary file such as
    a checkpoint, a list or a number at the top level) is a one-line ValueError that names it."""
    try:
        config = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ValueError(f"config '{path}' is not valid YAML: {' '.join(str(error).split())}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"config '{path}' is not a YAML text file ({error.reason} at byte {error.start}; a "
                         "checkpoint?): pass a .yaml config") from None
    except OSError as error:  # OmegaConf's refusal of a file that holds one number
        raise ValueError(f"config '{path}' is not a YAML file of keys ({error})") from None
    if not OmegaConf.is_dict(config):
        raise ValueError(f"config '{path}' holds a list at its top level, not keys such as model: and data:")
    return config


def instantiate_from_config(config, **kwargs):
    """Build `config.target(**config.params, **kwargs)`, the LDM idiom for YAML-described modules.

    The special values `__is_first_stage__` and `__is_unconditional__` stand for "no module" and return None.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    target = get_obj_from_str(config["target"])
    check_config_keys(target, params)
    return target(**params, **kwargs)


def config_parameters(target):
    """The keyword names `target` (a class of this package or a function) accepts, following `**kwargs` that an
    __init__ hands to its base class; and whether the last of them takes any other key as well."""
    names, takes_any, found = set(), False, False
    for owner in inspect.getmro(target) if inspect.isclass(target) else [target]:
        function = owner.__dict__.get("__init__") if inspect.isclass(target) else owner
        if function is None:
            continue
        if not owner.__module__.startswith("ldm."):
            break
        found = True
        parameters = inspect.signature(function).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
        if not takes_any:
            break
    return names - {"self"}, takes_any or not found


def check_config_keys(target, params, where: str = "") -> set[str]:
    """Refuse a misspelt config key in one line, naming the key (under `where`, its place in the config) and the
    likely intended one, before it becomes a TypeError traceback or, for classes that take other keys (the original
    configs' unused ones) and only warn, a run trained with a default the user meant to change. Returns the keys
    `target` will be built with (a class of another package: all of them)."""
    if not getattr(target, "__module__", "").startswith("ldm."):
        return set(params)
    names, takes_any = config_parameters(target)
    check_keys(params, names, takes_any, f"{target.__qualname__} ({target.__module__})", where)
    return set(params) & names


def check_keys(keys, names, takes_any: bool, owner: str, where: str = ""):
    """A ValueError for the first of `keys` that is not one of `names`; where `takes_any` (other keys are let
    through), only for a near-miss of a name (a typo, not another repository's key such as CompVis's
    scheduler_config: the cutoff sits above such pairs' similarity)."""
    for key in keys:
        if key in names:
            continue
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.85 if takes_any else 0.6)
        if takes_any and not close:
            continue
        hint = f": did you mean '{close[0]}'?" if close else f"; it takes {', '.join(sorted(names))}"
        raise ValueError(f"config key '{where}{key}' is not a setting of {owner}{hint}")


def check_config_tree(config, where: str = ""):
    """check_config_keys for every `target` in a config (found at `where`, e.g. "model.") that will be built, so
    that a misspelt key fails before any weights load. Keys a class lets through unused (CompVis's
    scheduler_config) are not looked into: their targets may name modules this project does not have, and nothing
    builds them."""
    root = OmegaConf.to_container(config) if OmegaConf.is_config(config) else config
    stack = [(root, where)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((value, f"{where}{index}.") for index, value in enumerate(node))
        if not isinstance(node, dict):
            continue
        children = node
        if isinstance(node.get("target"), str):
            params = node.get("params") or {}
            built = check_config_keys(get_obj_from_str(node["target"]), params, f"{where}params.")
            children = {"params": {key: params[key] for key in built}}
        stack.extend((value, f"{where}{key}.") for key, value in children.items())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def exists(x):
    return x is not None


def default(value, fallback):
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback
