"""--fused-backward: each parameter's optimizer step runs inside the backward pass, as soon as its gradient is
complete, and the gradient is freed at once (the technique of OneTrainer and kohya's full SDXL fine-tunes; PyTorch's
tutorial "How to save memory by fusing the optimizer step into the backward pass").

Unfused, a step holds every gradient at once: backward fills all of them, then the optimizer reads them. Fused, a
post-accumulate-grad hook (`Tensor.register_post_accumulate_grad_hook`, called once the gradient of that tensor is
summed for this backward) steps that one tensor and sets its .grad to None, so at most the gradients of the
tensors being finished at that moment are alive: for a full fine-tune of SDXL's 2.6 G parameters that is 5 GB
(bf16) less at the peak; for adapters, their size (small, but the mechanics are the same).

What it changes: nothing in the numbers, for an optimizer whose update of a tensor reads only that tensor's
gradient and state - AdamW (torch's) and minisd's AdamW8bit. The hook runs the run's own optimizer over a
one-tensor view of its parameter groups (same hyperparameters, same state object, so checkpoints, the LR schedule
and the EMA do not change); the loop's later `opt.step()` then finds no gradient and does nothing.

Where it cannot be exact it is refused (TrainConfig.validate): gradient accumulation > 1 (the update needs the sum of
several backwards), clipping by the global norm (needs every gradient before the first update), fp16's grad scaler
(checks every gradient for inf before stepping), Prodigy (its step size is a sum over all tensors), --cuda-graph,
and more than one process (the gradient must be all-reduced before the update: that needs a hook per tensor with a
collective inside, in the same order on every rank - FSDP's territory, see README "More than one GPU").
"""
from __future__ import annotations

import torch


class FusedBackward:
    """Registers, for every trainable tensor, a hook that steps `opt` for that tensor and drops its gradient.
    `live_grad_bytes()` and `peak_grad_bytes` count gradient bytes alive at each hook (for the memory test)."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]):
        self.opt, self.params = opt, list(params)
        # by index: load_state_dict (a resume) replaces the group dicts, and the LR schedule writes to the new ones
        self.group_of = {p: i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        self.peak_grad_bytes = 0
        self.handles = [p.register_post_accumulate_grad_hook(self.step_one) for p in self.params]

    def live_grad_bytes(self) -> int:
        return sum(p.grad.nbytes for p in self.params if p.grad is not None)

    @torch.no_grad()
    def step_one(self, p: torch.Tensor) -> None:
        """The optimizer step of p alone, then its gradient freed."""
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.live_grad_bytes())
        groups = self.opt.param_groups
        # a one-tensor view of p's group: the same hyperparameters (lr as the LR schedule set it), the same state
        self.opt.param_groups = [{**groups[self.group_of[p]], "params": [p]}]
        try:
            self.opt.step()
        finally:
            self.opt.param_groups = groups
        p.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
