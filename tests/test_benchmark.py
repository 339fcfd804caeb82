"""scripts/benchmark.py: it runs end to end at tiny size, and its two training steps are the same computation,
so the ours/diffusers ratio compares speed alone."""
import importlib.util
import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO
from tests.test_cuda_graphs import Recorder

SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_main_prints_and_writes_both_implementations_at_tiny_size(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--model", "tiny-sd", "--steps", "2", "--warmup", "1", "--batch_sizes", "1", "2",
            "--channels_last", "--attention_backend", "cudnn", "--combined", "--profile", "--sampling",
            "--sampling_steps", "2", "--json", str(out)]
    assert benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    assert "torch " + torch.__version__ in printed
    assert "| ours | 1 | eager |" in printed and "| diffusers (CLIPTextModel) | 2 | eager |" in printed
    assert "## Where a step's time goes: each op's own CPU time" in printed

    report = json.loads(out.read_text())
    training = report["training"]
    assert sorted((row["implementation"], row["variant"], row["batch_size"]) for row in training) == [
        ("diffusers (CLIPTextModel)", "eager", 1), ("diffusers (CLIPTextModel)", "eager", 2),
        ("ours", "channels last", 1), ("ours", "channels last", 2),
        ("ours", "combined: channels last, cudnn attention", 1), ("ours", "combined: channels last, cudnn attention", 2),
        ("ours", "cudnn attention", 1), ("ours", "cudnn attention", 2), ("ours", "eager", 1), ("ours", "eager", 2)]
    for row in training:
        assert positive(row["images_per_s"]) and positive(row["ms_per_step"])
        assert row["images_per_s"] == pytest.approx(1e3 * row["batch_size"] / row["ms_per_step"])
        assert row["peak_memory_gib"] is None and row["floor_fraction"] is None  # CUDA-only measurements
        assert positive(row["held_for_backward_mib"]) and row["step_peak_mib"] >= row["held_for_backward_mib"]
        assert set(row["ms_by_kind"]) == set(benchmark.TIME_KINDS)
        assert row["ms_by_kind"]["convolution"] > 0 and row["ms_by_kind"]["matmul"] > 0
    theirs = {row["batch_size"]: row["images_per_s"] for row in training if row["implementation"] != "ours"}
    for row in (row for row in training if row["implementation"] == "ours"):
        assert row["ratio"] == pytest.approx(row["images_per_s"] / theirs[row["batch_size"]])

    sampling = report["sampling"]
    assert sorted((row["implementation"], row["images_per_prompt"]) for row in sampling) == [
        ("diffusers", 1), ("diffusers", 8), ("ours", 1), ("ours", 8), ("ours (channels last)", 1),
        ("ours (channels last)", 8), ("ours (combined: channels last, cudnn attention)", 1),
        ("ours (combined: channels last, cudnn attention)", 8), ("ours (cudnn attention)", 1),
        ("ours (cudnn attention)", 8)]
    for row in sampling:
        assert positive(row["s_per_call"]) and positive(row["images_per_s"])
        assert row["images_per_s"] * row["s_per_call"] == pytest.approx(row["images_per_prompt"])


def test_a_failing_measurement_becomes_a_note_and_every_step_is_saved(benchmark, tmp_path, monkeypatch, capsys):
    build = benchmark.build_ours

    def build_ours(*args, channels_last=False, **kwargs):
        if channels_last:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build(*args, **kwargs)

    saved = []
    monkeypatch.setattr(benchmark, "build_ours", build_ours)
    monkeypatch.setattr(benchmark, "write_json", lambda report, path: saved.append(json.loads(json.dumps(report))))
    argv = ["--device", "cpu", "--model", "tiny-sd", "--steps", "1", "--warmup", "0", "--batch_sizes", "1",
            "--channels_last", "--skip_diffusers", "--json", str(tmp_path / "bench.json")]
    assert benchmark.main(argv) == 0
    assert ("ours channels last: failed (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)"
            in capsys.readouterr().out)
    # after each row, each variant (the failed one too), then at the end
    assert [len(report["training"]) for report in saved] == [1, 1, 1, 1]
    assert saved[-1]["training"][0]["variant"] == "eager"


def test_checkpointing_rows_are_compared_with_checkpointing_only(benchmark):
    def row(implementation, variant, images_per_s):
        return {"implementation": implementation, "batch_size": 1, "variant": variant, "images_per_s": images_per_s}

    rows = [row("ours", "eager", 6.0), row("ours", "checkpointing", 3.0), row("diffusers", "eager", 4.0)]
    benchmark.add_ratios(rows)
    assert [r["ratio"] for r in rows] == [1.5, None, None]  # not against diffusers' eager step
    rows.append(row("diffusers", "checkpointing", 2.0))
    benchmark.add_ratios(rows)
    assert [r["ratio"] for r in rows] == [1.5, 1.5, None, None]


def test_profiled_ops_are_sorted_by_what_they_compute(benchmark):
    kinds = {name: benchmark.kind_of(name) for name in (
        "aten::_scaled_dot_product_flash_attention_backward", "aten::cudnn_convolution", "aten::convolution_backward",
        "aten::addmm", "aten::bmm", "aten::native_group_norm_backward", "aten::native_layer_norm", "aten::copy_",
        "aten::_foreach_mul_", "aten::silu", "autograd::engine::evaluate_function: AddmmBackward0")}
    assert list(kinds.values()) == ["attention", "convolution", "convolution", "matmul", "matmul", "normalization",
                                    "normalization", "copy and cast", "optimizer", "other ops", "outside aten ops"]


def test_cuda_kernel_time_goes_to_the_op_that_launched_it_and_the_rest_outside(benchmark):
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device_type, cpu_us=0.0, device_us=0.0):
        return SimpleNamespace(name=name, device_type=device_type, is_async=False, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us)

    events = [event("aten::mm", cpu, 30, 2000), event("aten::cudnn_convolution", cpu, 40, 3000),
              event("autograd::engine::evaluate_function: MmBackward0", cpu, 10, 0),
              event("cudaGraphLaunch", cpu, 5, 0),  # a replay: its kernels belong to no aten op
              event("sm90_gemm", cuda, 0, 2000), event("cudnn_conv_kernel", cuda, 0, 3000),
              event("graph_kernel", cuda, 0, 4000)]
    on_cuda = benchmark.milliseconds_by_kind(events, on_cuda=True)
    assert (on_cuda["matmul"], on_cuda["convolution"], on_cuda["outside aten ops"]) == (2.0, 3.0, 4.0)
    assert sum(on_cuda.values()) == 9.0  # every kernel once
    on_cpu = benchmark.milliseconds_by_kind(events[:4], on_cuda=False)
    assert (on_cpu["matmul"], on_cpu["convolution"], on_cpu["outside aten ops"]) == (0.03, 0.04, 0.015)


@pytest.mark.parametrize("model_name", ["tiny-sd", "tiny-ldm"])
def test_both_training_steps_compute_the_same_loss_gradient_and_update(benchmark, model_name):
    """Same weights, batch and generator seed in float32: the diffusers-style step (VAE every step, whole
    token-embedding table trained, other rows restored) must do exactly what our step does to the learned word."""
    device = torch.device("cpu")
    model = benchmark.build_ours(model_name, device, "fp32")
    parts = benchmark.convert_to_diffusers(model, model_name, "fp32")
    batch = benchmark.batches_of(benchmark.training_images(model), 2)[0]
    ours = benchmark.OursStep(model, "fp32")
    theirs = benchmark.diffusers_step_for(parts, model, "fp32")
    placeholder = benchmark.placeholder_of(model)
    row = model.embedding_manager.string_to_token_dict[placeholder]
    vector = model.embedding_manager.vectors(placeholder)
    table = parts.token_embedding.weight
    start = vector.detach().clone()
    table_before = table.detach().clone()

    our_loss = ours(batch, torch.Generator().manual_seed(3))
    their_loss = theirs(batch, torch.Generator().manual_seed(3))

    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    # AdamW's first moment after one step is (1 - beta1) * gradient: compare the gradients themselves.
    our_gradient = ours.optimizer.state[vector]["exp_avg"][0]
    their_gradient = theirs.optimizer.state[table]["exp_avg"][row]
    assert our_gradient.abs().max() > 1e-6
    assert torch.allclose(our_gradient, their_gradient, rtol=1e-3, atol=1e-9)
    assert not torch.equal(vector[0], start[0])
    assert torch.allclose(vector[0], table[row], rtol=1e-5, atol=1e-7)
    others = torch.arange(table.shape[0]) != row
    assert torch.equal(table[others], table_before[others])


class OlderTextEncoder:
    """A text encoder of transformers before `activation_checkpointing_*` (5.17 on the GPU machine): only the
    `gradient_checkpointing_*` names."""

    is_gradient_checkpointing = False

    def gradient_checkpointing_enable(self):
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.is_gradient_checkpointing = False


@pytest.mark.parametrize("transformers_names", ["newer", "older"])
def test_the_diffusers_checkpointing_baseline_checkpoints_the_text_encoder_too(benchmark, transformers_names):
    model = benchmark.build_ours("tiny-sd", torch.device("cpu"), "fp32")
    parts = benchmark.convert_to_diffusers(model, "tiny-sd", "fp32")
    if transformers_names == "older":
        parts.text_encoder = OlderTextEncoder()
    benchmark.set_diffusers_gradient_checkpointing(parts, True)
    assert parts.unet.is_gradient_checkpointing and parts.text_encoder.is_gradient_checkpointing
    benchmark.set_diffusers_gradient_checkpointing(parts, False)
    assert not parts.unet.is_gradient_checkpointing and not parts.text_encoder.is_gradient_checkpointing


@pytest.mark.parametrize("fail", [False, True])
def test_graphed_rows_report_no_allocated_step_memory_and_say_when_recording_failed(benchmark, fail):
    """A replay allocates nothing (its memory is the recording's pool, in the reserved peak), and a recording that
    failed runs eagerly: the row must not pass for a graphed one."""
    recorder = Recorder(fail=fail)
    model = benchmark.build_ours("tiny-sd", torch.device("cpu"), "fp32")
    model.model.use_cuda_graphs(make_graphed=recorder, device_type="cpu")
    step = benchmark.OursStep(model, "fp32")
    images = benchmark.training_images(model)
    step.fill_latent_cache(images)
    args = SimpleNamespace(batch_sizes=[2], device=torch.device("cpu"), warmup=0, steps=1, model="tiny-sd",
                           precision="fp32", peak_tflops=790.0, profile=False)
    rows = []
    benchmark.train_rows(step, "ours", "cuda graphs", images, args, rows, lambda: None)
    (row,) = rows
    assert row["held_for_backward_mib"] is None and row["step_peak_mib"] is None
    assert row["variant"] == ("cuda graphs (recording the UNet failed: eager)" if fail else "cuda graphs")
    assert len(recorder.recorded) == (0 if fail else 1)


def test_a_batch_size_that_fails_keeps_the_rows_measured_before_it(benchmark):
    """Out of memory at batch 2 must not lose batch 1's row, already handed to --json."""
    model = benchmark.build_ours("tiny-sd", torch.device("cpu"), "fp32")
    step = benchmark.OursStep(model, "fp32")
    images = benchmark.training_images(model)
    step.fill_latent_cache(images)
    loss = step.loss

    def loss_or_out_of_memory(batch, generator):
        if len(batch["caption"]) == 2:
            raise RuntimeError("CUDA out of memory")
        return loss(batch, generator)

    step.loss = loss_or_out_of_memory
    args = SimpleNamespace(batch_sizes=[1, 2], device=torch.device("cpu"), warmup=1, steps=1, model="tiny-sd",
                           precision="fp32", peak_tflops=790.0, profile=False)
    rows, saved = [], []
    with pytest.raises(RuntimeError, match="out of memory"):
        benchmark.train_rows(step, "ours", "eager", images, args, rows, lambda: saved.append(len(rows)))
    assert [row["batch_size"] for row in rows] == [1] and saved == [1]


def test_main_py_runs_on_the_benchmark_weights_and_times_only_steps_with_cached_latents(benchmark):
    """The main-loop row runs the real main.py (its own process) on the benchmark's model and images."""
    model = benchmark.build_ours("tiny-sd", torch.device("cpu"), "fp32")
    args = SimpleNamespace(model="tiny-sd", device=torch.device("cpu"), precision="fp32", warmup=1, steps=3,
                           peak_tflops=790.0)
    with benchmark.main_loop_files(model, benchmark.training_images(model)) as files:
        row = benchmark.main_loop_row(files, "eager", {}, 2, args)
    assert row["implementation"] == "ours, main.py" and row["batch_size"] == 2
    assert positive(row["ms_per_step"]) and row["images_per_s"] == pytest.approx(2e3 / row["ms_per_step"])
    # StepTimes stopped it: the warm-up step, those that filled the cache (10 images and flips, 2 a step), the 3
    # timed ones and the one whose start ends the last of them; not main.py's cap of 1,000.
    assert 1 + 5 + 3 + 1 <= row["steps_run"] < 30
    assert benchmark.lever_overrides({"cuda_graphs": True, "use_checkpoint": True}) == [
        "model.params.cuda_graphs=True", "model.params.unet_config.params.use_checkpoint=True"]
    graphed, combined = ("cuda graphs", {"cuda_graphs": True}), ("combined: cuda graphs, channels last", {})
    assert benchmark.main_loop_variant([("checkpointing", {}), graphed, combined]) == combined
    assert benchmark.main_loop_variant([("checkpointing", {}), graphed]) == graphed
    assert benchmark.main_loop_variant([("checkpointing", {"use_checkpoint": True})]) == ("eager", {})


def test_cuda_graphs_are_refused_on_the_cpu_with_the_reason(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--device", "cpu", "--cuda_graphs"])
    assert exit_info.value.code == 2
    assert "--cuda_graphs needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flags, reason", [
    (["--combined", "--channels_last"], "give at least two of"),
    (["--combined", "--compile", "--channels_last", "--cuda_graphs"], "cannot join --compile and --cuda_graphs"),
])
def test_combined_levers_need_two_that_the_model_accepts_together(benchmark, capsys, monkeypatch, flags, reason):
    monkeypatch.setattr(benchmark, "parse_device", torch.device)  # as if the machine had a GPU
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--device", "cuda", *flags])
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err


def test_combined_levers_are_those_given_compile_for_training_only(benchmark):
    args = benchmark.parse_args(["--device", "cpu", "--combined", "--compile", "max-autotune", "--channels_last",
                                 "--attention_backend", "cudnn", "efficient"])
    assert benchmark.combined_levers(args) == {"channels_last": True, "attention_backend": "cudnn",
                                               "compile_unet": "max-autotune"}
    assert benchmark.combined_label(args) == "combined: channels last, cudnn attention, compiled max-autotune"
    assert benchmark.combined_levers(args, sampling=True) == {"channels_last": True, "attention_backend": "cudnn"}


@pytest.mark.parametrize("flags, message", [
    (["--json", "{tmp}"], "--json '.*' is a folder"),
    (["--json", "{tmp}/notes.txt/bench.json"], "--json .*: its folder '.*notes.txt' is a file"),
    (["--device", "cuda:9"], "--device 'cuda:9': "),
])
def test_paths_and_devices_are_checked_before_the_first_measurement(benchmark, tmp_path, capsys, flags, message):
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--device", "cpu", *(flag.format(tmp=tmp_path) for flag in flags)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert benchmark.parse_args(["--device", "cpu", "--json", str(tmp_path / "new" / "b.json")])
