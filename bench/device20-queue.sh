#!/usr/bin/env bash
# Issue 20's runs still to make, in order of importance, one after another (started by bench/device20.sh, which sets
# the environment and BENCH_OUT). Each run.py skips rows that already have a result, so the queue can be restarted
# on a fresh machine. The first session (bench/results/h100-2026-12-06) measured the headline pair, the memory-tool
# and method rows eagerly and five older rows; its compiled rival timed out compiling (coordinate-descent tuning,
# since dropped). This second session's queue fits 30 device minutes: the three-way headline, SDXL sampling with the
# bf16 decode, the rows whose code changed after the first session (fused backward in buckets, the compiled 8-bit
# dequantisation under CUDA graphs, DreamBooth in one UNet call), then profiles of what still misses, then the rest.
set -u
R="python3 bench/run.py --out $BENCH_OUT"
G='--vae-dtype=bfloat16'
echo "phase 1: the headline, minisd's best (CUDA graph + compile), plain diffusers and the compiled rival"
$R --cases sd15-lora-512-bs8 --minisd-args="--cuda-graph $G --compile" --reference-args="$G" --timeout 720
echo "phase 2: SDXL sampling, minisd CUDA graph + compile with the bf16 VAE decode (sample.py --vae-dtype bf16)"
$R --cases sample-sdxl-1024 --minisd-args="--cuda-graph --compile $G" \
   --args=--decode-dtype=bfloat16 --reference-args="$G" --timeout 400
echo "phase 3: memory tools: fused backward in buckets (eager: graphs refused), 8-bit base with CUDA graphs"
$R --cases '*-gc-fused' --args="$G" --timeout 150
$R --cases sdxl-lora-1024-bs1-gc-int8 --minisd-args="--cuda-graph $G" --reference-args="$G" --timeout 150
$R --cases sdxl-lora-1024-bs1-gc-fp8 sdxl-lora-1024-bs1-int8 --impl minisd --minisd-args="--cuda-graph $G" --timeout 150
echo "phase 4: the methods: DreamBooth (one UNet call of 2B rows), TI and hypernetwork with CUDA graphs"
$R --cases 'sd15-dreambooth-*' --args="$G" --timeout 150
$R --cases 'sd15-ti-*' 'sd15-hypernetwork-*' --minisd-args="--cuda-graph $G" --reference-args="$G" --timeout 150
echo "phase 5: profiles of the rows that miss"
K="python3 bench/kernels.py --vae-dtype bfloat16 --top 25"
[ -s out/prof/kernels-sd15-full-fused.txt ] || timeout 200 $K sd15-full-512-bs1-gc-fused > out/prof/kernels-sd15-full-fused.txt 2>&1
[ -s out/prof/kernels-sdxl-int8.txt ] || timeout 200 $K sdxl-lora-1024-bs1-gc-int8 > out/prof/kernels-sdxl-int8.txt 2>&1
[ -s out/prof/kernels-dreambooth.txt ] || timeout 200 $K sd15-dreambooth-prior-512-bs1 > out/prof/kernels-dreambooth.txt 2>&1
echo "phase 6: SD1.5 sampling and the older rows again, minisd with CUDA graphs"
$R --cases sample-sd15-512 --minisd-args="--cuda-graph --compile $G" --args=--decode-dtype=bfloat16 \
   --reference-args="$G" --timeout 300
$R --cases sd15-lora-512-bs4 sd15-lora-512-bs8-gc sdxl-lora-1024-bs1-gc sdxl-lora-1024-bs1 sd15-full-512-bs1-gc \
   sd15-lora-512-bs8-cached sdxl-lora-1024-bs4-gc ldm-lora-256-bs32 optim-sd15 \
   --impl minisd diffusers bnb torch --minisd-args="--cuda-graph $G" --reference-args="$G" --timeout 120
echo "phase 7: the compiled rival of SDXL LoRA bs1"
$R --cases sdxl-lora-1024-bs1 --impl diffusers-compiled --reference-args="$G" --timeout 900
touch /tmp/job20/done
echo "phase done"
