"""Exponential moving average (EMA) of the trainable tensors: a smoothed copy of the adapter weights.

After every optimizer step s = 0, 1, 2, ... (s = updates done before this one):

    θ_ema ← d_s·θ_ema + (1 − d_s)·θ
    d_s   = min(d, (1 + s) / (10 + s))      with warmup (the default): 0.1, 0.18, 0.25, ..., then capped at d
    d_s   = d                               without warmup

Why average: the last iterate of Adam jitters around the minimum with the step noise; an average over the recent
iterates sits closer to it (Polyak & Juditsky 1992). The exponential form is what DDPM (Ho et al. 2020) and the
official Stable Diffusion runs kept (`model_ema`, d = 0.9999).

Why the warmup: the shadow starts as the initial adapter (LoRA B = 0, i.e. the untouched base model). With a constant
d = 0.999, after 300 steps the initial weights still make up 0.999³⁰⁰ = 74 % of the average, so a short run's EMA
would be mostly "no adapter". With d_s = (1 + s)/(10 + s) (the `num_updates` form of TensorFlow's
ExponentialMovingAverage), 1 − d_s = 9/(10 + s): the average covers roughly the last s/9 steps until d caps the
window at about 1/(1 − d) steps.

The shadow is fp32 whatever the parameters are, on their device. `applied()` swaps it into the parameters for
saving / sampling and restores the raw values exactly afterwards (copies, so the optimizer's references hold).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch


class EMA:
    """Shadow copies of `params`, updated by `update()` after each optimizer step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be within [0, 1), got {decay}")
        self.params = list(params)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay_at(self, s: int) -> float:
        """d_s, the decay of the update that follows s earlier updates."""
        return min(self.decay, (1 + s) / (10 + s)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """θ_ema ← d_s·θ_ema + (1 − d_s)·θ for every tensor (call once per optimizer step)."""
        d = self.decay_at(self.num_updates)
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the current parameters (e.g. EMA switched on at a resume)."""
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_updates = 0

    @contextmanager
    def applied(self):
        """Inside the block the parameters hold the EMA values; afterwards exactly their raw values again.
        copy_ under no_grad bumps the version counters, so caches keyed on them (DoRA's norm) see the change."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield self
        finally:
            with torch.no_grad():
                for r, p in zip(raw, self.params):
                    p.copy_(r)

    def state_dict(self) -> dict:
        """Tensors and numbers only (torch.load(weights_only=True) reads it)."""
        return {"shadow": [s.clone() for s in self.shadow], "num_updates": self.num_updates,
                "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.params) or any(s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise ValueError("the saved EMA does not match the trainable tensors (different adapter layout)")
        device = self.params[0].device if self.params else "cpu"
        self.shadow = [s.to(device, torch.float32).clone() for s in shadow]
        self.num_updates = int(state["num_updates"])
