"""LoRA by truncated SVD: extract one from two models (tuned − base), or shrink an existing adapter to a lower rank.

For a layer's update D (the weight difference, or an adapter's ΔW = (α/r)·B A, conv kernels flattened to
[out, in·kh·kw]) with SVD D = U S Vᵀ, keep r singular triplets:

    up = U_r √S_r  [out, r]        down = √S_r V_rᵀ  [r, in·kh·kw]        alpha = r  (scale 1)

By Eckart-Young (1936) up·down is the best rank-r approximation of D in the Frobenius norm, and its relative error is
known before anything is written:

    ‖D − D_r‖_F / ‖D‖_F = √(Σ_{i>r} s_i²) / √(Σ_i s_i²)          (reported per layer)

r is either fixed (`rank`, clipped to min(out, in·kh·kw)) or the smallest r keeping a fraction `energy` of Σ s_i²
(relative error ≤ √(1 − energy)). The split √S on both sides gives the factors equal norms, a good start for training
further. Conv layers keep their kernel in `down` ([r, in, kh, kw]) and a 1x1 `up` ([out, r, 1, 1]), the LoCon layout.
Any adapter kind resizes (LoHa, LoKr, DoRA: their ΔW as merged at strength 1); the result is a plain LoRA.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import find_modules
from .mix import build_layers


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(up [out, r], down [r, in·k], r, relative Frobenius error) of the best rank-r approximation of `delta`
    ([out, in] or [out, in, kh, kw]). Exactly one of rank / energy (0 < energy ≤ 1)."""
    d = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    power = s.pow(2)
    total = power.sum()
    if energy is not None:
        kept = torch.cumsum(power, 0) / total.clamp_min(1e-30)
        r = int(torch.searchsorted(kept, torch.tensor(energy - 1e-7)).item()) + 1  # smallest r with kept ≥ energy
    else:
        r = rank
    r = max(1, min(r, s.numel()))
    err = math.sqrt(power[r:].sum().item() / max(total.item(), 1e-30)) if total > 0 else 0.0
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], r, err


def _to_tensors(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size, r: int) -> dict:
    if len(weight_shape) == 4:  # conv: kernel in down, 1x1 up
        up, down = up[:, :, None, None], down.reshape(r, *weight_shape[1:])
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(r))}


def _components(model) -> list[tuple[str, nn.Module]]:
    return [("unet", model.unet)] + [(f"text_encoders.{i}", te) for i, te in enumerate(model.text_encoders)]


@torch.no_grad()
def extract(base, tuned, rank: int | None = None, energy: float | None = None, conv_rank: int | None = None,
            conv_energy: float | None = None, min_diff: float = 1e-6) -> tuple[dict, list]:
    """A LoRA (minisd names, {"<path>.<suffix>": tensor}) approximating `tuned` − `base` (two StableDiffusion models
    of one architecture) in every Linear / Conv2d of the UNet and text encoders. 3x3 convs use conv_rank /
    conv_energy (both None: left out). Layers whose largest |D| ≤ min_diff are left out (unchanged by tuning).
    Returns (state dict, [(path, rank, relative error)])."""
    out, report = {}, []
    for prefix, comp in _components(base):
        other = tuned.get_submodule(prefix)
        for name in find_modules(comp):
            b, t = comp.get_submodule(name), other.get_submodule(name)
            if b.weight.shape != t.weight.shape:
                raise ValueError(f"{prefix}.{name}: shapes {tuple(b.weight.shape)} and {tuple(t.weight.shape)} "
                                 "differ: not the same architecture")
            big_conv = isinstance(b, nn.Conv2d) and b.kernel_size != (1, 1)
            r, e = (conv_rank, conv_energy) if big_conv else (rank, energy)
            diff = t.weight.float() - b.weight.float()
            if (r is None and e is None) or diff.abs().max() <= min_diff:
                continue
            up, down, r, err = low_rank(diff, r, e)
            for k, v in _to_tensors(up, down, b.weight.shape, r).items():
                out[f"{prefix}.{name}.{k}"] = v
            report.append((f"{prefix}.{name}", r, err))
    return out, report


@torch.no_grad()
def resize(model, modules: dict, ranks: dict, rank: int | None = None, energy: float | None = None
           ) -> tuple[dict, list]:
    """An adapter ({path: {suffix: tensor}}, as read by formats.lora_read) re-expressed as a LoRA of rank `rank`
    (or the rank keeping `energy`) per layer, for `model`'s shapes. Returns (state dict, [(path, rank, rel. error)])
    where the error is measured against the adapter's own ΔW."""
    out, report = {}, []
    for path, layer in build_layers(model, modules, ranks, 1.0, "adapter").items():
        delta = layer.weight_delta()  # DoRA: what merging at strength 1 adds
        up, down, r, err = low_rank(delta, rank, energy)
        for k, v in _to_tensors(up, down, layer.weight.shape, r).items():
            out[f"{path}.{k}"] = v
        report.append((path, r, err))
    return out, report


def format_report(report: list, limit: int = 0) -> str:
    """One line per layer: rank and relative error, and a summary line."""
    lines = [f"  {path}: rank {r}, relative error {err:.4f}" for path, r, err in report]
    if limit and len(lines) > limit:
        lines = lines[:limit] + [f"  ... {len(report) - limit} more layers"]
    if report:
        errs = [e for _, _, e in report]
        lines.append(f"{len(report)} layers, ranks {min(r for _, r, _ in report)}-{max(r for _, r, _ in report)}, "
                     f"relative error mean {sum(errs) / len(errs):.4f} max {max(errs):.4f}")
    return "\n".join(lines)
