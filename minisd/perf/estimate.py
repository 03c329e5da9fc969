"""What a sampling request will cost, before it runs: FLOPs and peak activation memory of one UNet call and of the
VAE decode, and a time from this device's measured matmul speed. sample.py prints it for large requests, where a
4096x4096 image on a CPU would otherwise sit silent for minutes (or hours) before its first progress update. It
changes nothing: the model it is given is only read.

How: the model's architecture is built again on PyTorch's "meta" device (shapes without data, so nothing is
computed and nothing allocated) and run once at the requested shape:

  * FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts every conv and matmul; attention is counted by hand
    (`_Attention`), 4·B·nh·N·M·hd (QKᵀ and the product with V, 2 FLOPs per multiply-add), because on "meta"
    PyTorch would decompose it into an N x M score matrix;
  * memory: `_Live` adds each new tensor's bytes when an op makes it and subtracts them when Python frees it; the
    peak is what inference needs on top of the weights (a process needs somewhat more: the allocator, convolution
    workspaces; minisd-tiny at 512 px on a CPU: 0.3 GiB estimated, 0.39 GiB more resident memory measured). Attention is taken as the fused kernel computes it (the
    output and a row statistic, no N x M matrix), which is what the CPU's flash kernel and the GPU kernels do;
  * time: the FLOPs of every UNet call and the decode over the speed of a 1024x1024 matmul in the UNet's dtype on
    the device, a lower bound (convolutions and attention run below peak matmul speed).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class _Attention(TorchFunctionMode):
    """F.scaled_dot_product_attention on meta as the fused kernel: an output-shaped result, FLOPs counted here."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]                                   # (B, nh, N, hd), (B, nh, M, hd), (B, nh, M, hdv)
            *batch, N, hd = q.shape
            M, hdv = k.shape[-2], v.shape[-1]
            n = 1
            for b in batch:
                n *= b
            self.flops += 2 * n * N * M * (hd + hdv)             # QKᵀ and (softmax)·V
            # as the CPU flash kernel makes them: the output and an fp32 log-sum-exp per row (dropped at once)
            out, lse = q.new_empty((*batch, N, hdv)), q.new_empty((*batch, N), dtype=torch.float32)
            del lse
            return out
        return func(*args, **kwargs)


class _Live(TorchDispatchMode):
    """Bytes of the tensors alive, and their peak, as ops create them and Python frees them."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            # a view or an in-place result (the schema's return aliases an input) allocates nothing
            aliases = i < len(returns) and returns[i].alias_info is not None
            if isinstance(t, torch.Tensor) and not aliases:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def _measure(fn) -> tuple[int, int]:
    """(FLOPs, peak bytes) of fn() on meta tensors."""
    att, live = _Attention(), _Live()
    with torch.no_grad(), FlopCounterMode(display=False) as fc, att, live:
        fn()
    return fc.get_total_flops() + att.flops, live.peak


@dataclass
class Estimate:
    unet_flops: int     # one UNet call (both halves of a guided batch)
    unet_peak: int      # bytes of activations during it
    decode_flops: int
    decode_peak: int
    calls: int          # UNet calls of one batch
    batches: int        # batches of the request (sample.py --prompts: one per line)
    weights: int        # bytes of the UNet + VAE weights as loaded
    flops_per_s: float  # the device's matmul speed in the UNet's dtype, measured
    dtype: str = "fp32"

    @property
    def seconds(self) -> float:
        return self.batches * (self.calls * self.unet_flops + self.decode_flops) / self.flops_per_s

    @property
    def peak(self) -> int:
        return self.weights + max(self.unet_peak, self.decode_peak)

    def line(self) -> str:
        each = f"{self.batches} x (" if self.batches > 1 else ""
        return (f"estimate: {each}{self.calls} UNet calls of {tflop(self.unet_flops)} and a VAE decode of "
                f"{tflop(self.decode_flops)}{')' if each else ''}; at this device's {self.flops_per_s / 1e9:.0f} "
                f"GFLOP/s ({self.dtype} matmul) at least {duration(self.seconds)}; "
                f"memory about {self.peak / 2**30:.1f} GiB "
                f"(weights {self.weights / 2**30:.2f}, UNet activations {self.unet_peak / 2**30:.1f}, "
                f"decode {self.decode_peak / 2**30:.1f})")


def duration(s: float) -> str:
    return (f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h" if s < 172800
            else f"{s / 86400:.0f} days")


def tflop(x: float) -> str:
    return f"{x / 1e12:.3g} TFLOP" if x < 1e15 else f"{x / 1e12:.0f} TFLOP"


def matmul_speed(device, dtype=torch.float32, n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of an n x n matmul in dtype on the device, the best of reps (about 0.1 s for fp32 on one CPU core)."""
    a = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps):
        if a.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def estimate(model, width: int, height: int, images: int, steps: int, guided: bool, device="cpu",
             dtype=torch.float32, batches: int = 1, flops_per_s: float | None = None) -> Estimate:
    """The cost of `batches` times sampling `images` images (one UNet batch) of width x height with `steps` UNet
    calls (guided: each on the conditional and unconditional halves)."""
    from ..unet import UNetModel
    from ..vae import AutoencoderKL
    cfg, f = model.cfg, model.vae_scale
    B = images * (2 if guided else 1)
    with torch.device("meta"):
        vae_dtype = next(model.vae.parameters()).dtype  # the decode runs in the VAE's own dtype (often fp32)
        unet, vae = UNetModel(cfg.unet).to(dtype), AutoencoderKL(cfg.vae).to(vae_dtype)
        x = torch.empty(B, cfg.unet.in_channels, height // f, width // f, dtype=dtype)          # (2B, C, h, w)
        t = torch.empty(B)
        ctx = torch.empty(B, 77, cfg.unet.context_dim, dtype=dtype)                            # (2B, T, D)
        y = torch.empty(B, cfg.unet.adm_in_channels, dtype=dtype) if cfg.unet.adm_in_channels else None
        z = torch.empty(images, cfg.vae.embed_dim, height // f, width // f, dtype=vae_dtype)   # (B, 4, h, w)
    unet_flops, unet_peak = _measure(lambda: unet(x, t, ctx, y=y))
    decode_flops, decode_peak = _measure(lambda: vae.decode(z))
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    return Estimate(unet_flops, unet_peak, decode_flops, decode_peak, steps, batches,
                    size(model.unet) + size(model.vae), flops_per_s or matmul_speed(device, dtype),
                    {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
