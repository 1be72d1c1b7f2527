#!/usr/bin/env bash
# Every GPU measurement of issues 11 and 21 in one go, for a lent GPU machine (about 10 minutes on
# one H100/H200, plus the memory benchmark of a 1.3 B tower, not yet timed on a GPU). Logs,
# tables and JSON go under OUT; the work folders (shards, towers,
# checkpoints) stay in a temporary folder.
#
#   bash benchmarks/gpu_session.sh OUT                  # on the GPU machine
#   OPEN_CLIP_PATH=DIR bash benchmarks/gpu_session.sh OUT   # DIR: pip --target folder with
#       open-clip-torch and webdataset==0.2.86 (open_clip_train's pin), for the baseline
#   TINY=1 bash benchmarks/gpu_session.sh OUT           # CPU dry run with tiny shapes
set -uo pipefail
OUT=${1:?usage: gpu_session.sh OUT}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export TOKENIZERS_PARALLELISM=false
if [ -n "${TINY:-}" ]; then
    LOSS=(--device cpu --sizes 1024 --worlds 1 --reps 1)
    BENCH=(--preset tiny --steps 12 --warmup 4 --log-every 4 --ranks 1)
else
    LOSS=(--device cuda --sizes 16384 65536 262144)
    BENCH=()
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
status=0
python benchmarks/loss_bench.py "${LOSS[@]}" --out "$OUT/loss_bench.json" 2>&1 | tee "$OUT/loss_bench.txt" || status=1
python benchmarks/gpu_bench.py "${BENCH[@]}" --profile-steps 3 ${OPEN_CLIP_PATH:+--open-clip-pythonpath "$OPEN_CLIP_PATH"} \
    --work "$WORK/bench" --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt" || status=1
# Memory of a 1.3 B Llama-shaped tower on this one GPU (issue 21; ranks > 1 need more GPUs).
if [ -n "${TINY:-}" ]; then MEM=(--hidden 256 --layers 2); else MEM=(--hidden 2048 --layers 24); fi
python benchmarks/memory_bench.py "${MEM[@]}" --ranks 1 --stages 2 3 --assets "$WORK/memory" \
    --out "$OUT/memory_bench.json" 2>&1 | tee "$OUT/memory_bench.txt" || status=1
# Each run's log, metrics and profiler tables (the traces are large: the first rank's only).
(cd "$WORK/bench" && find . -maxdepth 3 \( -name "*.log" -o -name "metrics.jsonl" -o -name "*.txt" \
    -o -name "rank0_*.trace.json" \) -print0 | xargs -0 -I{} cp --parents {} "$OUT/") || status=1
exit $status
