# The last round of the default-LoRA recipe sweep (docs/WORLD.md), as run on the H100 box from the repo root:
#   bash tools/lora_sweep.sh   (each train.py run on the GPU; 6 at a time; grids of some runs copied to $OUT)
export PYTHONUNBUFFERED=1
run() { name=$1; shift; python3 train.py --out /tmp/sw/$name --no-progress --n-eval 64 --device cuda "$@" > /tmp/sw_$name.log 2>&1; echo "== $name: $*"; grep -E "probe after|trained" /tmp/sw_$name.log; grep -i error /tmp/sw_$name.log; cp /tmp/sw/$name/samples_after.png $OUT/$name.png 2>/dev/null; }
mkdir -p /tmp/sw
run o1 --style outlined &
run o2 --style outlined --n-images 1000 --lr 5e-3 &
run o3 --style outlined --lr 5e-3 --max-steps 200 &
run o4 --style outlined --targets attn-mlp --lr 5e-3 &
run o5 --style outlined --n-images 400 --lr-scheduler cosine &
run o6 --style outlined --sample-cfg 3 &
wait
rm -f $OUT/o3.png $OUT/o4.png $OUT/o5.png $OUT/o6.png
run d1 --style dotted --n-images 1000 --lr 5e-3 &
run s1 --n-images 1000 --lr 5e-3 --sample-cfg 3 --train-text-encoder &
run o7 --style outlined --lr 2e-3 &
run o8 --style outlined --lr 5e-3 --max-steps 150 &
run o9 --style outlined --lr 5e-3 --caption-dropout 0.1 &
run o10 --style outlined --targets attn --lr 5e-3 &
wait
rm -f $OUT/o7.png $OUT/o8.png  $OUT/o10.png
