#!/usr/bin/env bash
# One GPU session's checks and figures, in the order that keeps the most if time runs out:
#   1. the CUDA-only tests (tests/test_cuda.py);
#   2. the benchmark at batch 1 and 8 with the memory and launch levers (CUDA graphs, the offloaded UNet,
#      checkpointing) and where each step's time goes, then main.py's own training run with CUDA graphs (bench.json);
#   3. the benchmark at batch 16 and 32 with the throughput levers, one by one and all at once, sampling, then
#      main.py's run with all of them (bench_large.json).
# Within a stage the comparison with diffusers comes first and main.py's runs (a process each) last.
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
# The benchmark stages import these; without one, each would fail in its first seconds (pytest: stage 1 only).
if ! timeout 40 $python -c "import omegaconf, ftfy, taming, open_clip, diffusers, transformers, pytorch_lightning" >> "$out/device.txt" 2>&1; then
    echo "a package is missing ($(tail -n 1 "$out/device.txt")): pip install -e '.[test]' first" | tee -a "$out/summary.txt"
    exit 1
fi

stage cuda_tests "${CUDA_TESTS_S:-110}" $python -m pytest -q -p no:cacheprovider tests/test_cuda.py

stage bench "${BENCH_S:-230}" $python scripts/benchmark.py --model sd --batch_sizes 1 8 --steps 10 --warmup 3 \
    --cuda_graphs --offload_unet --gradient_checkpointing --profile --main_loop --json "$out/bench.json"

stage bench_large "${BENCH_LARGE_S:-200}" $python scripts/benchmark.py --model sd --batch_sizes 16 32 --steps 10 \
    --warmup 3 --channels_last --attention_backend cudnn efficient --cuda_graphs --combined --main_loop --sampling \
    --json "$out/bench_large.json"
# A recording that fails falls back to eager and its row says so in its variant.
grep -h "recording .* failed" "$out"/bench*.log | sed 's/^/recording failed: /' >> "$out/summary.txt"

cat "$out/summary.txt"
