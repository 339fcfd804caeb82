"""ImageLogger's schedule: which training and validation batches get their images logged; TrainingCheckpoint's
retry of a save cut short; StepTimes' choice of the steps it times."""
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from ldm.callbacks import ImageLogger, StepTimes, TrainingCheckpoint


def logged_steps(logger, split, steps, batch_indices=(0,), sanity_checking=False):
    calls = []
    logger.log_images = lambda trainer, module, batch, batch_idx, split: calls.append((trainer.global_step, batch_idx))
    for step in steps:
        trainer = SimpleNamespace(global_step=step, sanity_checking=sanity_checking)
        for batch_idx in batch_indices:
            hook = logger.on_train_batch_end if split == "train" else logger.on_validation_batch_end
            hook(trainer, None, None, None, batch_idx)
    return calls


def test_training_batches_are_logged_every_batch_frequency_steps_and_once_per_step():
    logger = ImageLogger(batch_frequency=500, max_images=8, increase_log_steps=False)
    assert logged_steps(logger, "train", [0, 250, 500, 500, 750, 1000]) == [(500, 0), (1000, 0)]
    doubling = ImageLogger(batch_frequency=8, max_images=8)  # 1, 2, 4, 8, then every 8
    assert [step for step, _ in logged_steps(doubling, "train", range(20))] == [1, 2, 4, 8, 16]


def test_validation_logs_its_first_batch_only_when_it_falls_on_a_logging_step():
    logger = ImageLogger(batch_frequency=500, max_images=8, increase_log_steps=False)
    # One validation per 250-step epoch, as SD v1's config runs: images at 500 and 1000 only, batch 0 only.
    assert logged_steps(logger, "val", [0, 250, 500, 750, 1000], batch_indices=(0, 1, 2)) == [(500, 0), (1000, 0)]
    # A training log at the same step does not stop the validation's (train and val are separate folders).
    logged_steps(logger, "train", [1500])
    assert logged_steps(logger, "val", [1500]) == [(1500, 0)]
    # Lightning's sanity check before a run resumed at a logging step samples nothing.
    assert logged_steps(logger, "val", [2000], sanity_checking=True) == []


def test_a_save_cut_short_by_a_second_ctrl_c_is_made_again(tmp_path):
    """The second Ctrl-C raises KeyboardInterrupt wherever the process is, possibly inside the final save; the
    exception handler's save must then still write, not take the step as saved."""
    interrupted = []

    def save_checkpoint(path, weights_only=False):
        if not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        open(path, "w").close()

    trainer = SimpleNamespace(global_step=17, is_global_zero=True, save_checkpoint=save_checkpoint)
    checkpoint = TrainingCheckpoint(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(trainer, None)
    checkpoint.save(trainer, None)
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_step_times_leave_out_the_warm_up_and_the_steps_that_filled_the_latent_cache(tmp_path, monkeypatch):
    clock = iter([0, 1, 3, 6, 10, 15, 21])  # step n lasts n + 1 seconds
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    path = tmp_path / "times.json"
    timer = StepTimes(str(path), warmup=1, steps=2)
    module = SimpleNamespace(device=torch.device("cpu"), cached_latent_count=0)
    trainer = SimpleNamespace(should_stop=False, world_size=1)
    for cache_after_step in (1, 2, 2, 3, 3, 3):  # steps 0 and 1 fill it, then step 3
        assert not trainer.should_stop
        timer.on_train_batch_start(trainer, module, None, 0)
        module.cached_latent_count = cache_after_step
        timer.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop  # after 3 counted steps: 2 timed, the last one's end is the next one's start
    timer.on_train_end(trainer, module)
    assert json.loads(path.read_text()) == {"seconds": [3, 5], "peak_memory_gib": None, "peak_reserved_gib": None,
                                            "steps_run": 6}
    assert timer.counted == [False, False, True, False, True, True]


def test_an_error_saves_only_a_step_this_run_finished(tmp_path):
    """A resumed run that fails before its first step (restoring the optimizer, say) keeps the last.ckpt it read."""
    saved = []
    trainer = SimpleNamespace(global_step=40, is_global_zero=True, stop_signal=None, strategy=None,
                              save_checkpoint=lambda path, weights_only=False: saved.append(path) or open(path, "w").close())
    module = SimpleNamespace(print=print)
    checkpoint = TrainingCheckpoint(str(tmp_path))
    checkpoint.on_exception(trainer, module, RuntimeError("while restoring"))
    checkpoint.on_train_start(trainer, module)
    checkpoint.on_exception(trainer, module, RuntimeError("in the first step"))
    assert saved == []
    trainer.global_step = 41
    checkpoint.on_exception(trainer, module, RuntimeError("in the second step"))
    assert saved == [os.path.join(str(tmp_path), "last.ckpt.tmp")] and os.listdir(tmp_path) == ["last.ckpt"]
