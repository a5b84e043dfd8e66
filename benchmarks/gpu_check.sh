#!/usr/bin/env bash
# The GPU checks, in one short run (about 5 minutes on one H100): training throughput of ResNet-34 at 160
# and 224 px with real data loading against the model-only ceiling, then a two-epoch demo on the GPU.
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$python" benchmarks/bench_train_speed.py --device cuda --image_size 160 224 --batch_size 64 \
    --steps 20 --warmup 5 --repeats 2 --with_data | tee "$out/train_speed.md"
"$python" train_triplet.py --demo --device cuda --epochs 2 --output_dir "$out/demo_triplet" | tee "$out/demo_triplet.log"
