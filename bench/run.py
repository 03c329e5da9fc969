"""Run benchmark cases one after another, each (case, implementation) in its own process, and collect the JSONs.

    python bench/run.py --out bench-out                                  # every case, both implementations
    python bench/run.py --cases 'sd15-lora-*' @targets --out bench-out   # shell patterns; @targets = cases with a goal
    python bench/run.py --out bench-out --budget 540                     # stop starting cases after 540 s
    python bench/run.py --out bench-out --minisd-args '--compile'        # flags for the minisd rows only
    python bench/run.py --tiny --device cpu --out /tmp/bench             # CPU smoke run of everything
    python bench/run.py --list

A result that already exists (OUT/CASE.IMPL.json) is skipped unless --force (or --retry-failed for failed ones), so
a long batch can be split over several time-limited calls with the same command. A process that dies without
writing its result (killed, segfault, --timeout) is recorded as status "error" / "timeout" with the last line of
its output; every process's output is kept in OUT/CASE.IMPL.log. Each invocation is appended to OUT/run.json,
which report.py prints as the reproduce command.

Allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is set for every process of both implementations
(unless --alloc-conf says otherwise): the caching allocator then grows segments in place instead of keeping many
fixed-size blocks, which removes most fragmentation (peak reserved close to peak allocated) at no speed cost.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path[0] = ROOT

from bench.cases import BY_NAME, select  # noqa: E402

ALLOC_CONF = "expandable_segments:True"


def result_path(out: str, case: str, impl: str) -> str:
    return os.path.join(out, f"{case}.{impl}.json")


def needs_run(path: str, force: bool, retry_failed: bool) -> bool:
    if force or not os.path.isfile(path):
        return True
    if retry_failed:
        with open(path) as f:
            return json.load(f).get("status") not in ("ok", "skipped")
    return False


def record_failure(path: str, case: str, impl: str, status: str, error: str, command: str) -> None:
    """A result for a process that wrote none itself."""
    c = BY_NAME[case]
    rec = {"case": case, "impl": impl, "status": status, "error": error, "kind": c.kind, "group": c.group,
           "family": c.family, "batch": c.batch, "resolution": c.resolution, "command": command,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(path + ".tmp", path)


def run_one(case: str, impl: str, a, env: dict) -> str:
    """Run bench/case.py in a fresh process; returns its one-line summary."""
    path = result_path(a.out, case, impl)
    out = os.path.relpath(a.out, ROOT) if a.out.startswith(ROOT + os.sep) else a.out
    args = ["bench/case.py", case, "--impl", impl, "--out", out]
    if a.tiny:
        args.append("--tiny")
    if a.device:
        args += ["--device", a.device]
    args += shlex.split(a.args) + shlex.split(a.minisd_args if impl == "minisd" else a.reference_args)
    command = shlex.join(["python", *args])
    log = path[:-len(".json")] + ".log"
    if os.path.exists(path):
        os.remove(path)   # a stale result must not stand in for this run
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=a.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    with open(log) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    last = lines[-1] if lines else ""
    if rc is None:
        record_failure(path, case, impl, "timeout", f"no result within --timeout {a.timeout} s", command)
        return f"{case} [{impl}] timeout after {a.timeout} s"
    if not os.path.isfile(path):
        record_failure(path, case, impl, "error", f"exit code {rc}: {last}", command)
        return f"{case} [{impl}] died (exit {rc}): {last}"
    return last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=[], help="shell patterns of case names, or @targets (default: all)")
    p.add_argument("--impl", nargs="*", default=[], help="only these implementations (default: each case's own)")
    p.add_argument("--out", default="bench-out", help="results folder (default: bench-out)")
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per case process (default 600)")
    p.add_argument("--budget", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--force", action="store_true", help="rerun cases that already have a result")
    p.add_argument("--retry-failed", action="store_true", help="rerun cases whose result is not ok / skipped")
    p.add_argument("--args", default="", help="extra bench/case.py flags for every row, e.g. '--iters 20'")
    p.add_argument("--minisd-args", default="", help="extra flags for the minisd rows, e.g. '--compile'")
    p.add_argument("--reference-args", default="", help="extra flags for the diffusers / bnb / torch rows")
    p.add_argument("--alloc-conf", default=ALLOC_CONF, help=f"PYTORCH_CUDA_ALLOC_CONF ('' = unset; {ALLOC_CONF})")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cases = select(a.cases)
    if not cases:
        print(f"error: no case matches {' '.join(a.cases)} (--list prints them)", file=sys.stderr)
        return 2
    if a.list:
        for c in cases:
            goals = "; ".join(t.label(c.headline, c.reference) for t in c.targets)
            print(f"{c.name:32s} {c.kind:6s} {'/'.join(c.impls):36s} {goals}")
        return 0
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ)
    if a.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = a.alloc_conf
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    # the invocation, for report.py's "reproduce" line
    runs_file = os.path.join(a.out, "run.json")
    runs = json.load(open(runs_file)) if os.path.isfile(runs_file) else []
    prefix = f"PYTORCH_CUDA_ALLOC_CONF={a.alloc_conf} " if a.alloc_conf else ""
    runs.append({"command": prefix + "python " + shlex.join(["bench/run.py", *(sys.argv[1:] if argv is None
                                                                               else argv)]),
                 "pythonpath": os.environ.get("PYTHONPATH"),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    with open(runs_file, "w") as f:
        json.dump(runs, f, indent=2)

    start, done, left = time.time(), 0, []
    for c in cases:
        for impl in c.impls:
            if a.impl and impl not in a.impl:
                continue
            if not needs_run(result_path(a.out, c.name, impl), a.force, a.retry_failed):
                continue
            if a.budget is not None and time.time() - start > a.budget:
                left.append(f"{c.name}.{impl}")
                continue
            t0 = time.time()
            summary = run_one(c.name, impl, a, env)
            done += 1
            print(f"[{time.time() - t0:5.0f} s] {summary}", flush=True)
    print(f"{done} run(s) in {time.time() - start:.0f} s; results in {a.out}")
    if left:
        print(f"budget reached, not started ({len(left)}): {' '.join(left)} -- run the same command again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
