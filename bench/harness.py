"""How a case is measured: the workload interface, timing, FLOP counting, MFU, and the facts recorded with a result
(device, versions, commit).

Time: wall clock around one iteration with `torch.cuda.synchronize()` before and after, so a step's queued kernels
are all inside its own measurement; the median of the timed iterations is reported (robust to one slow step).
FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and attention (forward and backward)
of one extra iteration run eagerly (`torch.compile` is bypassed, its kernels would not be seen). Elementwise work,
norms and the optimizer are not counted, which is the usual convention for model FLOPs; recomputation by gradient
checkpointing is excluded too (the counted iteration runs without it), so MFU compares useful work. On the CPU the
attention kernel has no FLOP formula in torch, so CPU counts miss attention; MFU is only reported on a known GPU.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no 2:4 sparsity) bf16 tensor-core peak in FLOP/s, from NVIDIA's data sheets. MFU = counted FLOPs per second
# divided by this. H100 SXM: 989.4 TFLOP/s (the H200 has the same compute); checked in order, first match wins.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
GIB = 2 ** 30


@dataclass
class Options:
    """Speed switches of a run (flags of bench/case.py); recorded in every result."""
    compile: str | None = None          # None | "blocks" (each UNet block compiled) | "full" (the whole UNet)
    compile_mode: str = "default"       # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead
    channels_last: bool = False         # UNet and VAE weights and inputs in NHWC
    cuda_graph: bool = False            # minisd: the UNet call (sampling) / forward + backward (training) replayed
    tf32: bool = False                  # TF32 matmuls / convolutions for fp32 work (the fp32 VAE); off in both trainers
    cudnn_benchmark: bool = True        # let cuDNN pick the fastest convolution algorithm per shape
    vae_dtype: str = "float32"          # frozen VAE encoder: float32 | bfloat16 (see training.py's docstring)
    decode_dtype: str = "float32"       # sampling rows: the VAE decode's dtype (sample.py --vae-dtype bf16)
    compile_backend: str = "inductor"   # diffusers-compiled rows: torch.compile backend (eager / aot_eager: CPU tests)


@dataclass
class Workload:
    """What a case times. `step()` is one iteration (a training step, one whole image generation, or one optimizer
    step) that makes `images` images. `count_flops()` returns the FLOPs of one iteration. `start_timing()` is called
    after the warm-up, `metrics()` after the timed iterations (extra numbers: sampling phases, optimizer state size).
    `skipped` says why the case cannot run here."""
    step: Callable[[], None] = None
    images: int = 0
    count_flops: Callable[[], float | None] = lambda: None
    start_timing: Callable[[], None] = lambda: None
    metrics: Callable[[], dict] = dict
    info: dict = field(default_factory=dict)
    skipped: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(fn(), milliseconds it took including every kernel it queued)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


@contextlib.contextmanager
def eager():
    """Run torch.compile'd code eagerly (so FlopCounterMode sees every op)."""
    if hasattr(torch.compiler, "set_stance"):
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        yield


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of fn() (matmul, conv, attention; forward and backward), run eagerly once."""
    with eager(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def memory(device: torch.device) -> dict:
    """Peak allocated / reserved GiB since the process started (cumulative: build, warmup and timing)."""
    if device.type != "cuda":
        return {"peak_alloc_gib": None, "peak_reserved_gib": None, "alloc_retries": None}
    stats = torch.cuda.memory_stats(device)
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
            # cudaMalloc retries after freeing the cache: a sign of fragmentation (expandable segments avoid it)
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _version(dist: str, module: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, "__version__", None):
        return mod.__version__
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def minisd_commit() -> str | None:
    """$MINISD_COMMIT, else the commit .git/HEAD points to (read from the files; None without a .git folder)."""
    if os.environ.get("MINISD_COMMIT"):
        return os.environ["MINISD_COMMIT"]
    git = os.path.join(ROOT, ".git")
    try:
        head = open(os.path.join(git, "HEAD")).read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if os.path.isfile(os.path.join(git, ref)):
            return open(os.path.join(git, ref)).read().strip()[:12]
        for line in open(os.path.join(git, "packed-refs")):
            if line.strip().endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return None


def versions() -> dict:
    v = {name: _version(dist, mod) for name, dist, mod in [
        ("torch", "torch", "torch"), ("diffusers", "diffusers", "diffusers"), ("peft", "peft", "peft"),
        ("transformers", "transformers", "transformers"), ("bitsandbytes", "bitsandbytes", "bitsandbytes")]}
    v.update(minisd=minisd_commit(), python=platform.python_version(), cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return v
