#!/usr/bin/env bash
# One GPU session's checks and figures, in the order that keeps the most if time runs out:
#   1. the CUDA-only tests (tests/test_cuda.py);
#   2. the real command line on the GPU: a tiny random SD checkpoint, 60 training steps with CUDA graphs and
#      gradient clipping under the default precision, then graphed sampling with the learned word;
#   3. the benchmark at batch 1 and 8 with every memory and launch lever (bench.json);
#   4. the benchmark at batch 16 and 32 with the throughput levers, all at once, and sampling (bench_large.json).
# Each stage has its own time limit (seconds, overridable) and a failed stage does not stop the next.
# Usage: bash scripts/gpu_report.sh OUT_DIR     (writes OUT_DIR/*.json and OUT_DIR/*.log; about 10 minutes)
set -u
cd "$(dirname "$0")/.."
case ${1:-} in
    -h|--help) sed -n 2,9p "$0" | cut -c3-; exit 0 ;;
    ""|-*) sed -n 9p "$0" | cut -c3- >&2; exit 2 ;;
esac
out=$1
mkdir -p -- "$out" || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

status=()
stage() {  # stage NAME LIMIT_S COMMAND...: run it with a time limit, log to OUT_DIR/NAME.log, record its exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc after $((SECONDS - start)) s")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$out/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt"

stage cuda_tests "${CUDA_TESTS_S:-110}" python -m pytest -q -p no:cacheprovider tests/test_cuda.py

tiny_cli() {
    local config=configs/tiny/sd-tiny-finetune.yaml
    python scripts/make_random_checkpoint.py --config "$config" --out "$work/tiny.ckpt" &&
    python main.py --base "$config" -t --actual_resume "$work/tiny.ckpt" -n gpu --gpus 0, -l "$work/logs" \
        --data_root examples/red_disc --init_word ball --max_steps 60 \
        model.params.cuda_graphs=true lightning.trainer.gradient_clip_val=1.0 &&
    python scripts/stable_txt2img.py --config "$config" --ckpt "$work/tiny.ckpt" \
        --embedding_path "$(ls "$work"/logs/*_gpu/checkpoints/embeddings.pt)" --prompt "a photo of *" \
        --ddim_steps 10 --n_samples 2 --n_iter 2 --cuda_graphs --outdir "$work/samples"
}
stage tiny_cli "${TINY_CLI_S:-80}" bash -c "$(declare -f tiny_cli); work=$work; tiny_cli"

stage bench "${BENCH_S:-210}" python scripts/benchmark.py --model sd --batch_sizes 1 8 --steps 10 --warmup 3 \
    --cuda_graphs --channels_last --offload_unet --gradient_checkpointing --recompute_feedforward --profile \
    --json "$out/bench.json"

stage bench_large "${BENCH_LARGE_S:-170}" python scripts/benchmark.py --model sd --batch_sizes 16 32 --steps 10 \
    --warmup 3 --channels_last --attention_backend cudnn efficient --cuda_graphs --combined --sampling \
    --json "$out/bench_large.json"

printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
