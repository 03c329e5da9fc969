"""What one training step keeps for backward: the tensors autograd saves, by the module that saved them and dtype.

    python bench/saved.py sdxl-lora-1024-bs1 [--impl minisd|diffusers] [--vae-dtype bfloat16] [--top 25]

Peak memory of a training step = weights + optimizer state + what the forward saves for the backward (+ the
backward's own temporaries). This prints the third term, grouped by the innermost module running when each tensor
was saved (its path with the block numbers dropped) and by dtype; each storage is counted once, and parameters
(saved by frozen layers to compute input gradients) are not counted, they are in memory anyway.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.cases import BY_NAME  # noqa: E402
from bench.harness import GIB, Options  # noqa: E402
from bench.training import DiffusersTrain, MinisdTrain  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case")
    p.add_argument("--impl", default="minisd", choices=["minisd", "diffusers"])
    p.add_argument("--vae-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    device = torch.device("cuda")
    case = BY_NAME[a.case]
    cls = MinisdTrain if a.impl == "minisd" else DiffusersTrain
    ts = cls(case, a.impl, False, device, Options(vae_dtype=a.vae_dtype))
    ts.step()                                            # one real step: gradients and optimizer state exist
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()

    stack: list[str] = []
    handles = []

    def pop(module, args, out):                          # a forward hook that returns None keeps the output
        stack.pop()
    for name, mod in ts.parts.unet.named_modules():
        where = re.sub(r"\.\d+(?=\.|$)", "", name) or "unet"    # input_blocks.4.1.proj_in -> input_blocks.1.proj_in
        where = f"{where} ({type(mod).__name__})"
        handles.append(mod.register_forward_pre_hook(lambda m, args, w=where: stack.append(w)))
        handles.append(mod.register_forward_hook(pop))
    parts = [ts.parts.unet, ts.parts.vae, *ts.parts.text_encoders]
    params = {p.untyped_storage().data_ptr() for m in parts if m is not None for p in m.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if t.device.type == "cuda" and ptr not in params and ptr not in seen:
            seen[ptr] = (t.untyped_storage().nbytes(), f"{stack[-1] if stack else '(outside the UNet)'} "
                                                       f"{str(t.dtype).replace('torch.', '')}")
        return t

    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ts.forward_backward(ts.B)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for h in handles:
        h.remove()
    by = defaultdict(int)
    for nbytes, key in seen.values():
        by[key] += nbytes
    total = sum(by.values())
    print(f"{a.case} [{a.impl}]: resident between steps {resident / GIB:.2f} GiB (weights, grads, optimizer state), "
          f"step peak {peak / GIB:.2f} GiB, saved for backward {total / GIB:.2f} GiB in {len(seen)} storages")
    for key, nbytes in sorted(by.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"  {nbytes / GIB:7.3f} GiB  {100 * nbytes / total:5.1f} %  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
