"""Train what a config describes, as the original textual_inversion / latent-diffusion `main.py` did:

- a textual-inversion embedding (a model with a `personalization_config`):
  `python main.py --base <config.yaml> -t --actual_resume <model.ckpt> --data_root <images> ...`;
- a model from scratch, e.g. the toy KL autoencoder or text-to-image LDM (the dataset comes from the config):
  `python main.py --base configs/toy/autoencoder.yaml -t`.

The flags are those of the original `main.py`; anything else on the command line in `a.b.c=value` form
overrides the merged YAML configs.
"""
import argparse
import contextlib
import datetime
import glob
import os
import shlex
import signal
import sys

import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ldm.callbacks import ImageLogger, LossProgressBar, SetupCallback, TrainingCheckpoint, TrainingDiverged
from ldm.checkpoint import CheckpointError, load_pickled_checkpoint
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.templates import per_img_token_list
from ldm.embeddings import load_embeddings
from ldm.models.diffusion.ddpm import DEFAULT_SEED
from ldm.modules.embedding_manager import checked_vector_settings, word_list
from ldm.paths import check_output, require_file
from ldm.util import check_config_tree, check_keys, instantiate_from_config, load_yaml

__all__ = ["DataModuleFromConfig", "ImageLogger"]  # old configs name them `main.DataModuleFromConfig` / `main.ImageLogger`

TRAINER_FLAGS = {  # Lightning Trainer flags we accept on the command line, as the original did through add_argparse_args
    "accelerator": str,
    "devices": str,
    "num_nodes": int,
    "strategy": str,
    "precision": str,
    "max_steps": int,
    "accumulate_grad_batches": int,
    "val_check_interval": float,
    "log_every_n_steps": int,
}

# The progress bar reads the logged loss from the GPU, which waits for the GPU's queued work: every 10 steps, not
# at every step, so that the CPU can queue the next step while the GPU runs this one (ldm.callbacks.LossProgressBar).
PROGRESS_BAR_REFRESH_STEPS = 10


class UsageError(Exception):
    """A mistake in the command line or config; main() prints its one-line message and exits with status 2."""


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--name", type=str, default="", help="postfix for the run folder")
    parser.add_argument("-r", "--resume", type=str, default="", help="continue a run: its log folder or a checkpoint in it")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[], help="configs, merged left to right")
    parser.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    parser.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?", help="accepted for compatibility (there is no test stage)")
    parser.add_argument("-p", "--project", help="unused, kept for compatibility")
    parser.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False, help="put the run under <logdir>/debug_runs")
    parser.add_argument("-s", "--seed", type=int, help=f"seed for everything (data order, noise, timesteps); default: "
                        f"{DEFAULT_SEED}, or a resumed run's own")
    parser.add_argument("-f", "--postfix", type=str, default="", help="appended to the run name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="root folder of the runs")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True, help="lr = accumulate x GPUs x batch x base_lr")
    parser.add_argument("--datadir_in_name", type=str2bool, nargs="?", const=True, default=True, help="prefix the run folder with the data folder's name")
    parser.add_argument("--actual_resume", type=str, default="", help="the pretrained model checkpoint (.ckpt or .safetensors); required for textual inversion")
    parser.add_argument("--data_root", type=str, default="", help="folder with the 3-5 training images; required for textual inversion")
    parser.add_argument("--embedding_manager_ckpt", type=str, default="", help="start from an existing embeddings file")
    parser.add_argument("--placeholder_string", type=str, help="the pseudo-word (one token), e.g. '*' or '@'")
    parser.add_argument("--init_word", type=str, help="a one-token word describing the concept, e.g. 'cat'")
    parser.add_argument("--gpus", type=str, default=None, help="'0,' or '0,1' (GPU indices) or an integer count")
    for flag, kind in TRAINER_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, default=None, help=f"Lightning Trainer {flag}")
    return parser


def gpu_indices(text: str) -> list[int] | None:
    """'0,' -> [0], '0,1' -> [0, 1]; None where the text names no GPU index."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return [int(part) for part in parts] if parts and all(part.isdigit() for part in parts) else None


def parse_gpus(gpus: str | None):
    """Lightning-1.x style `--gpus` to (accelerator, devices): '0,' -> [0]; '0,1' -> [0, 1]; '2' -> 2 GPUs; '0' -> CPU."""
    if gpus is None:
        return None, None
    text = str(gpus).strip()
    if "," in text:
        indices = gpu_indices(text)
        if indices is None:
            raise UsageError(f"--gpus '{gpus}' names no GPU: use GPU indices such as --gpus 0, or --gpus 0,1")
        return "gpu", indices
    if not text.isdigit():
        raise UsageError(f"--gpus '{gpus}' is not understood: use GPU indices with a comma (--gpus 0, or --gpus 0,1) or a count (--gpus 2)")
    count = int(text)
    if count == 0:
        print("--gpus 0 means no GPU (Lightning's convention); training on the CPU. Use --gpus 0, for GPU 0.")
        return "cpu", 1
    return "gpu", count


def parse_devices(accelerator: str, devices) -> tuple:
    """Lightning's `devices` (a count, GPU indices '0,1' or a list, 'auto' or -1 for all) and how many that is."""
    if isinstance(devices, (list, tuple)):
        return list(devices), len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        on_cuda = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return text if text == "auto" else -1, torch.cuda.device_count() if on_cuda else 1
    indices = gpu_indices(text) if "," in text else None
    if indices is not None:
        return indices, len(indices)
    if text.isdigit() and int(text) > 0:
        return int(text), int(text)
    raise UsageError(f"--devices '{devices}' is not understood: use a count (--devices 2), GPU indices (--devices 0,1) "
                     "or all of them (--devices auto)")


def resolve_resume(opt):
    """-r accepts a run folder or a checkpoint inside it; returns (logdir, ckpt, saved configs)."""
    if not os.path.exists(opt.resume):
        raise UsageError(f"cannot resume: '{opt.resume}' does not exist (give a run folder such as logs/<run>)")
    if os.path.isfile(opt.resume):
        ckpt = opt.resume
        logdir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    else:
        logdir = opt.resume.rstrip("/")
        ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
    configs = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    if not configs:
        raise UsageError(f"cannot resume: '{logdir}' is not a run folder (it has no configs/); give the folder main.py "
                         "made, such as logs/<run>")
    if not os.path.isfile(ckpt):
        raise UsageError(f"cannot resume: '{ckpt}' does not exist (the run saved no checkpoint yet)")
    try:
        state = load_pickled_checkpoint(ckpt)
    except CheckpointError as error:
        raise UsageError(f"cannot resume: {error}; the run's embeddings_gs-<step>.pt files still hold its words "
                         "(start anew with --embedding_manager_ckpt)") from None
    if not isinstance(state, dict) or "pytorch-lightning_version" not in state:
        raise UsageError(f"cannot resume from '{ckpt}': it is not a training checkpoint; give the run folder "
                         "(-r logs/<run>), whose checkpoints/last.ckpt is one")
    return logdir, ckpt, configs


# The keys a config override may start with; anything else is read by nobody (a typo such as lightnin.trainer...).
OVERRIDE_ROOTS = {"model": {"target", "params", "base_learning_rate"}, "data": {"target", "params"}, "lightning": None}


def check_override(override: str):
    """A leftover command-line word must be a config override such as model.params.x=value: a misspelt flag
    (--max-steps=3) or key (lightnin.trainer.max_steps=3) would otherwise be saved in the config and read by no one."""
    key, equals, _ = override.partition("=")
    if override.startswith("-") or not equals:
        raise UsageError(f"unknown argument '{override}': flags are listed by --help; config overrides look like "
                         "model.params.x=value")
    root, _, rest = key.partition(".")
    second = rest.partition(".")[0]
    if root not in OVERRIDE_ROOTS or (OVERRIDE_ROOTS[root] is not None and second not in OVERRIDE_ROOTS[root]):
        expected = (", ".join(OVERRIDE_ROOTS) if root not in OVERRIDE_ROOTS
                    else ", ".join(f"{root}.{name}" for name in sorted(OVERRIDE_ROOTS[root])))
        raise UsageError(f"config override '{override}' sets a key nothing reads: it must start with {expected}")


def override_config(override: str):
    """One command-line override as a config; YAML it cannot read is named, with how to quote it."""
    check_override(override)
    try:
        return OmegaConf.from_dotlist([override])
    except (yaml.YAMLError, OmegaConfBaseException):
        key, _, value = override.partition("=")
        word = value.strip("[] ") or "value"
        raise UsageError(f"config override '{override}' is not valid YAML: quote the value, e.g. {key}='\"{word}\"' "
                         f"or, for a list, {key}='[\"{word}\"]'") from None


def load_base_config(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"config '{path}' does not exist: pass an existing YAML with --base (e.g. configs/stable-diffusion/v1-finetune.yaml)")
    return load_yaml(path)


def build_config(opt, unknown, base_configs):
    configs = [load_base_config(p) for p in base_configs]
    config = OmegaConf.merge(*configs, *[override_config(override) for override in unknown])
    if "model" not in config:
        raise UsageError("no model in the configs: pass a model config with --base")
    model_params = config.model.setdefault("params", {})
    # A resumed run's saved config holds its seed; anything else starts from --seed or the original's 23.
    model_params.seed = opt.seed if opt.seed is not None else model_params.get("seed", DEFAULT_SEED)
    if opt.actual_resume:
        model_params.ckpt_path = opt.actual_resume
    personalization = model_params.get("personalization_config")
    inversion_flags = [flag for flag, given in (("--data_root", bool(opt.data_root)),
                                                ("--init_word", opt.init_word is not None),
                                                ("--placeholder_string", opt.placeholder_string is not None),
                                                ("--embedding_manager_ckpt", bool(opt.embedding_manager_ckpt)))
                       if given]
    if personalization is None and inversion_flags:
        raise UsageError(f"{inversion_flags[0]} is for textual inversion, but the configs train a model from scratch "
                         "(no personalization_config): use a finetune config such as "
                         "configs/stable-diffusion/v1-finetune.yaml or configs/toy/finetune.yaml")
    if personalization is not None:
        p = personalization.setdefault("params", {})
        for key in ("placeholder_strings", "initializer_words"):
            if isinstance(p.get(key), str):  # one word, not a list of its letters
                p[key] = word_list(p[key])
        if opt.embedding_manager_ckpt:
            p.embedding_manager_ckpt = opt.embedding_manager_ckpt
        if opt.placeholder_string is not None:
            if not opt.placeholder_string.strip():
                raise UsageError("--placeholder_string is empty: give the new word, a rare string such as '*' or 'sks'")
            p.placeholder_strings = [opt.placeholder_string]
        if opt.init_word is not None:  # '' is no initializer word: the vectors start at random
            p.initializer_words = [opt.init_word] + word_list(p.get("initializer_words"))[1:]
    if "data" in config:
        data_params = config.data.setdefault("params", {})
        data_params.seed = model_params.seed
        for split in ("train", "validation"):
            if split in data_params:
                params = data_params[split].setdefault("params", {})
                if opt.data_root:
                    params.data_root = opt.data_root
                if personalization is not None:
                    # The original always wrote '*' into captions.
                    params.placeholder_token = (personalization.params.get("placeholder_strings") or ["*"])[0]
                    params.per_image_tokens = bool(personalization.params.get("per_image_tokens", False))
    absolute_paths(config)
    if personalization is not None and personalization.params.get("embedding_manager_ckpt"):
        p = personalization.params
        check_file_has_the_caption_placeholders(p.embedding_manager_ckpt, (p.get("placeholder_strings") or ["*"])[0],
                                                bool(p.get("per_image_tokens", False)))
    return config


# Config keys that name a file or folder, wherever they sit (the pretrained model's and its autoencoder's
# checkpoints, starting embeddings, image folders, caption templates).
PATH_KEYS = {"ckpt_path", "embedding_manager_ckpt", "data_root", "template_file"}


def absolute_paths(node):
    """Make every PATH_KEYS value under `node` absolute (`~` expanded), so that the run's saved config finds its
    files from any folder (`-r`)."""
    if isinstance(node, DictConfig):
        for key, value in node.items_ex(resolve=False):
            if key in PATH_KEYS and isinstance(value, str) and value and not OmegaConf.is_interpolation(node, key):
                node[key] = os.path.abspath(os.path.expanduser(value))
            else:
                absolute_paths(value)
    elif isinstance(node, ListConfig):
        for item in node:
            absolute_paths(item)


def check_file_has_the_caption_placeholders(path: str, placeholder: str, per_image_tokens: bool):
    """A starting embeddings file brings its own placeholders; captions naming others would train nothing."""
    try:
        held = list(load_embeddings(path).vectors)
    except (ValueError, OSError) as error:
        raise UsageError(f"--embedding_manager_ckpt: {error}") from None
    if placeholder not in held:
        raise UsageError(f"the training captions use the placeholder '{placeholder}', but the embeddings file "
                         f"'{path}' holds {', '.join(repr(p) for p in held)}: add --placeholder_string {shlex.quote(held[0])}")
    if per_image_tokens and not set(per_img_token_list) <= set(held):
        raise UsageError(f"per_image_tokens captions name {len(per_img_token_list)} per-image tokens, which the "
                         f"embeddings file '{path}' does not hold: set per_image_tokens: false, or start from a file "
                         "trained with them")


def trainer_settings(opt, lightning_config):
    settings = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    settings.pop("gpus", None)
    accelerator, devices = parse_gpus(opt.gpus if opt.gpus is not None else lightning_config.get("trainer", {}).get("gpus"))
    if accelerator:
        settings["accelerator"], settings["devices"] = accelerator, devices
    for flag in TRAINER_FLAGS:
        value = getattr(opt, flag)
        if value is not None:
            settings[flag] = value
    if "devices" in settings and "accelerator" not in settings and torch.cuda.is_available():
        settings["accelerator"] = "gpu"  # --devices is Lightning's form of --gpus
    settings.setdefault("accelerator", "cpu")
    settings.setdefault("devices", 1)
    for key, least in (("max_steps", 1), ("accumulate_grad_batches", 1)):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or value < least) and not (key == "max_steps" and value == -1):
            raise UsageError(f"{key} {value} is not a count of at least {least}: set --{key} (or lightning.trainer.{key})")
    if settings["accelerator"] == "gpu" and not torch.cuda.is_available():
        raise UsageError("--gpus asks for a GPU but PyTorch sees none: drop --gpus to train on the CPU, or install a CUDA build of torch")
    if settings["accelerator"] == "cpu" and torch.cuda.is_available():
        print("Training on the CPU although a GPU is available: add --gpus 0, to use it.")
    on_cuda = settings["accelerator"] in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if on_cuda and "precision" not in settings and torch.cuda.is_bf16_supported(including_emulation=False):
        settings["precision"] = "bf16-mixed"
        print("Training in bf16-mixed precision (frozen weights in bf16, the learned vectors in float32): add "
              "--precision 32 for float32 throughout.")
    settings["devices"], num_devices = parse_devices(settings["accelerator"], settings["devices"])
    if num_devices * int(settings.get("num_nodes", 1)) > 1:
        settings.setdefault("strategy", "ddp")
    if settings.get("val_check_interval") is not None and float(settings["val_check_interval"]) >= 1:
        settings["val_check_interval"] = int(settings["val_check_interval"])
        settings.setdefault("check_val_every_n_epoch", None)
    return settings, num_devices * int(settings.get("num_nodes", 1))


# Lightning's DDP launcher starts the ranks after the first by running main.py again, with the environment rank 0
# has then: this passes them rank 0's start time, so that every rank names the same run folder in what it prints.
RUN_START_VARIABLE = "TEXTUAL_INVERSION_RUN_START"


def run_name(opt, base_configs):
    launched_rank = int(os.environ.get("LOCAL_RANK", "0")) > 0
    now = os.environ.get(RUN_START_VARIABLE) if launched_rank else None
    now = now or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ[RUN_START_VARIABLE] = now
    if opt.name:
        name = f"_{opt.name}"
    elif base_configs:
        name = "_" + os.path.splitext(os.path.basename(base_configs[0]))[0]
    else:
        name = ""
    prefix = os.path.basename(os.path.normpath(opt.data_root)) if opt.datadir_in_name and opt.data_root else ""
    return now, prefix + now + name + opt.postfix


def main(argv=None):
    parser = get_parser()
    opt, unknown = parser.parse_known_args(argv)
    if opt.name and opt.resume:
        raise UsageError("-n/--name and -r/--resume cannot be used together: -r continues the run folder it is given")

    ckpt_to_resume = None
    # argparse hands --base every word up to the next flag, overrides too: `--base cfg.yaml a.b=1 -t`
    moved = [entry for entry in opt.base if "=" in entry and not os.path.isfile(entry)]
    opt.base = [entry for entry in opt.base if entry not in moved]
    unknown = moved + unknown
    base_configs = list(opt.base)
    now, nowname = run_name(opt, base_configs)  # `now` also names this invocation's saved configs
    if opt.resume:
        logdir, ckpt_to_resume, saved = resolve_resume(opt)
        base_configs = saved + base_configs  # oldest first: the saved configs' names start with their time
        opt.train = True  # resuming only makes sense to train further
    else:
        check_output(opt.logdir, "-l/--logdir", folder=True)  # now, not after loading the model
        logdir = os.path.join(opt.logdir, "debug_runs" if opt.debug else "", nowname)
    if not base_configs:
        raise UsageError("no config given: pass one with --base (e.g. configs/stable-diffusion/v1-finetune.yaml)")
    if not opt.train:
        raise UsageError("nothing to do without -t: add -t to train (main.py has no test stage)")

    config = build_config(opt, unknown, base_configs)
    check_config_tree(config)
    lightning_config = config.pop("lightning", OmegaConf.create())
    textual_inversion = check_training_config(config)
    every = checkpoint_interval(lightning_config)
    settings, world = trainer_settings(opt, lightning_config)
    lightning_config.trainer = settings
    pl.seed_everything(config.model.params.seed, workers=True)

    ckptdir, cfgdir = os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs")
    data = instantiate_from_config(config.data)
    data.setup()  # before the model: a bad image folder fails at once, not after loading gigabytes of weights
    if textual_inversion:  # the datasets checked the captions' placeholder; the others are swapped in wherever found
        placeholders = word_list(config.model.params.personalization_config.params.get("placeholder_strings"))
        for dataset in data.datasets.values():
            if hasattr(dataset, "refuse_template_words"):
                dataset.refuse_template_words(placeholders)
    for split, dataset in data.datasets.items():
        print(f"{split}: {type(dataset).__name__}, {len(dataset)} items")
    model = instantiate_from_config(config.model)
    if textual_inversion:
        warn_of_cut_captions(model, data)

    model.learning_rate = learning_rate(opt.scale_lr, config, int(settings.get("accumulate_grad_batches", 1)), world)

    checkpointer = TrainingCheckpoint(ckptdir, every_n_train_steps=every)
    callbacks = [
        SetupCallback(now, logdir, ckptdir, cfgdir, config, lightning_config),
        checkpointer,
        LearningRateMonitor(logging_interval="step"),
    ]
    for callback_config in lightning_config.get("callbacks", {}).values():
        callbacks.append(instantiate_from_config(callback_config))
    if not any(isinstance(callback, ProgressBar) for callback in callbacks):
        callbacks.append(LossProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS))
    logger = TensorBoardLogger(save_dir=logdir, name="tensorboard", version=0, default_hp_metric=False)
    try:
        trainer = pl.Trainer(
            **settings, callbacks=callbacks, logger=logger, default_root_dir=logdir, use_distributed_sampler=False,
            num_sanity_val_steps=0, enable_checkpointing=False,  # TrainingCheckpoint writes last.ckpt itself
        )
    except (TypeError, ValueError, MisconfigurationException) as error:  # a misspelt or impossible trainer setting
        raise UsageError(f"the trainer settings (lightning.trainer and the Trainer flags) are refused: {error}") from None
    fit_until_stopped(trainer, checkpointer, model, data, ckpt_to_resume)
    if trainer.stop_signal is not None and trainer.is_global_zero:  # said once, not once per rank
        if os.path.isfile(os.path.join(ckptdir, "last.ckpt")):
            saved = "embeddings and last.ckpt are" if textual_inversion else "last.ckpt is"
            print(f"Stopped at step {trainer.global_step}; {saved} in {ckptdir}. Continue with: python main.py -r {logdir}")
        else:
            print("Stopped before the first training step ended; nothing was saved.")
    return trainer


def warn_of_cut_captions(model, data):
    """One line per dataset whose captions, with the learned words' vectors, run past what the text encoder reads:
    the vectors cut off there get nothing from those captions."""
    manager, length = model.embedding_manager, model.cond_stage_model.max_length
    for split, dataset in data.datasets.items():
        captions = dataset.possible_captions() if hasattr(dataset, "possible_captions") else []
        cut = [caption for caption in captions if manager.cuts_learned_vectors(caption, length)]
        if cut:
            print(f"warning: {len(cut)} of the {len(captions)} {split} captions cut off learned vectors, as the text "
                  f"encoder reads {length} tokens (e.g. '{cut[0]}'): lower num_vectors_per_token or shorten the "
                  "captions")


def check_training_config(config) -> bool:
    """Refuse, before anything is built, a merged config that cannot train: no data block, or textual inversion
    without its pretrained checkpoint or image folder. Returns whether the config is a textual-inversion one."""
    textual_inversion = config.model.params.get("personalization_config") is not None
    if "data" not in config:
        example = "configs/stable-diffusion/v1-finetune.yaml" if textual_inversion else "configs/toy/autoencoder.yaml"
        raise UsageError(f"no data in the configs: pass a training config with a data block with --base (e.g. "
                         f"{example}; inference configs have none)")
    if textual_inversion and not config.model.params.get("ckpt_path"):
        raise UsageError("--actual_resume is required: the pretrained model checkpoint (e.g. models/ldm/stable-diffusion-v1/model.ckpt)")
    pretrained = config.model.params.get("ckpt_path")
    if pretrained:  # now, not after building a model of gigabytes
        require_file(pretrained, "--actual_resume", "check the path (models/README.md says which file goes where)")
    if textual_inversion and not config.data.params.train.params.get("data_root"):
        raise UsageError("--data_root is required: the folder with your 3-5 training images")
    rate = config.model.get("base_learning_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise UsageError(f"model.base_learning_rate {rate!r} is not a positive number: set e.g. "
                         "model.base_learning_rate=5.0e-03")
    if textual_inversion:
        p = config.model.params.personalization_config.get("params", {})
        checked_vector_settings(p.get("num_vectors_per_token", 1), p.get("max_vector_norm"))
    return textual_inversion


def checkpoint_interval(lightning_config):
    """`lightning.modelcheckpoint.params.every_n_train_steps` (500 by default, 0 or None for none), checked.
    Lightning's other ModelCheckpoint settings (monitor, save_top_k, ...) do not apply here; a typo of ours does."""
    params = lightning_config.get("modelcheckpoint", {}).get("params", {})
    check_keys(params, {"every_n_train_steps"}, True, "TrainingCheckpoint (ldm.callbacks)",
               "lightning.modelcheckpoint.params.")
    every = params.get("every_n_train_steps", 500)
    if isinstance(every, float) and every.is_integer():
        every = int(every)
    if every is not None and (not isinstance(every, int) or every < 0):
        raise UsageError(f"every_n_train_steps {every} is not a step count: set "
                         "lightning.modelcheckpoint.params.every_n_train_steps to a number of steps, or 0 for none")
    return every


def learning_rate(scale_lr: bool, config, accumulate: int, world: int) -> float:
    """The config's base_learning_rate, times the images per optimizer step with --scale_lr (the original's
    default), printed as the original printed it."""
    batch_size, base_lr = config.data.params.batch_size, config.model.base_learning_rate
    if not scale_lr:
        print(f"++++ NOT USING LR SCALING ++++\nSetting learning rate to {base_lr:.2e}")
        return base_lr
    rate = accumulate * world * batch_size * base_lr
    print(f"Setting learning rate to {rate:.2e} = {accumulate} (accumulate_grad_batches) * {world} (num_gpus) "
          f"* {batch_size} (batchsize) * {base_lr:.2e} (base_lr)")
    return rate


def fit_until_stopped(trainer, checkpointer: TrainingCheckpoint, model, data, ckpt_to_resume):
    """trainer.fit, where Ctrl-C and SIGTERM finish the step, save and stop (`trainer.stop_signal` says which)."""
    trainer.stop_signal = None
    try:
        with stop_and_save_signals(trainer, checkpointer):
            trainer.fit(model, data, ckpt_path=ckpt_to_resume)
    except SystemExit:  # Lightning's exit after a second Ctrl-C, which TrainingCheckpoint has saved at
        if trainer.stop_signal is None:
            raise
    except Exception as error:
        # Data-loader workers get the signal too (it goes to the whole process group), so fetching the next
        # batch may fail once they are gone; TrainingCheckpoint has saved by then, unless the run diverged.
        if trainer.stop_signal is None or isinstance(error, TrainingDiverged):
            raise


@contextlib.contextmanager
def stop_and_save_signals(trainer, checkpoint: TrainingCheckpoint):
    """For the duration, Ctrl-C / SIGTERM finish the current step, save and stop; a second Ctrl-C stops at once.
    SIGUSR1 (not on Windows) saves at the next step and keeps training. The handlers only record the request;
    `checkpoint` carries it out at a step all ranks agree on. The previous handlers come back after, so a process
    that calls `main()` (a notebook, the tests) keeps its own."""

    def request_stop(signum, frame):
        if trainer.stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # SIGTERM again: a second kill, or a rank's copy of a signal sent to the process group
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving and stopping (press Ctrl-C again to stop now)")
        trainer.stop_signal = signum

    def request_save(signum, frame):
        checkpoint.save_requested = True

    handlers = {signal.SIGINT: request_stop, signal.SIGTERM: request_stop}
    if hasattr(signal, "SIGUSR1"):
        handlers[signal.SIGUSR1] = request_save
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    # Lightning installs its own SIGTERM handler (with ours inside) just before training; under DDP it broadcasts
    # from inside the handler, so when every rank gets the signal (SLURM, `timeout`, a kill of the process group)
    # each rank's broadcast meets another collective of the others and the run hangs. Ours go straight back over
    # it (Lightning restores them, as the handlers it replaced, when training ends).
    connector = trainer._signal_connector
    register_lightnings = connector.register_signal_handlers

    def register_then_ours():
        register_lightnings()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    connector.register_signal_handlers = register_then_ours
    try:
        yield
    finally:
        connector.register_signal_handlers = register_lightnings
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    try:
        trainer = main()
    except (UsageError, FileNotFoundError, ValueError, MisconfigurationException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started (loading the model): nothing to save
        print("\nInterrupted before training started; nothing was written.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if trainer.stop_signal is not None:
        sys.exit(128 + trainer.stop_signal)
