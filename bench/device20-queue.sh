#!/usr/bin/env bash
# Issue 20's runs still to make, in order of importance, one after another (started by bench/device20.sh, which sets
# the environment and BENCH_OUT). Each run.py skips rows that already have a result, so the queue can be restarted
# on a fresh machine. Two loans measured the rest (bench/results/h100-2026-12-06 and h100-2026-12-06-b); left:
# DreamBooth with a CUDA graph (train.py takes --cuda-graph with --class-prompt since the second loan), the rows never
# re-measured since the layout change, one diffusers side, and the compiled rival of SDXL LoRA bs1. About 8 minutes
# before phase 3. Then the GPU tests of the graphed DreamBooth run.
set -u
R="python3 bench/run.py --out $BENCH_OUT"
G='--vae-dtype=bfloat16'
echo "phase 1: DreamBooth + prior with a CUDA graph, and its diffusers reference again"
$R --cases 'sd15-dreambooth-*' --minisd-args="--cuda-graph $G" --reference-args="$G" --timeout 150
echo "phase 2: the rows not re-measured since the layout change, minisd with CUDA graphs (as on 2026-11-23)"
$R --cases sd15-lora-512-bs4-gc sd15-lora-512-bs8-cached sd15-lora-512-bs8-gc-cached sdxl-lora-1024-bs1-cached \
   sdxl-lora-1024-bs1-gc-cached sdxl-lora-1024-bs4-gc ldm-lora-256-bs32 sd15-full-512-bs1-gc optim-sd15 \
   sdxl-lora-1024-bs1-gc --impl minisd diffusers bnb torch --minisd-args="--cuda-graph $G" --reference-args="$G" \
   --timeout 120
echo "phase 3: the GPU tests of the graphed steps (DreamBooth's and the full fine-tune's among them)"
timeout 500 python3 -m pytest -q -m gpu tests/test_train_graph.py tests/test_full_finetune.py tests/test_dreambooth.py > out/prof/gpu-tests-graph.txt 2>&1
echo "phase 4: the compiled rival of SDXL LoRA bs1"
$R --cases sdxl-lora-1024-bs1 --impl diffusers-compiled --reference-args="$G" --timeout 900
touch /tmp/job20/done
echo "phase done"
