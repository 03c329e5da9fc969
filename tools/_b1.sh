export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.whl/diffusers-0.42.1-py3-none-any.whl:$PWD/.whl/importlib_metadata-10.2.0-py3-none-any.whl:$PWD/.bnb
export MINISD_REFERENCE=$PWD/.devshare TORCHINDUCTOR_CACHE_DIR=$PWD/out/inductor
python3 -c "import diffusers, bitsandbytes, peft; print(diffusers.__version__, bitsandbytes.__version__, peft.__version__)"
B="--minisd-args=--vae-dtype=bfloat16"
python3 bench/run.py --out out/e --cases 'sd15-lora-512-bs8' 'sd15-lora-512-bs8-gc' 'sd15-lora-512-bs8-cached' 'sd15-full-512-bs1-gc' 'sample-sd15-512' 'optim-sd15' "$B" --reference-args=--vae-dtype=bfloat16 --budget 240
python3 bench/run.py --out out/e --cases 'sdxl-lora-1024-bs1' 'sdxl-lora-1024-bs1-gc' 'sdxl-lora-1024-bs1-cached' 'sample-sdxl-1024' "$B" --budget 470
python3 bench/report.py out/e --write BENCHMARKS.md
tar czf $OUT/bench.tgz out/e BENCHMARKS.md
