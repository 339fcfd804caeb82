#!/usr/bin/env bash
# One GPU session's checks and figures, in the order that keeps the most if time runs out:
#   1. the CUDA-only tests (tests/test_cuda.py);
#   2. the real command line on the GPU: a tiny random SD checkpoint, 60 training steps with CUDA graphs and
#      gradient clipping under the default precision, then graphed sampling with the learned word;
#   3. the benchmark at batch 1 and 8 with every memory and launch lever (bench.json);
#   4. the benchmark at batch 16 and 32 with the throughput levers, all at once, and sampling (bench_large.json).
# Each stage has its own time limit (seconds, overridable; about 9 minutes in all, kill grace included) and a
# failed stage does not stop the next; OUT_DIR/summary.txt gets each stage's exit status as it ends.
# Usage: bash scripts/gpu_report.sh OUT_DIR     (writes OUT_DIR/*.json and OUT_DIR/*.log; PYTHON=python3 by default)
set -u
cd "$(dirname "$0")/.."
case ${1:-} in
    -h|--help) sed -n 2,10p "$0" | cut -c3-; exit 0 ;;
    ""|-*) sed -n 10p "$0" | cut -c3- >&2; exit 2 ;;
esac
out=$1
mkdir -p -- "$out" || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1  # a stage cut short by its limit keeps its last lines
python=${PYTHON:-python3}
: > "$out/summary.txt"

stage() {  # stage NAME LIMIT_S COMMAND...: run it with a time limit, log to OUT_DIR/NAME.log, record its exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - start)) s" >> "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/device.txt"
$python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$out/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt"
# Every stage imports these; without one, each would fail in its first seconds.
if ! $python -c "import omegaconf, ftfy, taming, open_clip, diffusers, transformers, pytorch_lightning" >> "$out/device.txt" 2>&1; then
    echo "a package is missing ($(tail -n 1 "$out/device.txt")): pip install -e . first" | tee -a "$out/summary.txt"
    exit 1
fi

stage cuda_tests "${CUDA_TESTS_S:-110}" $python -m pytest -q -p no:cacheprovider tests/test_cuda.py

tiny_cli() {
    local config=configs/tiny/sd-tiny-finetune.yaml
    $python scripts/make_random_checkpoint.py --config "$config" --out "$work/tiny.ckpt" &&
    $python main.py --base "$config" -t --actual_resume "$work/tiny.ckpt" -n gpu --gpus 0, -l "$work/logs" \
        --data_root examples/red_disc --init_word ball --max_steps 60 \
        model.params.cuda_graphs=true lightning.trainer.gradient_clip_val=1.0 &&
    $python scripts/stable_txt2img.py --config "$config" --ckpt "$work/tiny.ckpt" \
        --embedding_path "$(ls "$work"/logs/*_gpu/checkpoints/embeddings.pt)" --prompt "a photo of *" \
        --ddim_steps 10 --n_samples 2 --n_iter 2 --cuda_graphs --outdir "$work/samples"
}
stage tiny_cli "${TINY_CLI_S:-90}" bash -c "$(declare -f tiny_cli); work=$work; python=$python; tiny_cli"
# A recording that fails falls back to eager and the run still succeeds: say which it was.
grep -c "cuda_graphs: recorded" "$out/tiny_cli.log" | sed 's/^/tiny_cli: CUDA graph recordings made: /' >> "$out/summary.txt"
grep "cuda_graphs: recording .* failed" "$out/tiny_cli.log" | sed 's/^/tiny_cli: /' >> "$out/summary.txt"

stage bench "${BENCH_S:-190}" $python scripts/benchmark.py --model sd --batch_sizes 1 8 --steps 10 --warmup 3 \
    --cuda_graphs --channels_last --offload_unet --gradient_checkpointing --recompute_feedforward --profile \
    --json "$out/bench.json"

stage bench_large "${BENCH_LARGE_S:-140}" $python scripts/benchmark.py --model sd --batch_sizes 16 32 --steps 10 \
    --warmup 3 --channels_last --attention_backend cudnn efficient --cuda_graphs --combined --sampling \
    --json "$out/bench_large.json"

cat "$out/summary.txt"
