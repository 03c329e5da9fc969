"""Prodigy: Adam whose learning rate estimates itself (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive
Parameter-Free Learner", Algorithm 3, the Adam version). Set lr = 1 and let d find the step size.

Notation (k = step, g = gradient, x0 = initial parameters, γ = lr, all sums over every parameter of every group):

    m ← β1 m + (1 - β1) d g               v ← β2 v + (1 - β2) d² g²              Adam moments of d-scaled gradients
    r ← β3 r + γ d² ⟨g, x0 - x⟩            s ← β3 s + γ d² g                      β3 = √β2 by default
    d̂ = r / ‖s‖₁                          d ← max(d, d̂)                          d only grows (never above d̂'s max)
    x ← x - γ d (m / (√v + d ε)) - γ d λ x                                       decoupled weight decay (AdamW style)

Why it works: ⟨g, x0 - x⟩ summed over the trajectory lower-bounds d* ‖Σ g‖ with d* = ‖x0 - x*‖ for convex problems,
so d̂ is a lower estimate of the distance to the solution that rises quickly from the tiny d0 (the paper's Lemma 1).

Implementation conventions follow the authors' `prodigyopt` package (so results can be compared with it): r and s are
accumulated with an extra factor 1/d0 (it cancels in d̂ and keeps the numbers away from underflow), the step uses the
d of the previous step in γd and the new d in the ε term, `d_coef` scales d̂ and `growth_rate` caps d's growth per
step; optional bias correction (√(1-β2ᵏ)/(1-β1ᵏ)) and `safeguard_warmup` (s uses d instead of γd). Every parameter
group must have the same lr, or lr 0 (frozen group), because d is one number for the whole model.

Memory: x0, s, m, v: 4 fp32 copies of the parameters (AdamW: 2).
"""
from __future__ import annotations

import math

import torch


class Prodigy(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = float("inf"), use_bias_correction: bool = False, safeguard_warmup: bool = False):
        if d0 <= 0 or lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid Prodigy hyperparameters lr={lr} betas={betas} eps={eps} d0={d0}")
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0, d0=d0, d_max=d0,
                        d_numerator=0.0, d_coef=d_coef, growth_rate=growth_rate, k=0,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # d and its statistics are global: kept in the first group, copied to all groups for the state dict
        g0 = self.param_groups[0]
        beta1, beta2 = g0["betas"]
        beta3 = g0["beta3"] if g0["beta3"] is not None else math.sqrt(beta2)
        d, d0, d_max, k = g0["d"], g0["d0"], g0["d_max"], g0["k"]
        lr = max(group["lr"] for group in self.param_groups)
        bias_correction = (math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
                           if g0["use_bias_correction"] else 1.0)
        dlr = d * lr * bias_correction  # γ d of this step
        # this step's part of r, and ‖s‖₁: float64 like the reference's Python floats, on the device (one sync per step)
        numerator = denominator = 0.0
        active = []
        for group in self.param_groups:
            if group["lr"] not in (lr, 0.0):
                raise RuntimeError("Prodigy: all parameter groups need the same lr (or lr 0)")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["x0"] = p.detach().float().clone()
                    state["s"] = torch.zeros_like(grad)
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                if group["lr"] == 0.0:  # frozen group: no statistics, no step
                    continue
                # r += (d/d0) γd ⟨g, x0 - x⟩ ; the 1/d0 factor cancels in d̂ = r / ‖s‖₁
                dot = torch.dot(grad.flatten(), (state["x0"] - p.float()).flatten())
                numerator = numerator + (d / d0) * dlr * dot.double()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                s_rate = (d / d0) * (d if group["safeguard_warmup"] else dlr)
                state["s"].mul_(beta3).add_(grad, alpha=s_rate)
                denominator = denominator + state["s"].abs().sum().double()
                active.append((group, p, state))
        numerator, denominator = float(numerator), float(denominator)
        if denominator == 0.0:  # no gradient yet: nothing to estimate, no step (as the reference)
            return loss
        # d̂ = d_coef · r / ‖s‖₁ ; d grows monotonically, at most by growth_rate per step
        d_numerator = g0["d_numerator"] * beta3 + numerator
        d_hat = g0["d_coef"] * d_numerator / denominator
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * g0["growth_rate"])
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_numerator=d_numerator, d_hat=d_hat, k=k + 1)
        for group, p, state in active:
            state["step"] += 1
            denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
            x = p.float() if p.dtype != torch.float32 else p
            if group["weight_decay"] != 0:
                x.add_(x, alpha=-group["weight_decay"] * dlr)  # decoupled, scaled by γd like the step
            x.addcdiv_(state["exp_avg"], denom, value=-dlr)
            if x is not p:
                p.copy_(x)
        return loss
