"""Run ONE benchmark case with one implementation in this process and write OUT/CASE.IMPL.json.

    python bench/case.py sd15-lora-512-bs8 --impl minisd --out bench-out [--warmup N --iters M] [--compile]
    python bench/case.py optim-sd15 --impl bnb --out bench-out
    python bench/case.py sample-sd15-512 --impl diffusers --tiny --device cpu --out /tmp/b    # CPU smoke test

bench/run.py runs every case this way, each in a fresh process (so peak memory and compile caches of one case
never leak into another). The JSON holds: step_ms (median of the timed iterations), images_per_s, peak_alloc_gib /
peak_reserved_gib (whole process: build, warmup and timing), flops_per_step and mfu, the case's extra metrics, the
device, versions, options and the exact command. A failure (out of memory, an exception) is written as a result
with status "oom" / "error" and its message; a case that cannot run here (bitsandbytes missing) as "skipped".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import traceback

if __name__ == "__main__":  # run as a script: import from the repository root, not from bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench import harness  # noqa: E402
from bench.cases import BY_NAME, Case  # noqa: E402
from bench.harness import Options  # noqa: E402


def build_workload(case: Case, impl: str, tiny: bool, device: torch.device, opts: Options) -> harness.Workload:
    if case.kind == "train":
        from bench.training import build
    elif case.kind == "sample":
        from bench.sampling import build
    else:
        from bench.optim import build
    return build(case, impl, tiny, device, opts)


def run_case(case: Case, impl: str, device: torch.device, tiny: bool = False, warmup: int | None = None,
             iters: int | None = None, opts: Options | None = None, command: str = "") -> dict:
    """Build, warm up, time, read memory, count FLOPs; returns the result record (never raises for a failed run)."""
    opts = opts or Options()
    warmup = case.warmup if warmup is None else warmup
    iters = case.iters if iters is None else iters
    rec = {"case": case.name, "impl": impl, "status": "ok", "error": None, "kind": case.kind, "group": case.group,
           "family": case.family, "batch": case.batch, "resolution": case.resolution,
           "checkpointing": case.checkpointing, "cached": case.cached, "full_ft": case.full_ft,
           "optimizer": case.optimizer, "base_dtype": case.base_dtype, "fused_backward": case.fused_backward,
           "method": case.method, "tiny": tiny, "options": vars(opts).copy(), "warmup": warmup, "iters": iters,
           "device": harness.device_name(device), "versions": None, "command": command,
           "env": {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF",)},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for k in ("step_ms", "images_per_s", "s_per_image", "steps_per_s", "flops_per_step", "mfu"):
        rec[k] = None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = opts.tf32
        torch.backends.cudnn.allow_tf32 = opts.tf32
    try:
        wl = build_workload(case, impl, tiny, device, opts)
        rec["info"] = wl.info
        if wl.skipped:
            rec.update(status="skipped", error=wl.skipped)
        else:
            measure(wl, rec, device, warmup, iters)
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0])
        rec.update(harness.memory(device))
    except Exception as e:  # recorded, so that one broken case does not stop a batch
        traceback.print_exc()
        rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    rec["versions"] = harness.versions()     # at the end: the libraries the case imported report their own
    return rec


def measure(wl: harness.Workload, rec: dict, device: torch.device, warmup: int, iters: int) -> None:
    for _ in range(warmup):
        wl.step()
    wl.start_timing()
    times = [harness.timed(wl.step, device)[1] for _ in range(iters)]
    rec.update(step_ms=harness.median(times), step_ms_all=times)
    rec["steps_per_s"] = 1e3 / rec["step_ms"]
    rec["images_per_s"] = wl.images * rec["steps_per_s"] if wl.images else None
    rec["s_per_image"] = 1 / rec["images_per_s"] if rec["images_per_s"] else None
    rec.update(harness.memory(device))       # before the FLOP count, whose step may need other memory
    rec.update(wl.metrics())
    try:
        rec["flops_per_step"] = wl.count_flops()
    except torch.OutOfMemoryError:           # the timing stands; only MFU is lost
        rec["flops_note"] = "out of memory while counting FLOPs"
    rec["peak_flops"] = peak = harness.peak_flops(device)
    if peak and rec["flops_per_step"]:
        rec["mfu"] = rec["flops_per_step"] / (rec["step_ms"] / 1e3) / peak


def write_json(rec: dict, out: str) -> str:
    """OUT/CASE.IMPL.json, written to a temporary file and renamed (never half-written)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{rec['case']}.{rec['impl']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", help="case name (bench/cases.py; `python bench/run.py --list` prints them)")
    p.add_argument("--impl", required=True, help="minisd | diffusers | diffusers-compiled (the case's own: "
                   "run.py --list; optimizer case: minisd | bnb | torch)")
    p.add_argument("--out", required=True, help="folder for CASE.IMPL.json")
    p.add_argument("--tiny", action="store_true", help="tiny models of both sides (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: the case's)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: the case's)")
    p.add_argument("--compile", nargs="?", const="blocks", default=None, choices=["blocks", "full"],
                   help="torch.compile the UNet: each block (default) or the whole network")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default, max-autotune-no-cudagraphs, reduce-overhead)")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    p.add_argument("--cuda-graph", action="store_true", help="minisd on CUDA: replay the UNet call (sampling) or a training "
                   "step's forward + backward (training) from a CUDA graph (minisd/graphs.py)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls and convolutions (the VAE)")
    p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the frozen VAE encoder in training cases")
    p.add_argument("--decode-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the VAE decode in sampling cases, both sides (sample.py --vae-dtype bf16)")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend of the diffusers-compiled rows (default inductor; the others trace "
                   "the same graphs without generating kernels: CPU smoke tests)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="do not let cuDNN autotune convolutions")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    case = BY_NAME.get(a.case)
    if case is None:
        print(f"error: unknown case {a.case!r} (bench/run.py --list prints the cases)", file=sys.stderr)
        return 2
    if a.impl not in case.impls:
        print(f"error: {a.case} runs with --impl {' | '.join(case.impls)}, not {a.impl!r}", file=sys.stderr)
        return 2
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    for flag, value in (("--warmup", a.warmup), ("--iters", a.iters)):
        if value is not None and value < (0 if flag == "--warmup" else 1):
            print(f"error: {flag} {value} is out of range", file=sys.stderr)
            return 2
    if a.cuda_graph and (a.impl != "minisd" or case.kind not in ("sample", "train") or device.type != "cuda"):
        print("error: --cuda-graph applies to the minisd rows of sampling and training cases on CUDA only",
              file=sys.stderr)
        return 2
    if a.impl == "diffusers-compiled" and a.compile:
        print("error: --compile: the diffusers-compiled rows compile their own way (bench/training.py "
              "compile_reference); pass --compile-mode to choose its mode", file=sys.stderr)
        return 2
    if a.compile_backend != "inductor" and a.impl != "diffusers-compiled":
        print("error: --compile-backend applies to --impl diffusers-compiled only", file=sys.stderr)
        return 2
    if case.method == "distill" and (a.compile or a.cuda_graph):
        print("error: --compile / --cuda-graph are not wired into the distillation rows", file=sys.stderr)
        return 2
    if a.cuda_graph and case.fused_backward:
        print("error: --cuda-graph with a fused-backward row (train.py refuses the pair too)", file=sys.stderr)
        return 2
    if a.decode_dtype != "float32" and case.kind != "sample":
        print("error: --decode-dtype applies to the sampling cases only", file=sys.stderr)
        return 2
    opts = Options(compile=a.compile, compile_mode=a.compile_mode, channels_last=a.channels_last,
                   cuda_graph=a.cuda_graph, tf32=a.tf32, cudnn_benchmark=not a.no_cudnn_benchmark,
                   vae_dtype=a.vae_dtype, compile_backend=a.compile_backend,
                   decode_dtype=a.decode_dtype)
    alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    command = (f"PYTORCH_CUDA_ALLOC_CONF={alloc} " if alloc else "") + "python " + shlex.join(
        [os.path.relpath(os.path.abspath(__file__))] + argv)
    rec = run_case(case, a.impl, device, a.tiny, a.warmup, a.iters, opts, command)
    path = write_json(rec, a.out)
    status = rec["status"] + (f": {rec['error']}" if rec["error"] else "")
    speed = f"{rec['step_ms']:.1f} ms/step" if rec["step_ms"] else ""
    print(f"{case.name} [{a.impl}] {status} {speed} -> {path}")
    return 0 if rec["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
