"""Lightning data module whose training stream is a pure function of (seed, batch position).

A run's training batches are numbered b = step * accumulate_grad_batches + (index within the step). Every item is
drawn from a position p = b * global_batch + rank * batch + j. The epoch of p picks a seeded permutation and the
item's own randomness (template, flip) is seeded by p, so a run resumed at step k sees exactly the batches an
uninterrupted run would have seen, whatever the number of workers.
"""
import os
import random
import signal
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.util import instantiate_from_config


VALIDATION_STREAM = -1  # seeds validation items; training positions are never negative


def _mix(*numbers: int) -> int:
    """A stable seed from a few integers (hashing a tuple of ints does not depend on PYTHONHASHSEED)."""
    return hash(tuple(int(n) for n in numbers)) % (2**63)


class SeededItems(Dataset):
    """Wraps a dataset whose items use the global random/numpy/torch RNGs: item (index, seed) is reproducible."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % (2**32))
            with torch.random.fork_rng(devices=[]):  # the CPU generator only, as it restores only that
                torch.random.default_generator.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class PositionSampler(Sampler):
    """Yields (index, item_seed) for this rank's share of each training batch, from the batch `current_batch()`
    returns when iteration begins (after Lightning has restored a resumed run's step).

    An epoch is a whole number of optimizer steps (`batches_per_step` batches each): Lightning steps at an epoch's
    end whether or not the step's batches are complete, and a short step would shift every later batch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 current_batch=lambda: 0, batches_per_step: int = 1):
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.current_batch = current_batch
        self.batches_per_step = batches_per_step

    @property
    def batches_per_epoch(self) -> int:
        distinct = self.num_items // (self.batch_size * self.world_size)
        return max(1, distinct // self.batches_per_step) * self.batches_per_step

    def __len__(self):
        return self.batches_per_epoch * self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))

    def __iter__(self):
        start = self.current_batch()
        epoch = start // self.batches_per_epoch
        order = self._permutation(epoch)
        global_batch = self.batch_size * self.world_size
        for batch in range(start, (epoch + 1) * self.batches_per_epoch):
            for j in range(self.batch_size):
                within_epoch = (batch - epoch * self.batches_per_epoch) * global_batch + self.rank * self.batch_size + j
                position = batch * global_batch + self.rank * self.batch_size + j
                yield int(order[within_epoch % self.num_items]), _mix(self.seed, position)


def init_worker(worker_id: int):
    """Let a worker take SIGTERM as it takes Ctrl-C, and Ctrl-C as Python does (not with the training process's
    handler, which it inherits and which would announce the stop once per worker): PyTorch's worker loop ends
    quietly on KeyboardInterrupt. `timeout`, SLURM and terminals signal the whole process group, and a worker
    killed outright by SIGTERM makes the main process fail in the middle of its last save. Then seed the worker
    as Lightning would have (it adds its own init function only to loaders that have none)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    pl_worker_init_function(worker_id)


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation datasets from configs (the LDM `data:` block), with the step-seeded training stream."""

    def __init__(self, batch_size, train=None, validation=None, test=None, predict=None, wrap=False, num_workers=None, seed=23, **ignored):
        super().__init__()
        if ignored:
            warnings.warn(f"DataModuleFromConfig ignores config keys {sorted(ignored)}", stacklevel=2)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.params.batch_size {batch_size!r} is not a count of at least 1: set the images per "
                             "step, e.g. data.params.batch_size=2")
        self.batch_size = batch_size
        # The original's batch_size * 2, but no more processes than cores: items are pre-decoded and cheap.
        self.num_workers = num_workers if num_workers is not None else min(batch_size * 2, os.cpu_count() or 1)
        self.seed = seed
        self.dataset_configs = {name: cfg for name, cfg in (("train", train), ("validation", validation)) if cfg is not None}
        self.datasets = {}

    def setup(self, stage=None):
        for name, cfg in self.dataset_configs.items():
            if name not in self.datasets:
                self.datasets[name] = instantiate_from_config(cfg)

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches_per_step = trainer.accumulate_grad_batches if trainer is not None else 1
        sampler = PositionSampler(
            len(self.datasets["train"]), self.batch_size, self.seed, rank, world, batches_per_step=batches_per_step,
            current_batch=lambda: trainer.global_step * batches_per_step if trainer is not None else 0,
        )
        return DataLoader(
            SeededItems(self.datasets["train"]),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=init_worker,
        )

    def val_dataloader(self):
        """Every validation pass reads the same items (captions and flips too), so val/loss compares across a run."""
        if "validation" not in self.datasets:
            return []
        dataset = self.datasets["validation"]
        fixed_items = [(index, _mix(self.seed, VALIDATION_STREAM, index)) for index in range(len(dataset))]
        return DataLoader(SeededItems(dataset), batch_size=self.batch_size, sampler=fixed_items,
                          num_workers=self.num_workers, worker_init_fn=init_worker)
