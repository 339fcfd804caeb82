"""Lightning callbacks of a main.py run (textual inversion or pretraining): run folder, checkpoints, sample images."""
import json
import os
import signal
import time

import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from ldm.images import make_grid, tensor_to_pil


class SetupCallback(Callback):
    """Creates the run folder and writes the merged configs into `configs/` before training starts."""

    def __init__(self, now, logdir, ckptdir, cfgdir, config, lightning_config):
        super().__init__()
        self.now, self.logdir, self.ckptdir, self.cfgdir = now, logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            for folder in (self.logdir, self.ckptdir, self.cfgdir):
                os.makedirs(folder, exist_ok=True)
            OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
            OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}), os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))


class LossProgressBar(TQDMProgressBar):
    """Lightning's progress bar showing the training loss, read only when the bar redraws. Reading a number from
    the GPU waits for all its queued work, and Lightning reads a metric logged with `prog_bar=True` at every step,
    whatever the refresh rate; so the bar keeps each step's loss tensor and reads it when it redraws."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_loss = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands on the loss divided by accumulate_grad_batches, as the backward sees it; no outputs
        # when a step was skipped.
        if isinstance(outputs, dict) and outputs.get("loss") is not None:
            self.step_loss = outputs["loss"] * trainer.accumulate_grad_batches
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        if self.step_loss is not None:
            metrics["loss"] = f"{self.step_loss.item():.3g}"
        return metrics


def _on_any_rank(trainer, *flags: bool) -> list[bool]:
    """Whether each of `flags` is set on any rank, the same answers on all of them (one small all-reduce under
    DDP)."""
    if trainer.world_size == 1:
        return list(flags)
    votes = torch.tensor([float(flag) for flag in flags], device=trainer.strategy.root_device)
    return [bool(vote) for vote in trainer.strategy.reduce(votes, reduce_op="max").tolist()]


class TrainingDiverged(ValueError):
    """The learned vectors became NaN or infinite: saving them would replace the last usable ones."""


class TrainingCheckpoint(Callback):
    """Writes a resumable `last.ckpt` (plus `embeddings_gs-<step>.pt` and `embeddings.pt` when the model learns
    pseudo-words) every N steps, at the end, and when training is interrupted (Ctrl-C, SIGTERM, an exception),
    so no run is ever lost. What `last.ckpt` holds is the model's choice (`on_save_checkpoint`).

    Stops and saves asked for by signal (main.py's handlers set `trainer.stop_signal` and `save_requested` on the
    rank that got it) happen at the end of a step that all ranks agree on: saving is collective, and a rank that
    stopped alone would leave the others waiting in a collective for ever.

    A run whose learned vectors become NaN or infinite (it diverged) stops with `TrainingDiverged`, found at the
    next save or logging step (where the logger reads the step's numbers from the device anyway), and saves
    nothing from then on: the files already written keep the last finite vectors."""

    def __init__(self, ckptdir: str, every_n_train_steps: int = 500):
        super().__init__()
        self.ckptdir = ckptdir
        self.every_n_train_steps = every_n_train_steps
        self.save_requested = False  # set from a signal handler; honoured at the next step boundary
        self._last_saved_step = -1
        self._first_step = None  # the step training started at in this process

    def save(self, trainer, pl_module, collective: bool = True):
        """`collective=False` writes from rank 0 without waiting for the other ranks: after an exception, which may
        have stopped this rank alone, they would never join the save (the learned vectors are the same on all)."""
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        self.check_finite(trainer, pl_module)
        last = os.path.join(self.ckptdir, "last.ckpt")
        if collective:
            trainer.save_checkpoint(last + ".tmp", weights_only=False)
        elif trainer.is_global_zero:  # what trainer.save_checkpoint writes, without its closing barrier
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(checkpoint, last + ".tmp")
        if trainer.is_global_zero:
            os.replace(last + ".tmp", last)
            manager = getattr(pl_module, "embedding_manager", None)
            if manager is not None:
                manager.save(os.path.join(self.ckptdir, f"embeddings_gs-{step}.pt"), step=step)
                manager.save(os.path.join(self.ckptdir, "embeddings.pt"), step=step)
        self._last_saved_step = step  # only once written: a save cut short (a second Ctrl-C) is retried

    def check_finite(self, trainer, pl_module):
        """Raise `TrainingDiverged` if the learned vectors hold NaN or infinite values (one read from the device)."""
        manager = getattr(pl_module, "embedding_manager", None)
        diverged = manager.nonfinite_placeholders() if manager is not None else []
        if not diverged:
            return
        logdir = os.path.dirname(self.ckptdir)
        if self._last_saved_step >= 0:
            kept = (f"the last finite ones, of step {self._last_saved_step}, stay in '{self.ckptdir}': lower "
                    f"model.base_learning_rate and resume (-r {logdir})")
        elif os.path.exists(os.path.join(self.ckptdir, "last.ckpt")):
            kept = (f"nothing was saved since this run resumed from '{self.ckptdir}': lower model.base_learning_rate "
                    f"and resume again (-r {logdir})")
        else:
            kept = "nothing was saved: train again with a lower model.base_learning_rate"
        words = ", ".join(f"'{word}'" for word in diverged)
        raise TrainingDiverged(f"training diverged by step {trainer.global_step}: the learned vectors of {words} hold "
                               f"NaN or infinite values; {kept}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop, save = _on_any_rank(trainer, getattr(trainer, "stop_signal", None) is not None, self.save_requested)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # requests wait for the end of the optimizer step: a run resumes exactly only from there
        step = trainer.global_step
        if trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:  # 0: logging off, saves only
            self.check_finite(trainer, pl_module)
        if stop:
            trainer.should_stop = True
            if trainer.stop_signal is None:  # another rank got the signal
                trainer.stop_signal = signal.SIGTERM
        # A stop or the last step saves now: saved after the loop ends, the epoch would count as finished and a
        # resumed run would begin the next one (an epoch too far for max_epochs).
        last_step = 0 < trainer.max_steps <= step
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        if save or stop or last_step or periodic:
            self.save_requested = False
            self.save(trainer, pl_module)
            if save and not stop:
                pl_module.print(f"\nSaved at step {step}, as SIGUSR1 asked, in {self.ckptdir}; training goes on.")

    def on_train_start(self, trainer, pl_module):
        self._first_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, TrainingDiverged):
            return
        # Only a step this run finished is saved: a run that failed while resuming keeps the last.ckpt it resumed.
        if self._first_step is not None and trainer.global_step > self._first_step:
            signum = getattr(trainer, "stop_signal", None)  # main.py's record of a stop it was asked for
            cause = signal.Signals(signum).name if signum is not None else type(exception).__name__
            pl_module.print(f"\nTraining stopped ({cause}); saving at step {trainer.global_step}.")
            # Without a collective where the strategy allows (one device, plain DDP): FSDP and DeepSpeed gather
            # the state across ranks, so there the save stays collective.
            plain = isinstance(trainer.strategy, SingleDeviceStrategy) or type(trainer.strategy) is DDPStrategy
            try:
                self.save(trainer, pl_module, collective=not plain)
            except TrainingDiverged as error:
                pl_module.print(f"Not saved: {error}")


class ImageLogger(Callback):
    """Every `batch_frequency` steps, saves grids of what the model's `log_images` returns (inputs,
    reconstructions, captions, samples) to `images/<split>/` and to TensorBoard: for the training batch of that
    step, and for the first validation batch when a validation falls on such a step (as the original did:
    sampling at every validation would cost a fast run as much time as its training)."""

    def __init__(self, batch_frequency, max_images, clamp=True, increase_log_steps=True, disabled=False, log_first_step=False, log_images_kwargs=None):
        super().__init__()
        self.batch_frequency = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.disabled = disabled
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_steps = {2**n for n in range(batch_frequency.bit_length())} if increase_log_steps else set()
        self._last_logged_step = -1

    def _scheduled(self, step: int) -> bool:
        if step == 0:
            return self.log_first_step
        return step % self.batch_frequency == 0 or step in self.log_steps

    def _save(self, trainer, split, images, step, epoch, batch_idx):
        folder = os.path.join(trainer.logger.save_dir if trainer.logger else trainer.default_root_dir, "images", split)
        os.makedirs(folder, exist_ok=True)
        for key, value in images.items():
            grid = make_grid((value + 1.0) / 2.0, nrow=4)
            tensor_to_pil(grid).save(os.path.join(folder, f"{key}_gs-{step:06}_e-{epoch:06}_b-{batch_idx:06}.jpg"), quality=92)
            if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_image"):
                trainer.logger.experiment.add_image(f"{split}/{key}", grid.clamp(0, 1), global_step=step)

    def log_images(self, trainer, pl_module, batch, batch_idx, split):
        step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        start = time.time()
        with torch.no_grad():
            images = pl_module.log_images(batch, N=self.max_images, **self.log_images_kwargs)
        images = {k: v[: self.max_images].detach().float().cpu() for k, v in images.items() if isinstance(v, torch.Tensor)}
        if self.clamp:
            images = {k: v.clamp(-1.0, 1.0) for k, v in images.items()}
        if trainer.is_global_zero:
            self._save(trainer, split, images, step, trainer.current_epoch, batch_idx)
        if was_training:
            pl_module.train()
        pl_module.print(f"Logged {split} images at step {step} in {time.time() - start:.1f}s")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        # Several micro-batches share a step under gradient accumulation: the first one's images are logged.
        if not self.disabled and step != self._last_logged_step and self._scheduled(step):
            self._last_logged_step = step
            self.log_images(trainer, pl_module, batch, batch_idx, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        step = trainer.global_step
        if not self.disabled and step > 0 and batch_idx == 0 and not trainer.sanity_checking and self._scheduled(step):
            self.log_images(trainer, pl_module, batch, batch_idx, "val")


class StepTimes(Callback):
    """Times the run's own training loop (data loader, Lightning's hooks, logging, progress bar) for
    `scripts/benchmark.py --main_loop`: the time from each step's start to the next one's, recorded without waiting
    for the GPU (CUDA events there). Steps that met an image the latent cache did not hold yet, and the first
    `warmup`, are left out; after `steps` others the run stops and `path` gets their times (seconds), the most
    memory any of them allocated and reserved (GiB, CUDA only: a CUDA graph's replay allocates nothing, its pool
    is reserved) and how many steps ran."""

    def __init__(self, path: str, warmup: int, steps: int):
        super().__init__()
        self.path, self.warmup, self.steps = path, warmup, steps
        self.starts, self.counted, self.peaks, self.reserved = [], [], [], []
        self._cached = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.starts.append(event)
        else:
            self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cached, self._cached = self._cached, pl_module.cached_latent_count
        counted = len(self.starts) > self.warmup and cached == self._cached
        self.counted.append(counted)
        if counted and pl_module.device.type == "cuda":
            self.peaks.append(torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
            self.reserved.append(torch.cuda.max_memory_reserved(pl_module.device) / 2**30)
        # The last one counted needs the next step's start. Ranks cache different images, so they agree on the stop.
        if _on_any_rank(trainer, sum(self.counted) > self.steps)[0]:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            seconds = [start.elapsed_time(end) / 1e3 for start, end in zip(self.starts, self.starts[1:])]
        else:
            seconds = [end - start for start, end in zip(self.starts, self.starts[1:])]
        times = [time for time, counted in zip(seconds, self.counted) if counted][:self.steps]
        with open(self.path, "w") as handle:
            json.dump({"seconds": times, "peak_memory_gib": max(self.peaks, default=None),
                       "peak_reserved_gib": max(self.reserved, default=None), "steps_run": len(self.starts)}, handle)
