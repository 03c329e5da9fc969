#!/usr/bin/env bash
# Issue 20 on the device machine: the whole queue (bench/device20-queue.sh) runs as ONE background job in its own
# process session, so it outlives a call; each call starts it if it is not running yet, then waits up to WAIT
# seconds, refreshing $OUT/bench20.tgz (results so far, BENCHMARKS.md from them, the queue's log) every 45 s, so a
# call cut at its limit still brings back what finished. Call it again within the machine's warm time to go on.
#   bash bench/device20.sh WAIT            (carry .whl .bnb, and out/seed20 with rows finished on an earlier machine)
set -u
cd "$(dirname "$0")/.."
WAIT=${1:-540}
J=/tmp/job20
export PYTHONPATH=$PWD:$PWD/.whl/diffusers-0.42.1-py3-none-any.whl:$PWD/.whl/importlib_metadata-10.2.0-py3-none-any.whl:$PWD/.bnb
export TORCHINDUCTOR_CACHE_DIR=$PWD/out/inductor PYTHONUNBUFFERED=1
if [ ! -f $J/started ]; then
    mkdir -p $J out/bench20 out/b20-graph && touch $J/started
    for d in bench20 b20-graph; do   # rows a machine before this one finished: run.py skips them
        [ -d out/seed20/$d ] && cp -n out/seed20/$d/*.json out/$d/ 2>/dev/null
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv > $J/gpu.txt
    setsid nohup bash ${QUEUE:-bench/device20-queue.sh} > $J/log 2>&1 < /dev/null &
    echo "started the queue on $(head -2 $J/gpu.txt | tail -1)"
else
    echo "the queue is already running (or done) on this machine"
fi
pack() {
    python3 bench/report.py out/bench20 --write out/bench20/BENCHMARKS.md > /dev/null 2>&1
    python3 bench/report.py out/b20-graph --write out/b20-graph/BENCHMARKS.md > /dev/null 2>&1
    cp $J/log $J/gpu.txt out/ 2>/dev/null
    tar czf $OUT/bench20.tgz.part out/bench20 out/b20-graph out/log out/gpu.txt out/prof 2>/dev/null
    mv $OUT/bench20.tgz.part $OUT/bench20.tgz
}
while [ ! -f $J/done ] && [ $SECONDS -lt $WAIT ]; do
    sleep 5
    [ $((SECONDS % 45)) -lt 5 ] && pack
done
pack
grep -E "^\[|run\(s\)|phase" $J/log | tail -40
[ -f $J/done ] && echo "QUEUE DONE" || echo "queue still running after ${SECONDS}s"
