"""--fused-backward: the optimizer steps inside the backward pass, a bucket of parameters at a time, as soon as their
gradients are complete, and their gradients are freed at once (the technique of OneTrainer and kohya's full SDXL
fine-tunes; PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass" steps one
tensor per hook; DDP's gradient buckets are the same idea for the all-reduce).

Unfused, a step holds every gradient at once: backward fills all of them, then the optimizer reads them. Fused, a
post-accumulate-grad hook (`Tensor.register_post_accumulate_grad_hook`, called once the gradient of that tensor is
summed for this backward) puts the tensor in the current bucket, and ONE `opt.step()` updates all of a bucket's
tensors, whose gradients are then set to None. A bucket holds at most `bucket_values` values (default
`BUCKET_VALUES` = 2²⁵, AdamW8bit's chunk size: a bucket's 8-bit tensors make one compiled call of its fused path,
unless their padding to whole blocks tips them over): it is stepped before a tensor that would take it past that
joins it, and at once when it reaches it (a larger tensor is a bucket of its own). What is left in the bucket when
the backward ends is stepped by the training loop's own `opt.step()`, which skips every tensor without a gradient -
exactly the remainder, with their groups' hyperparameters; the loop's EMA update and LR schedule then run as
unfused, after every tensor has its new value, and `zero_grad(set_to_none=True)` frees the remainder's gradients.
(An optimizer step-post-hook sees the loop's step and empties the bucket list.)

Memory bound. Between hooks the bucket holds < bucket_values values (it is stepped on reaching it), so when tensor p's
gradient completes, the live gradients are the bucket's and p's:

    live gradient bytes <= (bucket_values - 1) · itemsize + bytes of the largest tensor

(itemsize of the gradients: 4 for fp32). At the default and fp32 gradients: 128 MiB + the largest tensor; SD1.5's and
SDXL's largest is `output_blocks.0.0.in_layers.2.weight` (1280, 2560, 3, 3): 29.5M values, 112.5 MiB, so at most
240.5 MiB of gradients at the peak instead of 3.2 GiB (SD1.5, unfused) or 9.6 GiB (SDXL). The remainder stepped by
the loop is < bucket_values values.

Why buckets, not one tensor per hook (the first version): each `opt.step()` pays host costs per call - Python, the
optimizer's bookkeeping, and for minisd's AdamW8bit on CUDA a host-to-device copy of the step's scalars, the chunk
lookup, a gather, a compiled call behind Dynamo's guards and a foreach copy: ~0.4 ms. Per tensor that is 686 calls a
step for the SD1.5 UNet, 1680 for SDXL's. Measured on one H100 (full fine-tune at 512 px bs1, 8-bit AdamW,
checkpointing, eager): 419.5 ms/step against diffusers' unfused 235.6 ms (SDXL: 1227 against 656 ms) - the gap is
those calls. Bucketed, the fused backward makes the optimizer calls the unfused step makes: 30 buckets + the loop's
step for SD1.5 (31 compiled 8-bit calls, as unfused), 84 + 1 for SDXL (`python -m minisd.train.fused` counts them
on the meta device, parameters in reverse order standing in for autograd's).

What it changes: nothing in the numbers, for an optimizer whose update of a tensor reads only that tensor's
gradient and state - AdamW (torch's) and minisd's AdamW8bit: stepping tensors in buckets equals stepping them one
at a time. The hook runs the run's own optimizer over a view of its parameter groups that holds just the bucket's
tensors, one view per group the bucket touches (each with its group's hyperparameters: lr as the LR schedule set it;
the same state object, so checkpoints, the LR schedule and the EMA do not change). A bucket's composition is the
same every step (autograd's order is), so AdamW8bit's chunk layouts, keyed by the tensors, are built once.

Where it cannot be exact it is refused (TrainConfig.validate): gradient accumulation > 1 (the update needs the sum of
several backwards), clipping by the global norm (needs every gradient before the first update), fp16's grad scaler
(checks every gradient for inf before stepping), Prodigy (its step size is a sum over all tensors), --cuda-graph,
and more than one process (the gradient must be all-reduced before the update: that needs a hook per tensor with a
collective inside, in the same order on every rank - FSDP's territory, see README "More than one GPU").
"""
from __future__ import annotations

import math

import torch

# Values per fused optimizer step (2²⁵ = 32M, AdamW8bit.chunk_size): up to 128 MiB of fp32 gradients (64 MiB bf16)
# alive besides the largest tensor's at the peak; SD1.5's 860M trained values make 30 buckets + the loop's step.
BUCKET_VALUES = 2 ** 25


def bucket_values(mb: float) -> int:
    """`--fused-bucket-mb` as values: MB (2²⁰ bytes) of fp32 gradients, rounded up (128 -> 2²⁵)."""
    return math.ceil(mb * 2 ** 20 / 4)


class FusedBackward:
    """Registers, for every trainable tensor, a hook that adds it to the bucket (`add`), and steps `opt` over each
    full bucket, freeing its gradients (`step_bucket`). `steps` counts the buckets stepped by the hooks (the loop's
    step of the remainder is not one of them); `peak_grad_bytes` is the most gradient bytes alive at a hook (the
    bucket's and the new tensor's)."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor], bucket_values: int = BUCKET_VALUES):
        if bucket_values < 1:
            raise ValueError(f"bucket_values must be >= 1, got {bucket_values}")
        self.opt, self.params, self.bucket_values = opt, list(params), int(bucket_values)
        # by index: load_state_dict (a resume) replaces the group dicts, and the LR schedule writes to the new ones
        self.group_of = {p: i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        self.bucket: list[torch.Tensor] = []  # gradient complete, not stepped yet (autograd's order)
        self.values = self.bytes = 0          # of the bucket
        self.peak_grad_bytes = self.steps = 0
        self.stepping = False                 # True during the bucket's own opt.step()
        self.handles = [p.register_post_accumulate_grad_hook(self.add) for p in self.params]
        # the loop's opt.step() steps the remainder: the bucket is then empty (its gradients freed by zero_grad)
        self.handles.append(opt.register_step_post_hook(self.after_step))

    @torch.no_grad()
    def add(self, p: torch.Tensor) -> None:
        """p's gradient is complete: into the bucket. The bucket is stepped before p if p would take it past
        `bucket_values` (so that a bucket fits one AdamW8bit chunk), and with p once it holds `bucket_values`."""
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.bytes + p.grad.nbytes)
        if self.bucket and self.values + p.numel() > self.bucket_values:
            self.step_bucket()
        self.bucket.append(p)
        self.values += p.numel()
        self.bytes += p.grad.nbytes
        if self.values >= self.bucket_values:
            self.step_bucket()

    @torch.no_grad()
    def step_bucket(self) -> None:
        """One optimizer step of the bucket's tensors, then their gradients freed."""
        groups, views = self.opt.param_groups, {}
        for p in self.bucket:  # per group, in the bucket's order (the same every step)
            views.setdefault(self.group_of[p], []).append(p)
        # a view of each group the bucket touches: the same hyperparameters (lr as the LR schedule set it)
        self.opt.param_groups = [{**groups[i], "params": ps} for i, ps in sorted(views.items())]
        self.stepping = True
        try:
            self.opt.step()
        finally:
            self.opt.param_groups, self.stepping = groups, False
        for p in self.bucket:
            p.grad = None
        self.steps += 1
        self.bucket, self.values, self.bytes = [], 0, 0

    def after_step(self, opt, args, kwargs) -> None:
        if not self.stepping:  # the loop's step: it stepped what the bucket held
            self.bucket, self.values, self.bytes = [], 0, 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def buckets(sizes: list[int], bucket: int = BUCKET_VALUES) -> list[list[int]]:
    """The buckets `FusedBackward.add` steps for tensors of `sizes` values in hook order; the last one (possibly
    empty) is the remainder, stepped by the loop."""
    out, held = [[]], 0
    for n in sizes:
        if out[-1] and held + n > bucket:
            out, held = out + [[]], 0
        out[-1].append(n)
        held += n
        if held >= bucket:
            out, held = out + [[]], 0
    return out


def main() -> None:
    """Optimizer steps per backward of a full SD1.5 / SDXL UNet fine-tune, per tensor and bucketed, and the 8-bit
    AdamW's compiled calls (chunks) they make (built on the meta device: no memory; the parameters in reverse order
    stand in for autograd's)."""
    from ..config import PRESETS
    from ..unet import UNetModel
    from .adamw8bit import AdamW8bit

    def chunks(sizes):  # AdamW8bit._layout's packing of the 8-bit tensors (>= 4096 values), blocks of 256
        n, size = 0, AdamW8bit.chunk_size
        for v in (math.ceil(s / 256) * 256 for s in sizes if s >= 4096):
            n, size = (n, size + v) if n and size + v <= AdamW8bit.chunk_size else (n + 1, v)
        return n

    for name in ("sd15", "sdxl_base"):
        with torch.device("meta"):
            unet = UNetModel(PRESETS[name].unet)
        sizes = [p.numel() for p in unet.parameters()][::-1]
        bs = buckets(sizes)
        print(f"{name}: {len(sizes)} tensors, {sum(sizes):,} values, largest {max(sizes):,}: "
              f"{len(bs) - 1} bucket steps + 1 by the loop ({sum(bs[-1]):,} values) instead of {len(sizes)} steps; "
              f"8-bit chunks (compiled calls) {sum(map(chunks, bs))} (per tensor: {sum(s >= 4096 for s in sizes)}, "
              f"unfused: {chunks(sizes[::-1])})")


if __name__ == "__main__":
    main()
