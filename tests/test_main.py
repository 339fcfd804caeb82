"""main.py end to end on the CPU with tiny random models: run folder, checkpoints, resume, errors, DDP."""
import glob
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main as main_module
from ldm.callbacks import TrainingDiverged
from ldm.checkpoint import build_random_model
from ldm.data.personalized import PersonalizedBase
from ldm.embeddings import Embeddings, load_embeddings, save_embeddings
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config
from tests.conftest import REPO, TINY_LDM, TINY_SD

QUIET = ["lightning.callbacks.image_logger.params.disabled=True"]


def run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, env=env, **kwargs)


def only_run(logroot):
    runs = glob.glob(os.path.join(logroot, "*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_cli_end_to_end_sd(tmp_path, images, tiny_sd_ckpt):
    logroot = tmp_path / "logs"
    result = run_cli(
        ["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "-n", "my_run", "--data_root", str(images),
         "--init_word", "cat", "-l", str(logroot), "--no-test"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Setting learning rate to 1.00e-02 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 2 (batchsize)" in result.stdout
    run = only_run(logroot)
    assert os.path.basename(run).startswith("my_cat") and run.endswith("_my_run")
    configs = sorted(os.listdir(os.path.join(run, "configs")))
    assert any(c.endswith("-project.yaml") for c in configs) and any(c.endswith("-lightning.yaml") for c in configs)
    checkpoints = set(os.listdir(os.path.join(run, "checkpoints")))
    assert {"embeddings.pt", "embeddings_gs-10.pt", "embeddings_gs-20.pt", "last.ckpt"} <= checkpoints
    grids = os.listdir(os.path.join(run, "images", "train"))
    for key in ("inputs", "reconstruction", "conditioning", "samples", "samples_scaled"):
        assert any(g.startswith(f"{key}_gs-000010") for g in grids), (key, grids)
    assert glob.glob(os.path.join(run, "tensorboard", "**", "events.*"), recursive=True)

    # last.ckpt holds the learned vectors, optimizer state and step, not the frozen model.
    last = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    assert last["global_step"] == 20 and last["optimizer_states"]
    assert all(k.startswith("embedding_manager.") for k in last["state_dict"])

    # Only the placeholder changed: every other token embedding is bit-identical to the pretrained table.
    learned = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt"))
    assert learned.metadata["step"] == 20 and learned.metadata["initializer_words"] == ["cat"]
    model = build_random_model(TINY_SD)
    table = torch.load(tiny_sd_ckpt, weights_only=False)["state_dict"]["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert torch.equal(model.cond_stage_model.embed_tokens(torch.arange(49408)[None])[0], table)
    cat_id = model.cond_stage_model.text_to_token_ids("cat")[0]
    assert torch.isfinite(learned.vectors["*"]).all()
    assert not torch.equal(learned.vectors["*"][0], table[cat_id]), "the learned vector never moved from its init word"


def test_gradient_accumulation_trains_across_epochs(tmp_path, images, tiny_sd_ckpt):
    """4 images in batches of 2, two batches per step: one step per epoch. The data stream once counted steps as
    batches, replayed data at each epoch and finally stalled (an epoch of one batch never completes a step)."""
    result = run_cli(["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images),
                      "-l", str(tmp_path / "logs"), "--accumulate_grad_batches", "2", "data.params.train.params.repeats=1",
                      "lightning.trainer.max_steps=6", "lightning.modelcheckpoint.params.every_n_train_steps=2", *QUIET],
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = set(os.listdir(os.path.join(only_run(tmp_path / "logs"), "checkpoints")))
    assert {"embeddings_gs-2.pt", "embeddings_gs-4.pt", "embeddings_gs-6.pt"} <= checkpoints
    assert "embeddings_gs-0.pt" not in checkpoints
    learned = load_embeddings(os.path.join(only_run(tmp_path / "logs"), "checkpoints", "embeddings.pt"))
    assert learned.metadata["step"] == 6


def train_in_process(tmp_path, images, ckpt, *extra, config=TINY_SD, steps=20):
    argv = ["--base", config, "-t", "--actual_resume", ckpt, "--data_root", str(images), "-l", str(tmp_path / "logs"),
            f"lightning.trainer.max_steps={steps}", *QUIET, *extra]
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    trainer = main_module.main(argv)
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers  # ours were restored
    return trainer, only_run(tmp_path / "logs")


def test_ldm_multi_placeholder_multi_vector_and_captions(tmp_path, images, tiny_ldm_ckpt):
    trainer, run = train_in_process(
        tmp_path, images, tiny_ldm_ckpt, "--placeholder_string", "@",
        "model.params.personalization_config.params.num_vectors_per_token=2", "lightning.trainer.log_every_n_steps=5",
        "model.params.personalization_config.params.progressive_words=true", config=TINY_LDM, steps=10,
    )
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.lightning_module.embedding_manager.training_step == 9  # what progressive words count
    assert trainer.progress_bar_callback.refresh_rate == main_module.PROGRESS_BAR_REFRESH_STEPS
    dataset = trainer.datamodule.datasets["train"]
    captions = {dataset[i]["caption"] for i in range(20)}
    assert all("@" in c and "*" not in c for c in captions), captions
    learned = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt"))
    assert list(learned.vectors) == ["@"] and learned.vectors["@"].shape == (2, 32)
    saved = OmegaConf.load(glob.glob(os.path.join(run, "configs", "*-project.yaml"))[0])
    assert saved.model.params.personalization_config.params.placeholder_strings == ["@"]
    # The trained model's own token table is untouched: every token but the placeholder embeds as before.
    table = torch.load(tiny_ldm_ckpt, weights_only=False)["state_dict"]["cond_stage_model.transformer.token_emb.weight"]
    encoder = trainer.lightning_module.cond_stage_model
    assert torch.equal(encoder.embed_tokens(torch.arange(table.shape[0])[None])[0], table)
    assert not torch.equal(learned.vectors["@"][0], table[encoder.text_to_token_ids("@")[0]])


def record_step_losses(monkeypatch) -> dict:
    """Every training batch's loss, by (step as Lightning counts it and names it to the logger, batch index)."""
    losses = {}
    training_step = LatentDiffusion.training_step

    def recording_step(module, batch, batch_idx):
        output = training_step(module, batch, batch_idx)
        losses[module.trainer.fit_loop.epoch_loop._batches_that_stepped, batch_idx] = output["loss"].item()
        return output

    monkeypatch.setattr(LatentDiffusion, "training_step", recording_step)
    return losses


def test_the_progress_bar_reads_the_loss_only_when_it_redraws(tmp_path, images, tiny_sd_ckpt, monkeypatch):
    """Reading a number from the GPU waits for its queued work. Lightning reads every metric logged with
    prog_bar=True at every step, whatever the refresh rate, so none may be: the bar keeps the step's loss and reads
    it when it redraws (every PROGRESS_BAR_REFRESH_STEPS), undivided by gradient accumulation."""
    losses = record_step_losses(monkeypatch)
    trainer, _ = train_in_process(tmp_path, images, tiny_sd_ckpt, "lightning.trainer.accumulate_grad_batches=2", steps=2)
    assert trainer.progress_bar_metrics == {} and len(losses) == 4
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    assert float(shown["loss"]) == pytest.approx(list(losses.values())[-1], rel=1e-2)


def test_training_metrics_are_logged_only_at_the_steps_the_logger_writes(tmp_path, images, tiny_sd_ckpt, monkeypatch):
    """Lightning drops step metrics between its writes, and each self.log costs CPU time at every step."""
    logged_at = []
    log = pl.LightningModule.log

    def counting_log(module, name, *args, **kwargs):
        if module.training:
            logged_at.append((module.global_step, name))
        return log(module, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counting_log)
    _, run = train_in_process(tmp_path, images, tiny_sd_ckpt, "lightning.trainer.log_every_n_steps=3", steps=7)
    assert {step for step, _ in logged_at} == {3, 6}  # counted after the optimizer step
    assert {name for step, name in logged_at if step == 3} >= {"train/loss", "train/loss_simple", "train/norm/*"}
    events = EventAccumulator(os.path.join(run, "tensorboard", "version_0"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [2, 5]
    assert [event.step for event in events.Scalars("train/norm/*")] == [2, 5]


def test_a_model_that_keeps_its_scale_factor_caches_latents_too(tmp_path, images, tiny_sd_ckpt):
    """`scale_by_std` (the toy configs) holds the checkpoint's scale factor; the cache keeps unscaled posteriors."""
    trainer, _ = train_in_process(tmp_path, images, tiny_sd_ckpt, "model.params.scale_by_std=true", steps=3)
    model = trainer.lightning_module
    assert model.cached_latent_count > 0 and float(model.scale_factor) == pytest.approx(0.18215)  # the config's


class CtrlC(pl.Callback):
    """Presses Ctrl-C at the end of step `step`, twice with `again` as an impatient user does: the second press
    raises KeyboardInterrupt there, inside the training loop, and stops at once."""

    def __init__(self, step: int, again: bool = False):
        self.step = step
        self.again = again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.stop_signal is None:
            os.kill(os.getpid(), signal.SIGINT)
            assert trainer.stop_signal == signal.SIGINT
            if self.again:
                os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_stopped_run_saves_at_the_end_of_a_step_inside_its_epoch(tmp_path, images, tiny_sd_ckpt, accumulate):
    """Saved after Lightning ends the loop, the epoch would count as finished: a resumed run would start the next
    one (stopping an epoch early under max_epochs). Saved in the middle of an accumulated step, a resumed run would
    not redo that step's first batches."""
    trainer, run = train_in_process(tmp_path, images, tiny_sd_ckpt, f"lightning.callbacks.ctrl_c.target={__name__}.CtrlC",
                                    "lightning.callbacks.ctrl_c.params.step=3", "--accumulate_grad_batches",
                                    str(accumulate), steps=40)
    assert trainer.stop_signal == signal.SIGINT
    last = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)
    assert (last["global_step"], last["epoch"]) == (trainer.global_step, 0)
    batches = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert batches == trainer.global_step * accumulate


class CtrlCTwiceInsideStep(pl.Callback):
    """Presses Ctrl-C twice just before step `step`'s backward: the run stops inside the step and saves there."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("stop", ["CtrlC", "CtrlCTwiceInsideStep"])
def test_the_logger_gets_each_steps_own_metrics_at_a_stop_and_after_a_resume(tmp_path, images, tiny_sd_ckpt,
                                                                             monkeypatch, stop):
    """Lightning also writes the metrics of the step that it stops after, and after a resume from a save made
    inside a step its count of steps runs one ahead of global_step: each point must still hold its step's value."""
    losses = record_step_losses(monkeypatch)
    _, run = train_in_process(tmp_path, images, tiny_sd_ckpt, "lightning.trainer.log_every_n_steps=3",
                              f"lightning.callbacks.stop.target={__name__}.{stop}", "lightning.callbacks.stop.params.step=4",
                              steps=40)
    main_module.main(["-r", run, "lightning.trainer.max_steps=12", "lightning.callbacks.stop.params.step=1000", *QUIET])
    events = EventAccumulator(os.path.join(run, "tensorboard", "version_0"))
    events.Reload()
    written = [(event.step, event.value) for event in events.Scalars("train/loss")]
    last_of_step = {step: loss for (step, _), loss in losses.items()}  # one batch a step here
    assert len(written) >= 4 and all(value == pytest.approx(last_of_step[step]) for step, value in written), written


class SigtermAtFirstBatch(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_inside_an_accumulated_step_finishes_the_step_and_saves_as_ctrl_c_does(tmp_path, images, tiny_sd_ckpt):
    """Lightning's own SIGTERM handler stopped after the step's first batch, before the optimizer step, and nothing
    was saved; main.py's handlers replace it when training starts."""
    trainer, run = train_in_process(tmp_path, images, tiny_sd_ckpt, "--accumulate_grad_batches", "4",
                                    f"lightning.callbacks.sigterm.target={__name__}.SigtermAtFirstBatch")
    assert trainer.global_step == 1 and trainer.stop_signal == signal.SIGTERM
    assert load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt")).metadata["step"] == 1
    assert torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)["global_step"] == 1


def test_a_stop_before_the_first_step_ends_says_nothing_was_saved(tmp_path, images, tiny_sd_ckpt, capsys):
    trainer, run = train_in_process(tmp_path, images, tiny_sd_ckpt,
                                    f"lightning.callbacks.stop.target={__name__}.CtrlCTwiceInsideStep",
                                    "lightning.callbacks.stop.params.step=0")
    assert trainer.global_step == 0 and not os.path.exists(os.path.join(run, "checkpoints", "last.ckpt"))
    output = capsys.readouterr().out
    assert "nothing was saved" in output and "Continue with" not in output


def test_a_second_ctrl_c_stops_at_once_and_still_saves(tmp_path, images, tiny_sd_ckpt, capsys):
    trainer, run = train_in_process(tmp_path, images, tiny_sd_ckpt, "--init_word", "cat",
                                    f"lightning.callbacks.ctrl_c.target={__name__}.CtrlC",
                                    "lightning.callbacks.ctrl_c.params.step=3", "lightning.callbacks.ctrl_c.params.again=true")
    assert trainer.stop_signal == signal.SIGINT and trainer.global_step == 3
    assert load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt")).metadata["step"] == 3
    assert torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)["global_step"] == 3
    output = capsys.readouterr().out
    assert "Training stopped (SIGINT); saving at step 3" in output  # the training loop was left by the exception
    assert f"Continue with: python main.py -r {run}" in output


def test_interrupt_then_resume_reaches_the_uninterrupted_result(tmp_path, images, tiny_sd_ckpt):
    common = ["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images), "--init_word", "cat",
              "lightning.trainer.max_steps=40", "lightning.modelcheckpoint.params.every_n_train_steps=5", *QUIET]
    reference = run_cli([*common, "-l", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = load_embeddings(os.path.join(only_run(tmp_path / "ref"), "checkpoints", "embeddings.pt"))

    logroot = tmp_path / "logs"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "main.py", *common, "-l", str(logroot)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not glob.glob(str(logroot / "*" / "checkpoints" / "embeddings_gs-10.pt")):
        assert process.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
    run = only_run(logroot)
    interrupted = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt"))
    stopped_at = interrupted.metadata["step"]
    assert 10 <= stopped_at < 40, output[-2000:]
    assert torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)["global_step"] == stopped_at

    resumed = run_cli(["-r", run, *QUIET])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt"))
    assert final.metadata["step"] == 40
    assert torch.equal(final.vectors["*"], expected.vectors["*"])


def test_a_resumed_run_uses_the_learning_rate_this_command_sets(tmp_path, images, tiny_sd_ckpt):
    """The optimizer state a run resumes with holds the old learning rate; main.py prints the new one."""
    _, run = train_in_process(tmp_path, images, tiny_sd_ckpt, steps=2)
    trainer = main_module.main(["-r", run, "--max_steps", "3", "model.base_learning_rate=1.0e-4", *QUIET])
    new_rate = trainer.lightning_module.learning_rate
    assert new_rate == pytest.approx(1.0e-4 * trainer.datamodule.batch_size)
    last = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)
    assert last["global_step"] == 3 and last["optimizer_states"][0]["param_groups"][0]["lr"] == new_rate
    assert last["epoch"] == 0, "saved at its last step, inside the epoch it was in"
    with pytest.raises(ValueError, match=r"holds the learned words '\*' \(1 vector\), but this run's config names '@'"):
        main_module.main(["-r", run, "--max_steps", "4", "--placeholder_string", "@", *QUIET])
    assert torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)["global_step"] == 3


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path, images, tiny_sd_ckpt, monkeypatch):
    monkeypatch.chdir(images.parent)
    main_module.main(["--base", TINY_SD, "-t", "--actual_resume", os.path.relpath(tiny_sd_ckpt),
                      "--data_root", images.name, "-l", "logs", "lightning.trainer.max_steps=2", *QUIET])
    run = os.path.abspath(only_run("logs"))
    monkeypatch.chdir(tmp_path.parent)
    trainer = main_module.main(["-r", run, "--max_steps", "3", *QUIET])
    assert trainer.global_step == 3
    assert trainer.datamodule.datasets["train"].image_paths[0].startswith(str(images))


def test_every_path_of_the_saved_config_is_absolute_wherever_it_sits(tmp_path, monkeypatch, images):
    """Nested ones too (the toy model's autoencoder checkpoint), `~` expanded before any file is read."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))
    save_embeddings(Embeddings({"*": torch.zeros(1, 32)}), tmp_path / "start.pt")
    opt, unknown = main_module.get_parser().parse_known_args(
        ["--embedding_manager_ckpt", "~/start.pt", "--data_root", os.path.relpath(images)])
    config = main_module.build_config(opt, unknown, [TINY_SD])
    assert config.model.params.personalization_config.params.embedding_manager_ckpt == str(tmp_path / "start.pt")
    assert config.data.params.train.params.data_root == str(images)
    toy = main_module.build_config(*main_module.get_parser().parse_known_args([]), ["configs/toy/txt2img.yaml"])
    autoencoder = toy.model.params.first_stage_config.params.ckpt_path
    assert autoencoder == os.path.join(REPO, "models", "ldm", "toy", "autoencoder.safetensors")
    finetune = main_module.build_config(*main_module.get_parser().parse_known_args([]), ["configs/toy/finetune.yaml"])
    assert finetune.data.params.train.params.template_file == os.path.join(REPO, "configs", "toy", "templates.txt")


def test_sigterm_to_the_process_group_saves_with_data_workers(tmp_path, images, tiny_sd_ckpt):
    """`timeout`, SLURM and a terminal signal every process of the group, data-loader workers too: the workers
    end quietly, and the main process saves, says how to continue and exits 128 + SIGTERM."""
    logroot = tmp_path / "logs"
    args = ["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images), "--init_word", "cat",
            "-l", str(logroot), "data.params.num_workers=2", "lightning.trainer.max_steps=400",
            "lightning.modelcheckpoint.params.every_n_train_steps=5", *QUIET]
    process = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not glob.glob(str(logroot / "*" / "checkpoints" / "embeddings_gs-10.pt")):
        assert process.poll() is None and time.time() < deadline, "training ended before it could be stopped"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "killed by signal" not in output and "Continue with: python main.py -r" in output, output[-3000:]
    run = only_run(logroot)
    saved = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt")).metadata["step"]
    assert 10 <= saved < 400, output[-2000:]
    assert torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)["global_step"] == saved


class PoisonVectors(pl.Callback):
    """Makes the learned vectors NaN at the end of step `step`, as a diverged optimizer step would; with
    `ctrl_c`, Ctrl-C is pressed in that step too."""

    def __init__(self, step: int, ctrl_c: bool = False):
        self.step = step
        self.ctrl_c = ctrl_c

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.embedding_manager.vectors("*").data.fill_(float("nan"))
            if self.ctrl_c:
                os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("ctrl_c", [False, True])
def test_a_diverged_run_stops_and_keeps_the_last_finite_embeddings(tmp_path, images, tiny_sd_ckpt, ctrl_c):
    """NaN vectors are found at the next logging step (every 5 here) or save (every 10), a Ctrl-C's included, and
    never written over the last finite ones."""
    poison = [f"lightning.callbacks.poison.target={__name__}.PoisonVectors", "lightning.callbacks.poison.params.step=12",
              f"lightning.callbacks.poison.params.ctrl_c={ctrl_c}"]
    stopped_at = 13 if ctrl_c else 15  # the poison comes after the checkpoint callback's turn at step 12
    with pytest.raises(TrainingDiverged, match=f"diverged by step {stopped_at}: the learned vectors of '\\*' hold NaN "
                                               "or infinite values; the last finite ones, of step 10, stay in"):
        train_in_process(tmp_path, images, tiny_sd_ckpt, *poison)
    checkpoints = os.path.join(only_run(tmp_path / "logs"), "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["embeddings.pt", "embeddings_gs-10.pt", "last.ckpt"]
    assert load_embeddings(os.path.join(checkpoints, "embeddings.pt")).metadata["step"] == 10
    assert torch.load(os.path.join(checkpoints, "last.ckpt"), weights_only=False)["global_step"] == 10


def test_a_run_that_diverges_from_the_start_says_so_in_one_line(tmp_path, images, tiny_sd_ckpt):
    """With logging off (--log_every_n_steps 0) the first save (step 2 here) finds it."""
    result = run_cli(["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images),
                      "-l", str(tmp_path / "logs"), "model.base_learning_rate=1e30", "--log_every_n_steps", "0",
                      "lightning.modelcheckpoint.params.every_n_train_steps=2", *QUIET], timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: training diverged by step 2: the learned vectors of '*' hold NaN or infinite values; nothing was "
        "saved: train again with a lower model.base_learning_rate")
    assert "Traceback" not in result.stderr
    assert os.listdir(os.path.join(only_run(tmp_path / "logs"), "checkpoints")) == []


@pytest.mark.parametrize("vectors, template_lines, warned", [
    (1, None, None),
    (72, None, "41 of the 57 train captions cut off learned vectors, as the text encoder reads 77 tokens (e.g. 'a "
               "cropped photo of the *')"),
    (75, None, "57 of the 57 train captions"),
    (8, ["a photo of [filewords] and [name]"], "1 of the 1 train captions"),
])
def test_captions_that_cut_off_learned_vectors_are_warned_of(images, capsys, vectors, template_lines, warned):
    config = OmegaConf.load(TINY_SD)
    config.model.params.personalization_config.params.num_vectors_per_token = vectors
    model = instantiate_from_config(config.model)
    dataset = PersonalizedBase(str(images), size=8)
    if template_lines is not None:
        dataset.template_lines, dataset.image_captions = template_lines, ["a very " * 40 + "red cat"] * 4
    main_module.warn_of_cut_captions(model, SimpleNamespace(datasets={"train": dataset}))
    printed = capsys.readouterr().out
    assert (f"warning: {warned}" in printed) if warned else "warning" not in printed, printed


def test_usage_errors_are_one_line(tmp_path, images, tiny_sd_ckpt):
    missing = run_cli(["--base", TINY_SD, "-t", "--data_root", str(images), "-l", str(tmp_path)])
    assert missing.returncode == 2 and "--actual_resume is required" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    if not torch.cuda.is_available():
        with pytest.raises(main_module.UsageError, match="sees none"):
            main_module.main(["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images), "--gpus", "0,", "-l", str(tmp_path)])

    # main.py prints these ValueErrors in one line and exits 2, as the first (in-process: a start-up less each)
    with pytest.raises(ValueError, match="initializer word 'leavanny' is not one CLIP"):
        main_module.main(["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images),
                          "--init_word", "leavanny", "-l", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"data_root '{empty}' holds no images"):
        main_module.main(["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(empty),
                          "-l", str(tmp_path)])


@pytest.mark.parametrize("extra, message", [
    (["--max-steps=3"], "unknown argument '--max-steps=3': flags are listed by --help"),
    (["cat"], "unknown argument 'cat'"),
    (["lightnin.trainer.max_steps=5"], "'lightnin.trainer.max_steps=5' sets a key nothing reads: it must start with "
                                       "model, data, lightning"),
    (["model.param.embedding_reg_weight=1"], "must start with model.base_learning_rate, model.params, model.target"),
    (["lightning.modelcheckpoint.params.every_n_train_steps=often"], "every_n_train_steps often is not a step count"),
    (["--max_steps", "0"], "max_steps 0 is not a count of at least 1: set --max_steps"),
    (["--accumulate_grad_batches", "0"], "accumulate_grad_batches 0 is not a count of at least 1"),
    (["lightning.trainer.max_step=3"], "trainer settings .* are refused: .*max_step"),
    (["--gpus", "a,b"], "--gpus 'a,b' names no GPU"),
])
def test_trainer_setting_mistakes_are_named(tmp_path, images, tiny_sd_ckpt, extra, message):
    argv = ["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images),
            "-l", str(tmp_path / "logs"), *extra]
    with pytest.raises(main_module.UsageError, match=message):
        main_module.main(argv)


def test_command_line_mistakes_fail_before_any_model_loads(tmp_path, images, tiny_sd_ckpt, monkeypatch):
    def building(config, **kwargs):
        raise AssertionError(f"{config.target} was built before the mistake was found")

    monkeypatch.setattr(main_module, "instantiate_from_config", building)

    def fails(argv, message, error=main_module.UsageError):
        with pytest.raises(error, match=message):
            main_module.main(argv)

    inversion = ["--actual_resume", tiny_sd_ckpt, "--data_root", str(images)]
    fails(["--base", TINY_SD, *inversion, "-l", str(tmp_path)], "nothing to do without -t")
    fails(["--base", TINY_SD, "-t", *inversion, "-l", str(tmp_path),
           "model.params.personalization_config.params.num_vectors_per_tokens=4"],
          "did you mean 'num_vectors_per_token'", ValueError)
    fails(["--base", TINY_SD, "-t", *inversion, "-l", str(tmp_path), "lightning.modelcheckpoint.params.every_n_train_step=9"],
          "'lightning.modelcheckpoint.params.every_n_train_step' is not a setting of TrainingCheckpoint .*: did you mean "
          "'every_n_train_steps'", ValueError)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  params: [unclosed\n")
    fails(["--base", str(broken), "-t", *inversion, "-l", str(tmp_path)], "broken.yaml' is not valid YAML", ValueError)
    toy_pretraining = os.path.join(REPO, "configs", "toy", "txt2img.yaml")
    fails(["--base", toy_pretraining, "-t", "--data_root", str(images), "-l", str(tmp_path)],
          "--data_root is for textual inversion, but the configs train a model from scratch")
    inference = os.path.join(REPO, "configs", "stable-diffusion", "v1-inference.yaml")
    fails(["--base", inference, "-t", *inversion, "-l", str(tmp_path)], "no data in the configs.*v1-finetune.yaml")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    fails(["--base", TINY_SD, "-t", *inversion, "-l", str(a_file / "logs")], "-l/--logdir .* is a file", ValueError)
    (tmp_path / "not_a_run").mkdir()
    fails(["-r", str(tmp_path / "not_a_run")], "is not a run folder")
    fails(["--base", TINY_SD, "-t", "--actual_resume", str(tmp_path / "nope.ckpt"), "--data_root", str(images),
           "-l", str(tmp_path)], "--actual_resume .*nope.ckpt' does not exist", FileNotFoundError)
    fails(["--base", TINY_SD, "-t", "--actual_resume", str(tmp_path), "--data_root", str(images), "-l", str(tmp_path)],
          "is a folder: pass the file inside it", ValueError)
    at_file = tmp_path / "at.pt"
    save_embeddings(Embeddings({"@": torch.randn(1, 32)}), at_file)
    fails(["--base", TINY_SD, "-t", *inversion, "--embedding_manager_ckpt", str(at_file), "-l", str(tmp_path)],
          r"captions use the placeholder '\*', but the embeddings file .*at.pt' holds '@': add --placeholder_string @")


PERSONALIZATION = "model.params.personalization_config.params."


@pytest.mark.parametrize("extra, message", [
    (["--placeholder_string", "a"], "placeholder 'a' is already a word of the training captions .*'sks'"),
    (["--placeholder_string", "photo"], "placeholder 'photo' is already a word"),
    ([PERSONALIZATION + "placeholder_strings=[sks, the]"], "placeholder 'the' is already a word"),
    (["data.params.train.params.template_file={tmp}/plain.txt"],
     "template file '.*plain.txt' has no line with \\[name\\]"),
    (["--placeholder_string", ""], "--placeholder_string is empty"),
    ([PERSONALIZATION + "placeholder_strings=@"], "config override '.*placeholder_strings=@' is not valid YAML: quote "
                                                  "the value, e.g. .*placeholder_strings='\"@\"'"),
    ([PERSONALIZATION + "initializer_words=[dog"], "initializer_words=\\[dog' is not valid YAML"),
    ([PERSONALIZATION + "num_vectors_per_token=2.7"], "num_vectors_per_token 2.7 is not a whole number from 1 to 75"),
    ([PERSONALIZATION + "num_vectors_per_token=80"], "num_vectors_per_token 80 is not"),
    ([PERSONALIZATION + "max_vector_norm=big"], "max_vector_norm 'big' is not a positive number"),
    (["data.params.batch_size=two"], "data.params.batch_size 'two' is not a count"),
    (["data.params.batch_size=0"], "data.params.batch_size 0 is not a count"),
    (["data.params.train.params.repeats=0"], "data.params.train.params.repeats 0 is not a count"),
    (["data.params.train.params.size=big"], "data.params.train.params.size 'big' is not a number of pixels"),
    (["model.base_learning_rate=abc"], "model.base_learning_rate 'abc' is not a positive number"),
    (["model.base_learning_rate=-1"], "model.base_learning_rate -1 is not a positive number"),
])
def test_bad_values_are_named_before_any_model_is_built_or_run_folder_written(tmp_path, images, tiny_sd_ckpt,
                                                                               monkeypatch, extra, message):
    def data_only(config, **kwargs):
        if not config.target.startswith("ldm.data."):
            raise AssertionError(f"{config.target} was built before the mistake was found")
        return instantiate_from_config(config, **kwargs)

    monkeypatch.setattr(main_module, "instantiate_from_config", data_only)
    (tmp_path / "plain.txt").write_text("a photo of a {}\n")
    argv = ["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images),
            "-l", str(tmp_path / "logs"), *[word.format(tmp=tmp_path) for word in extra]]
    with pytest.raises((main_module.UsageError, ValueError), match=message) as refused:
        main_module.main(argv)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "logs").exists()


def test_base_files_that_are_not_yaml_text_of_keys_are_named(tmp_path):
    inversion = ["-t", "-l", str(tmp_path / "logs")]
    (tmp_path / "weights.yaml").write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="config '.*weights.yaml' is not a YAML text file"):
        main_module.main(["--base", TINY_SD, str(tmp_path / "weights.yaml"), *inversion])
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(ValueError, match="config '.*list.yaml' holds a list at its top level"):
        main_module.main(["--base", str(tmp_path / "list.yaml"), *inversion])
    (tmp_path / "number.yaml").write_text("42\n")
    with pytest.raises(ValueError, match="config '.*number.yaml' is not a YAML file of keys"):
        main_module.main(["--base", str(tmp_path / "number.yaml"), *inversion])


def test_an_override_right_after_base_is_read_as_an_override(tmp_path, images, tiny_sd_ckpt, monkeypatch):
    class Stop(Exception):
        pass

    def record(lightning_config):
        raise Stop(lightning_config.trainer.max_steps)

    monkeypatch.setattr(main_module, "checkpoint_interval", record)
    with pytest.raises(Stop, match="^3$"):
        main_module.main(["--base", TINY_SD, "lightning.trainer.max_steps=3", "-t", "--actual_resume", tiny_sd_ckpt,
                          "--data_root", str(images), "-l", str(tmp_path / "logs")])


def test_an_empty_init_word_means_none_and_one_word_is_not_a_list_of_letters(images):
    def config_of(*argv):
        opt, unknown = main_module.get_parser().parse_known_args(["--base", TINY_SD, "-t", "--data_root", str(images),
                                                                 *argv])
        return main_module.build_config(opt, unknown, [TINY_SD])

    params = config_of("--init_word", "").model.params.personalization_config.params
    assert list(params.initializer_words) == [""]  # the EmbeddingManager starts such a word at random
    config = config_of(PERSONALIZATION + "placeholder_strings=sks", PERSONALIZATION + "initializer_words=dog")
    params = config.model.params.personalization_config.params
    assert list(params.placeholder_strings) == ["sks"] and list(params.initializer_words) == ["dog"]
    assert config.data.params.train.params.placeholder_token == "sks"
    toy_pretraining = os.path.join(REPO, "configs", "toy", "txt2img.yaml")
    opt, _ = main_module.get_parser().parse_known_args(["--base", toy_pretraining, "-t", "--init_word", ""])
    with pytest.raises(main_module.UsageError, match="--init_word is for textual inversion"):
        main_module.build_config(opt, [], [toy_pretraining])


def test_resume_from_a_file_that_is_not_a_training_checkpoint_is_refused(tmp_path, images, tiny_sd_ckpt):
    _, run = train_in_process(tmp_path, images, tiny_sd_ckpt, steps=2)
    with pytest.raises(main_module.UsageError, match="embeddings.pt': it is not a training checkpoint"):
        main_module.main(["-r", os.path.join(run, "checkpoints", "embeddings.pt")])
    with open(os.path.join(run, "checkpoints", "last.ckpt"), "r+b") as last:
        last.truncate(100)
    with pytest.raises(main_module.UsageError, match="last.ckpt' is truncated or not a PyTorch"):
        main_module.main(["-r", run])
    marker = tmp_path / "ran"
    torch.save({"pytorch-lightning_version": "2.6.0", "payload": RunsACommand(f"touch {marker}")},
               os.path.join(run, "checkpoints", "last.ckpt"))
    with pytest.raises(main_module.UsageError, match="last.ckpt' pickles code we will not run"):
        main_module.main(["-r", run])
    assert not marker.exists()


class RunsACommand:
    """What a booby-trapped checkpoint pickles: unpickling it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("gpus, expected", [("0,", ("gpu", [0])), ("0,1", ("gpu", [0, 1])), ("2", ("gpu", 2)), ("0", ("cpu", 1)), (None, (None, None))])
def test_gpus_flag_forms(gpus, expected):
    assert main_module.parse_gpus(gpus) == expected


@pytest.mark.parametrize("bf16_capable, argv, yaml, expected", [
    (True, ["--gpus", "0,"], {}, "bf16-mixed"),  # the fast default where the GPU computes bf16
    (False, ["--gpus", "0,"], {}, None),  # e.g. a V100: Lightning's float32
    (True, ["--gpus", "0,", "--precision", "32"], {}, "32"),
    (True, ["--gpus", "0,"], {"precision": "16-mixed"}, "16-mixed"),
    (True, [], {}, None),  # the CPU
])
def test_a_gpu_trains_in_bf16_mixed_precision_unless_told_otherwise(monkeypatch, bf16_capable, argv, yaml, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_capable)
    opt, _ = main_module.get_parser().parse_known_args(argv)
    settings, _ = main_module.trainer_settings(opt, OmegaConf.create({"trainer": yaml}))
    assert settings.get("precision") == expected


@pytest.mark.parametrize("devices, cuda_count, expected", [
    ("2", 0, (2, 2)), ("0,1", 2, ([0, 1], 2)), ("1,", 2, ([1], 1)), ("auto", 3, ("auto", 3)), ("-1", 4, (-1, 4)),
    ("auto", 0, ("auto", 1)),  # no GPU: Lightning's one CPU process
])
def test_devices_flag_forms_and_their_count(monkeypatch, devices, cuda_count, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    assert main_module.parse_devices("gpu" if cuda_count else "cpu", devices) == expected


@pytest.mark.parametrize("argv, cuda_count, expected", [
    (["--devices", "2"], 2, ("gpu", 2)), (["--devices", "0,1"], 2, ("gpu", [0, 1])), (["--devices", "2"], 0, ("cpu", 2)),
    (["--devices", "2", "--accelerator", "cpu"], 2, ("cpu", 2)), ([], 2, ("cpu", 1)),  # no device flag: the CPU
])
def test_devices_without_an_accelerator_mean_gpus_where_there_are_some(monkeypatch, argv, cuda_count, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    opt, _ = main_module.get_parser().parse_known_args(argv)
    settings, _ = main_module.trainer_settings(opt, OmegaConf.create({"trainer": {}}))
    assert (settings["accelerator"], settings["devices"]) == expected


@pytest.mark.parametrize("devices", ["0", "-2", "two", "0,x"])
def test_devices_that_name_no_device_are_refused(devices):
    with pytest.raises(main_module.UsageError, match=f"--devices '{devices}' is not understood"):
        main_module.parse_devices("gpu", devices)


@pytest.mark.parametrize("argv, saved_seed, expected", [([], None, 23), (["-s", "7"], None, 7), ([], 42, 42),
                                                        (["-s", "7"], 42, 7)])
def test_a_resumed_run_keeps_its_seed_unless_told_otherwise(tmp_path, argv, saved_seed, expected):
    config = OmegaConf.load(TINY_SD)
    if saved_seed is not None:  # a run's saved project config
        config.model.params.seed = config.data.params.seed = saved_seed
    OmegaConf.save(config, tmp_path / "project.yaml")
    opt, unknown = main_module.get_parser().parse_known_args(argv)
    built = main_module.build_config(opt, unknown, [str(tmp_path / "project.yaml")])
    assert built.model.params.seed == built.data.params.seed == expected


@pytest.mark.slow  # 20 s; the signal test below runs two ranks in the default run
def test_two_process_ddp_on_cpu_writes_one_set_of_embeddings(tmp_path, images, tiny_sd_ckpt):
    result = run_cli(
        ["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images), "-l", str(tmp_path / "logs"),
         "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "lightning.trainer.max_steps=10", *QUIET],
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "* 2 (num_gpus)" in result.stdout
    run = only_run(tmp_path / "logs")
    files = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert files == ["embeddings.pt", "embeddings_gs-10.pt", "last.ckpt"], files


def test_ranks_started_by_lightnings_launcher_name_rank_zeros_run_folder(monkeypatch):
    """The launcher starts rank 1 later, with rank 0's environment: its own clock would name another folder."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(main_module.RUN_START_VARIABLE, raising=False)
    opt = main_module.get_parser().parse_args(["-n", "cat"])
    rank_zero, _ = main_module.run_name(opt, [])
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(main_module.datetime, "datetime", None)  # no clock of its own
    assert main_module.run_name(opt, []) == (rank_zero, f"{rank_zero}_cat")
    monkeypatch.undo()  # the clock back; a later run in rank 0's process (the launcher set LOCAL_RANK 0) reads it
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv(main_module.RUN_START_VARIABLE, "2000-01-01T00-00-00")
    assert main_module.run_name(opt, [])[0] != "2000-01-01T00-00-00"


def start_ddp_run(logroot, images, tiny_sd_ckpt, *extra, **popen_kwargs):
    """A two-rank DDP training run on the CPU that saves every 5 steps and would go on for 2,000."""
    return subprocess.Popen(
        [sys.executable, "main.py", "--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root",
         str(images), "-l", str(logroot), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
         "lightning.trainer.max_steps=2000", "lightning.modelcheckpoint.params.every_n_train_steps=5", *QUIET, *extra],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, **popen_kwargs)


def steps_saved(logroot):
    return sorted(int(path.rsplit("-", 1)[1].removesuffix(".pt"))
                  for path in glob.glob(str(logroot / "*" / "checkpoints" / "embeddings_gs-*.pt")))


def wait_for(process, condition, what):
    deadline = time.time() + 240
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"{what}: {process.communicate()[0][-3000:]}")
        time.sleep(0.05)


def assert_stopped_and_saved_once(process, logroot, signum):
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output[-3000:]
    assert output.count("Continue with: python main.py -r") == 1 and f"-r {only_run(logroot)}\n" in output
    checkpoints = os.path.join(only_run(logroot), "checkpoints")
    assert not glob.glob(os.path.join(checkpoints, "*.tmp")), os.listdir(checkpoints)
    stopped_at = load_embeddings(os.path.join(checkpoints, "embeddings.pt")).metadata["step"]
    assert torch.load(os.path.join(checkpoints, "last.ckpt"), weights_only=False)["global_step"] == stopped_at
    return output


def test_signals_to_one_ddp_rank_save_and_stop_all_ranks_at_one_step(tmp_path, images, tiny_sd_ckpt):
    """`kill -USR1 <pid>` or Ctrl-C reaching rank 0 alone: saving is collective, so the ranks must agree on the step
    (a rank saving or stopping alone left the others waiting in a collective: a hang, or a crash under gloo)."""
    logroot = tmp_path / "logs"
    process = start_ddp_run(logroot, images, tiny_sd_ckpt)
    wait_for(process, lambda: 5 in steps_saved(logroot), "training did not reach step 5")
    process.send_signal(signal.SIGUSR1)  # rank 0 only
    wait_for(process, lambda: any(step % 5 for step in steps_saved(logroot)), "SIGUSR1 did not save")
    requested = next(step for step in steps_saved(logroot) if step % 5)
    wait_for(process, lambda: max(steps_saved(logroot)) > requested, "training did not go on after the save")
    process.send_signal(signal.SIGINT)  # rank 0 only
    output = assert_stopped_and_saved_once(process, logroot, signal.SIGINT)
    assert output.count(f"Saved at step {requested}, as SIGUSR1 asked") == 1, output[-3000:]
    assert "* 2 (num_gpus)" in output  # the learning rate scales with the ranks


@pytest.mark.slow  # 20 s; the single-rank process-group test and the one-rank DDP signal test stay in the default run
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups")
def test_sigterm_to_every_ddp_rank_saves_and_stops_without_hanging(tmp_path, images, tiny_sd_ckpt):
    """SLURM, `timeout` and a kill of the process group send SIGTERM to every rank at once. Lightning's own SIGTERM
    handler broadcasts from inside the handler, so each rank's broadcast met another collective of the other's and
    the run hung in most tries; ours only record the request."""
    logroot = tmp_path / "logs"
    process = start_ddp_run(logroot, images, tiny_sd_ckpt, start_new_session=True)
    wait_for(process, lambda: 10 in steps_saved(logroot), "training did not reach step 10")
    time.sleep(0.1)  # into the validation after step 10, whose collectives hung most often
    os.killpg(process.pid, signal.SIGTERM)
    try:
        assert_stopped_and_saved_once(process, logroot, signal.SIGTERM)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the ranks hung after SIGTERM: {process.communicate()[0][-3000:]}")


class FailOnRank(pl.Callback):
    """Raises on one rank only, as an out-of-memory error on one GPU would."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"failure on rank {self.rank} alone")


@pytest.mark.parametrize("rank", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_a_failure_on_one_ddp_rank_saves_its_step_without_waiting_for_the_others(tmp_path, images, tiny_sd_ckpt, rank):
    """The save after an exception was collective: the failed rank waited in it for ranks that were in the next step
    (a hang until the process group's timeout, 30 minutes by default), and nothing was written."""
    logroot = tmp_path / "logs"
    process = start_ddp_run(logroot, images, tiny_sd_ckpt, "lightning.callbacks.fail.target=tests.test_main.FailOnRank",
                            f"lightning.callbacks.fail.params.rank={rank}", "lightning.callbacks.fail.params.step=7")
    try:
        output, _ = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the ranks hung after one failed: {process.communicate()[0][-3000:]}")
    assert process.returncode != 0 and f"failure on rank {rank} alone" in output, output[-3000:]
    checkpoints = os.path.join(only_run(logroot), "checkpoints")
    saved = load_embeddings(os.path.join(checkpoints, "embeddings.pt")).metadata["step"]
    assert saved == 7 and torch.load(os.path.join(checkpoints, "last.ckpt"), weights_only=False)["global_step"] == 7
    assert not glob.glob(os.path.join(checkpoints, "*.tmp")), os.listdir(checkpoints)


def test_per_image_tokens_with_the_ldm_encoder(tmp_path, images, tiny_ldm_ckpt):
    trainer, run = train_in_process(
        tmp_path, images, tiny_ldm_ckpt, "model.params.personalization_config.params.per_image_tokens=true",
        "data.params.train.params.mixing_prob=1.0", config=TINY_LDM, steps=4,
    )
    learned = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt"))
    assert len(learned.vectors) == 23 and "*" in learned.vectors
    dataset = trainer.datamodule.datasets["train"]
    item = dataset[1]
    assert "*" in item["caption"] and learned.metadata["placeholder_strings"][1 + item["image_index"]] in item["caption"]


def test_style_templates_and_the_norm_cap_through_the_command_line(tmp_path, images, tiny_sd_ckpt):
    trainer, run = train_in_process(
        tmp_path, images, tiny_sd_ckpt, "data.params.train.target=ldm.data.personalized_style.PersonalizedBase",
        "--init_word", "painting", "model.params.personalization_config.params.max_vector_norm=0.05", steps=2,
    )
    captions = {trainer.datamodule.datasets["train"][i]["caption"] for i in range(10)}
    assert all("in the style of *" in c for c in captions), captions
    saved = load_embeddings(os.path.join(run, "checkpoints", "embeddings.pt")).vectors["*"]
    assert saved.norm(dim=1).max() <= 0.05 * (1 + 1e-5)


def test_a_corrupt_image_is_named_before_training_starts(tmp_path, images, tiny_sd_ckpt):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = run_cli(["--base", TINY_SD, "-t", "--actual_resume", tiny_sd_ckpt, "--data_root", str(images), "-l", str(tmp_path / "logs")])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "broken.png" in errors[0]
