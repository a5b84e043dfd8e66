#!/usr/bin/env bash
# The GPU checks, in one short run (about 6 minutes on one H100/H200; more with two GPUs):
#   1. which precision --amp auto picks on this GPU, and why;
#   2. training throughput of ResNet-34 at 160 and 224 px with real data loading against the model-only ceiling;
#   3. images/s per data-loader worker (uint8 path), sized for the model-only rate of step 2;
#   4. a two-epoch demo on the GPU, and a center-loss epoch in fp16 with its gradient scaler;
#   5. with two or more GPUs, the same demo under torchrun (DDP, NCCL) and a margin-softmax epoch whose
#      classifier is sharded over the GPUs.
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$out/gpu.txt"
"$python" -c "import torch, devices; print('--amp auto:', devices.auto_amp(torch.device('cuda', 0))[1])" \
    | tee "$out/amp.txt"
"$python" benchmarks/bench_train_speed.py --device cuda --image_size 160 224 --batch_size 64 \
    --steps 20 --warmup 5 --repeats 2 --with_data | tee "$out/train_speed.md"
# the model-only img/s of our default step at 160 px, from the table above, sizes the data workers
rate=$("$python" -c "
import sys
for line in open(sys.argv[1]):
    cells = [cell.strip() for cell in line.split('|')]
    if len(cells) > 5 and cells[2] == '160' and cells[3].startswith('ours, default'):
        print(cells[5].replace(',', '')); break
" "$out/train_speed.md")
"$python" benchmarks/bench_input_pipeline.py --sizes 160 224 --seconds 8 ${rate:+--gpu_images_per_second "$rate"} \
    | tee "$out/input_pipeline.md"
"$python" train_triplet.py --demo --device cuda --epochs 2 --output_dir "$out/demo_triplet" | tee "$out/demo_triplet.log"
# the fp16 + GradScaler path (what --amp auto picks on GPUs without bf16), with the center loss's second optimizer
"$python" train_center.py --demo --device cuda --epochs 1 --amp fp16 --output_dir "$out/demo_center_fp16" \
    | tee "$out/demo_center_fp16.log"
gpus=$(nvidia-smi --list-gpus | wc -l)
if [ "$gpus" -ge 2 ]; then
    "$python" -m torch.distributed.run --standalone --nproc_per_node 2 train_triplet.py --demo --device cuda \
        --epochs 1 --output_dir "$out/demo_triplet_ddp" | tee "$out/demo_triplet_ddp.log"
    "$python" -m torch.distributed.run --standalone --nproc_per_node 2 train_margin.py --demo --device cuda \
        --epochs 1 --sample_rate 0.5 --output_dir "$out/demo_margin_ddp" | tee "$out/demo_margin_ddp.log"
fi
