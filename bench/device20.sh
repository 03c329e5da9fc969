#!/usr/bin/env bash
# Issue 20 on the device machine: the whole queue (bench/device20-queue.sh) runs as ONE background job in its own
# process session, so it outlives a call; each call starts it if it is not running yet, then waits up to WAIT
# seconds, refreshing $OUT/bench20.tgz (results so far, BENCHMARKS.md from them, the queue's log, the profiles)
# every 45 s, so a call cut at its limit still brings back what finished. Call it again within the machine's warm
# time (30 s) to go on; on a fresh machine carry out/seed (rows finished earlier: run.py skips them).
#   bash bench/device20.sh WAIT            (carry .whl .bnb, and out/seed, out/prof where they exist)
set -u
cd "$(dirname "$0")/.."
WAIT=${1:-540}
J=/tmp/job20
F=out/bench23                     # the next loan's results folder (earlier: bench/results/h100-2026-12-06, -b)
export PYTHONPATH=.:.whl/diffusers-0.42.1-py3-none-any.whl:.whl/importlib_metadata-10.2.0-py3-none-any.whl:.bnb
export TORCHINDUCTOR_CACHE_DIR=$PWD/out/inductor PYTHONUNBUFFERED=1 BENCH_OUT=$F
if [ ! -f $J/started ] || [ -f $J/done ]; then   # not started yet, or finished: (re)start, finished rows skip
    rm -rf $J; mkdir -p $J $F out/prof && touch $J/started
    for d in out/seed/$(basename $F)*; do [ -d $d ] && mkdir -p out/$(basename $d) && cp -n $d/*.json out/$(basename $d)/; done
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv > $J/gpu.txt
    setsid nohup bash ${QUEUE:-bench/device20-queue.sh} > $J/log 2>&1 < /dev/null &
    echo "started the queue on $(head -2 $J/gpu.txt | tail -1)"
else
    echo "the queue is already running on this machine"
fi
pack() {
    for d in $F $F-*; do [ -d $d ] && python3 bench/report.py $d --write $d/BENCHMARKS.md > /dev/null 2>&1; done
    cp $J/log $J/gpu.txt out/ 2>/dev/null
    tar czf $OUT/bench20.tgz.part $F $F-* out/log out/gpu.txt out/prof 2>/dev/null
    mv $OUT/bench20.tgz.part $OUT/bench20.tgz
}
while [ ! -f $J/done ] && [ $SECONDS -lt $WAIT ]; do
    sleep 5
    [ $((SECONDS % 45)) -lt 5 ] && pack
done
pack
grep -E "^\[|run\(s\)|phase" $J/log | tail -40
[ -f $J/done ] && echo "QUEUE DONE" || echo "queue still running after ${SECONDS}s"
