"""One optimizer step over a parameter set shaped like the SD1.5 UNet: every tensor of minisd's SD15 UNet (686
tensors, 860M parameters, from 4 values to 1280x1280x3x3) in fp32 with fixed random gradients, as a full fine-tune
hands them to the optimizer. Three rows:

    minisd   minisd.train.adamw8bit.AdamW8bit          8-bit m and v, block-wise absmax (on CUDA: torch.compile'd, a few
                                                 fused kernels per tensor; on the CPU: plain PyTorch ops)
    bnb      bitsandbytes.optim.AdamW8bit        8-bit m and v, block-wise dynamic map (fused CUDA kernel)
    torch    torch.optim.AdamW(fused=True)       fp32 m and v (foreach on the CPU)

Same hyperparameters (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 1e-2; tensors under 4096 values keep fp32
state in both 8-bit optimizers). Reported besides ms/step: optimizer state bytes per parameter = Σ nbytes of every
tensor in `optimizer.state` / parameter count, read after the timed steps. The minisd row compiles its update at
the first warm-up step (not timed); `info.fused` records which path ran.
"""
from __future__ import annotations

import torch

from bench.harness import Options, Workload
from bench.models import model_config
from minisd.unet import UNetModel

LR, WEIGHT_DECAY = 1e-4, 1e-2
# Nominal FLOPs per parameter of an AdamW step (decay 1, m 2, v 3, bias corrections, sqrt and division ~4, update 2),
# only so that MFU is defined: the step is bound by memory bandwidth, not arithmetic.
ADAMW_FLOPS_PER_PARAM = 12


def parameter_shapes(tiny: bool) -> list[torch.Size]:
    with torch.device("meta"):
        unet = UNetModel(model_config("sd15", tiny).unet)
    return [p.shape for p in unet.parameters()]


def make(impl: str, params: list, device: torch.device):
    if impl == "minisd":
        from minisd.train.adamw8bit import AdamW8bit
        return AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY)
    if impl == "bnb":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def build(case, impl: str, tiny: bool, device: torch.device, opts: Options) -> Workload:
    if impl == "bnb":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return Workload(skipped="bitsandbytes not installed")
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in parameter_shapes(tiny):
        p = torch.randn(shape, device=device, generator=g).requires_grad_(True)
        p.grad = torch.randn(shape, device=device, generator=g) * 1e-3
        params.append(p)
    n = sum(p.numel() for p in params)
    opt = make(impl, params, device)

    def metrics():
        return {"state_bytes_per_param": state_bytes(opt) / n, "state_gib": state_bytes(opt) / 2 ** 30}

    info = {"params": n, "tensors": len(params), "optimizer": type(opt).__module__ + "." + type(opt).__name__}
    if impl == "minisd":
        info["fused"] = opt._use_fused(params[0])
    return Workload(step=opt.step, images=0, count_flops=lambda: float(ADAMW_FLOPS_PER_PARAM * n), metrics=metrics,
                    info=info)
