#!/usr/bin/env bash
# Issue 20's runs in order of importance, one after another (started by bench/device20.sh, environment set there).
# Each run.py skips rows that already have a result, so the queue can be restarted on a fresh machine.
set -u
R="python3 bench/run.py --out out/bench20"
G='--vae-dtype=bfloat16'
echo "phase A: the headline, minisd's best (CUDA graph + compile) and plain diffusers"
$R --cases sd15-lora-512-bs8 --impl minisd diffusers --minisd-args "--cuda-graph $G --compile" --reference-args "$G" --timeout 330
echo "phase B: memory tools and the new methods, eager"
$R --cases sdxl-lora-1024-bs1-gc-int8 sdxl-lora-1024-bs1-gc-fp8 sdxl-lora-1024-bs1-int8 '*-gc-fused' 'sd15-ti-*' \
   'sd15-dreambooth-*' 'sd15-hypernetwork-*' 'sd15-distill-*' --args "$G" --timeout 150
echo "phase C: the compiled rival of the headline"
$R --cases sd15-lora-512-bs8 --impl diffusers-compiled --reference-args "$G" --timeout 540
echo "phase E: every older row again, minisd with CUDA graphs (the graph-only configuration of 2026-11-23)"
$R --cases sd15-lora-512-bs1 sd15-lora-512-bs1-gc sd15-lora-512-bs4 sd15-lora-512-bs4-gc sd15-lora-512-bs8-gc \
   sd15-lora-512-bs8-cached sd15-lora-512-bs8-gc-cached sdxl-lora-1024-bs1 sdxl-lora-1024-bs1-gc sdxl-lora-1024-bs4-gc \
   sdxl-lora-1024-bs1-cached sdxl-lora-1024-bs1-gc-cached ldm-lora-256-bs32 sd15-full-512-bs1-gc optim-sd15 \
   --impl minisd diffusers bnb torch --minisd-args "--cuda-graph $G" --reference-args "$G" --timeout 120
python3 bench/run.py --out out/b20-graph --cases sd15-lora-512-bs8 --impl minisd diffusers \
   --minisd-args "--cuda-graph $G" --reference-args "$G" --timeout 120
echo "phase D: sampling, minisd CUDA graph + compile"
$R --cases sample-sdxl-1024 sample-sd15-512 --minisd-args "--cuda-graph --compile $G" --reference-args "$G" --timeout 400
echo "phase F: the compiled rival of SDXL LoRA bs1"
$R --cases sdxl-lora-1024-bs1 --impl diffusers-compiled --reference-args "$G" --timeout 540
echo "phase G: profiles"
mkdir -p out/prof
timeout 300 python3 bench/kernels.py sd15-lora-512-bs8 --impl minisd --vae-dtype bfloat16 --compile --top 25 \
   > out/prof/kernels-sd15-bs8-minisd-compiled.txt 2>&1
timeout 120 python3 bench/kernels.py sdxl-lora-1024-bs1-gc-int8 --impl minisd --vae-dtype bfloat16 --top 25 \
   > out/prof/kernels-sdxl-bs1-gc-int8.txt 2>&1
touch /tmp/job20/done
echo "phase done"
