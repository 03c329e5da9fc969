"""Lower bounds of a training case, computed on the CPU without weights: the real-size networks are built from fake
tensors (torch's FakeTensorMode: shapes and dtypes, no storage, CPU autocast as on the GPU), one forward + backward of the case's minisd step runs under FlopCounterMode (as harness.py
counts a GPU step: matmul, conv and attention FLOPs, forward and backward, no recomputation), and the bytes that must
live on the GPU are added up from the parameters.

    time floor   = FLOPs of one step / the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s): the step at 100 % MFU;
                   the measured step ms over it is 1 / MFU
    memory floor = frozen weights as stored (bf16, or int8 / fp8 codes + fp32 scales)
                   + trainable weights (fp32) + their gradients (fp32; with the fused backward at most one bucket
                   short of full and the largest tensor: (BUCKET_VALUES - 1) + largest values, minisd/train/fused.py,
                   capped by all of them) + optimizer state (AdamW: 8 B per trainable parameter; 8-bit AdamW: 2 B +
                   block scales, counted as 2.03 B) - no activations, no workspace: peak reserved cannot be lower

    python bench/floors.py                       # the issue-20 rows
    python bench/floors.py --cases 'sdxl-*'      # shell patterns of bench/cases.py names
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench.cases import select  # noqa: E402
from bench.harness import GIB, PEAK_BF16, Options, count_flops  # noqa: E402

ISSUE20 = ["sd15-lora-512-bs8", "sdxl-lora-1024-bs1-gc-int8", "sdxl-lora-1024-bs1-gc-fp8", "sdxl-lora-1024-bs1-gc",
           "sd15-full-512-bs1-gc-fused", "sdxl-full-1024-bs1-gc-fused", "sd15-ti-512-bs1",
           "sd15-dreambooth-prior-512-bs1", "sd15-hypernetwork-512-bs1", "sd15-distill-*"]
PEAK = dict(PEAK_BF16)["H100"]
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.03}


def step_object(case):
    """The minisd TrainStep of `case` built on fake CPU tensors (shapes and dtypes, no storage); its optimizer is
    never stepped."""
    from bench import training
    from bench.methods import CLASSES
    cls = training.MinisdTrain if case.method == "lora" else CLASSES[(case.method, "minisd")]
    return cls(case, "minisd", False, torch.device("cpu"), Options())


def floors(case) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # the math attention: its matmuls are counted (CPU's fused kernel has no FLOP formula in torch)
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH):
        s = step_object(case)
        s.set_checkpointing(False)
        flops = count_flops(lambda: s.forward_backward(s.B))
    trainable = {id(p) for p in s.params}
    n_train = sum(p.numel() for p in s.params)
    # frozen, as stored: every parameter that does not train and every buffer (quantized layers keep their codes
    # and scales in buffers, quant.py)
    frozen = 0
    for m in [s.parts.unet, s.parts.vae, *s.parts.text_encoders, getattr(s, "teacher", None)]:
        if m is not None:
            frozen += sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in trainable)
            frozen += sum(b.numel() * b.element_size() for b in m.buffers())
    if case.fused_backward:  # the bound of minisd/train/fused.py: a bucket short of full and the tensor that completes
        from minisd.train.fused import BUCKET_VALUES
        grads = min(BUCKET_VALUES - 1 + max(p.numel() for p in s.params), n_train) * 4
    else:
        grads = n_train * 4
    mem = frozen + n_train * 4 + grads + n_train * STATE_BYTES[case.optimizer]
    return {"case": case.name, "gflops": flops / 1e9, "floor_ms": flops / PEAK * 1e3, "trainable": n_train,
            "memory_floor_gib": mem / GIB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=ISSUE20, help="shell patterns (default: issue 20's rows)")
    a = p.parse_args(argv)
    cases = [c for c in select(a.cases) if c.kind == "train"]
    if not cases:
        print(f"error: no training case matches {' '.join(a.cases)}", file=sys.stderr)
        return 2
    print("| case | GFLOP / step | step floor ms (H100 989 TF/s) | trainable params | memory floor GiB |")
    print("|---|---|---|---|---|")
    for c in cases:
        f = floors(c)
        print(f"| {c.name} | {f['gflops']:.0f} | {f['floor_ms']:.1f} | {f['trainable']:,} | "
              f"{f['memory_floor_gib']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
