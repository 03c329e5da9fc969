export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.whl/diffusers-0.42.1-py3-none-any.whl:$PWD/.whl/importlib_metadata-10.2.0-py3-none-any.whl:$PWD/.bnb
export MINISD_REFERENCE=$PWD/.devshare TORCHINDUCTOR_CACHE_DIR=$PWD/out/inductor
P="python3 bench/profile.py --vae-dtype bfloat16"
($P sdxl-lora-1024-bs1-cached --impl minisd; $P sdxl-lora-1024-bs1-cached --impl diffusers; $P sample-sd15-512 --impl minisd --iters 1 --top 8) > $OUT/profile.txt 2>&1
B="--minisd-args=--vae-dtype=bfloat16"
python3 bench/run.py --out out/e --cases 'sample-sd15-512' 'optim-sd15' 'sd15-lora-512-bs1' 'sd15-lora-512-bs4' 'ldm-lora-256-bs32' "$B" --reference-args=--vae-dtype=bfloat16 --budget 200
python3 bench/run.py --out out/e --cases 'sdxl-lora-1024-bs4-gc' "$B" --budget 60
mkdir -p out/c; cp out/e/*.diffusers.json out/c/
python3 bench/run.py --out out/c --impl minisd --cases 'sd15-lora-512-bs8' 'sdxl-lora-1024-bs1' 'sample-sdxl-1024' "--minisd-args=--vae-dtype=bfloat16 --compile" --budget 200
python3 bench/report.py out/e --write BENCHMARKS.md
tar czf $OUT/bench.tgz out/e out/c BENCHMARKS.md
cat $OUT/profile.txt
