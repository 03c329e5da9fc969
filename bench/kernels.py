"""Where one benchmark case spends its GPU time: torch.profiler over a few iterations, top kernels by CUDA time.

    python bench/kernels.py sdxl-lora-1024-bs1-cached --impl minisd [--iters 3] [--top 25] [--vae-dtype bfloat16]
                                                                    [--compile]

This is the "profile that shows why" of BENCHMARKS.md: it prints the kernels (and operator groups) that take the
time of a step, so a missed target can be traced to what dominates (convolution, attention, normalisation, casts).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.case import build_workload  # noqa: E402
from bench.cases import BY_NAME  # noqa: E402
from bench.harness import Options  # noqa: E402

# kernel-name fragments -> a readable group (first match wins)
GROUPS = [("Triton (fused by compile)", ("triton_",)),
          ("attention", ("flash", "fmha", "attention", "cutlass::fmha", "efficient")),
          ("convolution", ("conv", "implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "cudnn", "sm90_xmma")),
          ("matmul (linear)", ("gemm", "cublas", "nvjet", "sm90_")),
          ("group norm / layer norm", ("norm", "welford")),
          ("elementwise / casts / copies", ("elementwise", "vectorized", "copy", "cast", "fill", "unrolled")),
          ("reductions", ("reduce",)),
          ("optimizer", ("adam", "multi_tensor", "foreach"))]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case")
    p.add_argument("--impl", default="minisd")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile as case.py --compile (blocks) does")
    a = p.parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    wl = build_workload(BY_NAME[a.case], a.impl, False, device, Options(vae_dtype=a.vae_dtype,
                                                                        compile="blocks" if a.compile else None))
    for _ in range(2):  # warm-up: compilation, cuDNN autotuning, allocator growth
        wl.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.iters):
            wl.step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3 / a.iters, e.count // a.iters)
               for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(ms for _, ms, _ in kernels)
    groups = defaultdict(float)
    for name, ms, _ in kernels:
        groups[group_of(name)] += ms
    print(f"{a.case} [{a.impl}]: {total:.1f} ms of GPU kernels per step")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:32s} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
    print(f"top {a.top} kernels (ms per step, launches per step):")
    for name, ms, n in sorted(kernels, key=lambda k: -k[1])[:a.top]:
        print(f"  {ms:8.2f} ms {n:5d}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
