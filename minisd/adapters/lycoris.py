"""LoHa and LoKr adapter layers (the LyCORIS family) for nn.Linear and nn.Conv2d.

LoHa (Hyeon-Woo et al. 2022, FedPara Eq. 2; LyCORIS "LoHa"): a Hadamard product of two rank-r products, rank up to r²
with the parameters of two rank-r LoRAs:

    ΔW = (α/r) · (W1a W1b) ⊙ (W2a W2b)          W1a, W2a: [out, r]   W1b, W2b: [r, in·kh·kw]

LoKr (LyCORIS "LoKr", Yeh et al. 2024): a Kronecker product of a small and a large factor, out = l·k, in = m·n:

    ΔW = (α/r) · W1 ⊗ W2                        W1: [l, m] (or W1a W1b, rank r)   W2: [k, n(, kh, kw)] (or W2a W2b)

Parameterisation, initialisation and scale follow PEFT's LoHaConfig / LoKrConfig (scale = α/r in both; LoKr: factor pairs
from `factorization(dim, factor)`, W2 is factored into W2a W2b when r < max(k, n)/2, W1 only with `decompose_both`).
Conv layers use the flattened layout (PEFT's default `use_effective_conv2d=False`; the Tucker `t1/t2` form is not
implemented). Tensor names are the LyCORIS / kohya ones: `hada_w1_a hada_w1_b hada_w2_a hada_w2_b`,
`lokr_w1 | lokr_w1_a lokr_w1_b`, `lokr_w2 | lokr_w2_a lokr_w2_b`, plus the `alpha` buffer.

Regularisers (training mode only): `rank_dropout` zeroes output rows of ΔW, one mask per call, rescaled by 1/mean(mask)
(PEFT LoHa); `module_dropout` skips the adapter for a call with probability p.

Memory: LoHa's ΔW is materialised (a Hadamard product has no cheap factored apply), but its backward recomputes the two
products instead of saving them (`HadamardProduct`). LoKr on a Linear never forms ΔW: (W1 ⊗ W2) x = vec(W1 X W2ᵀ).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..lora import AdapterLayer


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init, kaiming_uniform(a=√5), the LyCORIS/PEFT choice for the non-zero factors."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class HadamardProduct(torch.autograd.Function):
    """(A1 B1) ⊙ (A2 B2) whose backward recomputes the two [out, in] products instead of keeping them:
    d/dA1 = (G ⊙ P2) B1ᵀ, d/dB1 = A1ᵀ (G ⊙ P2), and symmetrically, with P_i = A_i B_i."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2):
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        g1 = grad * (a2 @ b2)  # gradient w.r.t. P1
        g2 = grad * (a1 @ b1)  # gradient w.r.t. P2
        return g1 @ b1.T, a1.T @ g1, g2 @ b2.T, a2.T @ g2


class LycorisMixin(AdapterLayer):
    """Shared by LoHa and LoKr: alpha buffer, rank dropout on output rows, forward through a materialised ΔW."""

    def _init_common(self, rank: int, alpha) -> None:
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha or rank)))

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha / self.rank

    def _flat_shape(self) -> tuple:
        """(out, in·kh·kw) of the base weight (in already divided by groups)."""
        return self.weight.shape[0], self.weight[0].numel()

    def row_mask(self, device) -> torch.Tensor | None:
        """Rank dropout over output channels, rescaled by 1/mean (None when inactive)."""
        if not (self.training and self.rank_dropout > 0.0):
            return None
        keep = (torch.rand(self.weight.shape[0], device=device) > self.rank_dropout).float()
        return keep / keep.mean().clamp_min(1e-12)

    def delta_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dw = self.delta_weight()
        out = self.apply_weight(x.to(dw.dtype), dw)
        mask = self.row_mask(out.device)
        return out if mask is None else out * self.channel_view(mask).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={float(self.alpha):g}"


# ----------------------------------------------------------------------------------------------------------- LoHa
class LoHaMixin(LycorisMixin):
    kind = "loha"

    def _init_loha(self, base: nn.Module, rank: int, alpha, init: bool, dtype) -> None:
        self._init_common(rank, alpha)
        out, fan_in = self._flat_shape()
        kw = dict(device=base.weight.device, dtype=dtype)
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(out, rank, **kw)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(rank, fan_in, **kw)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(out, rank, **kw)))
        # PEFT init: W2b = 0 so ΔW = 0 at the start; init=False gives a random (non-zero) adapter
        self.hada_w2_b = nn.Parameter(kaiming_(torch.empty(rank, fan_in, **kw)) if not init
                                      else torch.zeros(rank, fan_in, **kw))

    def delta_weight(self) -> torch.Tensor:
        prod = HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        return (prod * self.scale).reshape(self.weight.shape)


class LoHaLinear(LoHaMixin, nn.Linear):
    """nn.Linear + LoHa (PEFT `LoHaConfig(r=rank, alpha=alpha)`)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None, *, init: bool = True,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, multiplier: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        nn.Linear.__init__(self, base.in_features, base.out_features, base.bias is not None, device="meta")
        self._adopt(base, multiplier, module_dropout, rank_dropout)
        self._init_loha(base, rank, alpha, init, dtype)


class LoHaConv2d(LoHaMixin, nn.Conv2d):
    """nn.Conv2d + LoHa, flattened [out, in·kh·kw] layout."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha: float | None = None, *, init: bool = True,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, multiplier: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        nn.Conv2d.__init__(self, base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                           base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        self._adopt(base, multiplier, module_dropout, rank_dropout)
        self._init_loha(base, rank, alpha, init, dtype)


# ----------------------------------------------------------------------------------------------------------- LoKr
def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split dim = a·b with a ≤ b, the LyCORIS rule (lycoris/functional/general.py), which is what the tools reading
    the file rebuild (LyCORIS' loader recomputes the shapes from it and refuses others). factor > 0 dividing dim gives
    (factor, dim/factor) ordered small first: 768 with factor 32 is (24, 32). PEFT keeps the order (32, 24); a file
    with that layout loads in PEFT-like readers only. Otherwise the divisor pair closest to √dim, with a ≤ factor
    when factor > 0 (factor = -1: no bound)."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    bound = dim if factor == -1 else factor
    a = 1
    for cand in range(2, math.isqrt(dim) + 1):  # the largest divisor ≤ √dim that respects the bound
        if cand > bound:
            break
        if dim % cand == 0:
            a = cand
    return a, dim // a


class LoKrMixin(LycorisMixin):
    kind = "lokr"

    def _init_lokr(self, base: nn.Module, rank: int, alpha, factor: int, decompose_both: bool, init,
                   dtype, layout: tuple | None) -> None:
        self._init_common(rank, alpha)
        out, fan_in = self.weight.shape[0], self.weight.shape[1]
        ksize = tuple(self.weight.shape[2:])  # () for Linear, (kh, kw) for conv
        if layout is None:
            (l, k), (m, n) = factorization(out, factor), factorization(fan_in, factor)
            use_w1 = not (decompose_both and rank < max(l, m) / 2)
            use_w2 = not (rank < max(k, n) / 2)
        else:  # shapes dictated by existing tensors (see lokr_from_tensors)
            l, m, k, n, use_w1, use_w2 = layout
        self.factors = (l, m, k, n)
        kw = dict(device=base.weight.device, dtype=dtype)
        # init True (PEFT default): W1 (or W1a) = 0, the rest kaiming; "lycoris": W2 (or W2b) = 0, the rest kaiming;
        # False: everything random (non-zero), for tests
        zero1, zero2 = init is True, init == "lycoris"
        if use_w1:
            self.lokr_w1 = nn.Parameter(torch.zeros(l, m, **kw) if zero1 else kaiming_(torch.empty(l, m, **kw)))
        else:
            self.lokr_w1_a = nn.Parameter(torch.zeros(l, rank, **kw) if zero1 else kaiming_(torch.empty(l, rank, **kw)))
            self.lokr_w1_b = nn.Parameter(kaiming_(torch.empty(rank, m, **kw)))
        if use_w2:
            w2 = torch.empty(k, n, *ksize, **kw)
            self.lokr_w2 = nn.Parameter(torch.zeros_like(w2) if zero2 else kaiming_(w2))
        else:
            w2b = torch.empty(rank, n * math.prod(ksize), **kw)
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(k, rank, **kw)))
            self.lokr_w2_b = nn.Parameter(torch.zeros_like(w2b) if zero2 else kaiming_(w2b))

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        """The large factor as [k, n·kh·kw]."""
        return self.lokr_w2.flatten(1) if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self) -> torch.Tensor:
        # kron([l, m], [k, n·kh·kw]) = [l·k, m·n·kh·kw]; input index = j·n + q, so a plain reshape gives [out, in, kh, kw]
        return (torch.kron(self.w1(), self.w2()) * self.scale).reshape(self.weight.shape)


class LoKrLinear(LoKrMixin, nn.Linear):
    """nn.Linear + LoKr (PEFT `LoKrConfig(r=rank, alpha=alpha, decompose_factor=factor, decompose_both=...)`)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None, *, factor: int = -1,
                 decompose_both: bool = False, init: bool | str = True, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, multiplier: float = 1.0, dtype: torch.dtype = torch.float32,
                 layout: tuple | None = None):
        nn.Linear.__init__(self, base.in_features, base.out_features, base.bias is not None, device="meta")
        self._adopt(base, multiplier, module_dropout, rank_dropout)
        self._init_lokr(base, rank, alpha, factor, decompose_both, init, dtype, layout)

    def delta_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # (W1 ⊗ W2) x = vec(W1 X W2ᵀ) with X = x viewed as [m, n]: no [out, in] matrix is ever built
        l, m, k, n = self.factors
        w1, w2 = self.w1(), self.w2()
        xm = x.to(w1.dtype).reshape(*x.shape[:-1], m, n)
        out = torch.einsum("lm,...mn,kn->...lk", w1, xm, w2).reshape(*x.shape[:-1], l * k) * self.scale
        mask = self.row_mask(out.device)
        return out if mask is None else out * mask.to(out.dtype)


class LoKrConv2d(LoKrMixin, nn.Conv2d):
    """nn.Conv2d + LoKr; W2 keeps the kernel ([k, n, kh, kw]) when full, else W2a [k, r] W2b [r, n·kh·kw]."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha: float | None = None, *, factor: int = -1,
                 decompose_both: bool = False, init: bool | str = True, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, multiplier: float = 1.0, dtype: torch.dtype = torch.float32,
                 layout: tuple | None = None):
        nn.Conv2d.__init__(self, base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                           base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        self._adopt(base, multiplier, module_dropout, rank_dropout)
        self._init_lokr(base, rank, alpha, factor, decompose_both, init, dtype, layout)


# --------------------------------------------------------------------------------------- built from tensors
def loha_from_tensors(base: nn.Module, tensors: dict) -> LoHaMixin:
    """An empty LoHa layer around `base` shaped like `tensors` (suffix -> tensor); the caller loads them."""
    cls = LoHaConv2d if isinstance(base, nn.Conv2d) else LoHaLinear
    return cls(base, tensors["hada_w1_b"].shape[0], dtype=tensors["hada_w1_b"].dtype)


def lokr_from_tensors(base: nn.Module, tensors: dict, rank: float | None = None) -> LoKrMixin:
    """An empty LoKr layer around `base` shaped like `tensors`. With both factors full the tensors hold no rank:
    then `rank` is used if given (minisd files store it in their metadata), else rank = alpha (scale 1), which is
    how ComfyUI reads such files."""
    w1 = tensors.get("lokr_w1", tensors.get("lokr_w1_a"))
    w2 = tensors.get("lokr_w2", tensors.get("lokr_w2_a"))
    l, k = w1.shape[0], w2.shape[0]
    m = tensors["lokr_w1"].shape[1] if "lokr_w1" in tensors else tensors["lokr_w1_b"].shape[1]
    n = base.weight.shape[1] // m
    ranks = [tensors[s].shape[0] for s in ("lokr_w1_b", "lokr_w2_b") if s in tensors]
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if ranks:
        rank = ranks[0]
    elif rank is None:
        rank = alpha or 1.0  # full factors: the rank only enters the scale alpha / rank, here 1
    cls = LoKrConv2d if isinstance(base, nn.Conv2d) else LoKrLinear
    layout = (l, m, k, n, "lokr_w1" in tensors, "lokr_w2" in tensors)
    return cls(base, rank, alpha, dtype=w1.dtype, layout=layout)


def lokr_scale_is_portable(layer: LoKrMixin) -> bool:
    """False for a LoKr with both factors full and alpha ≠ rank: other tools read such files with scale 1."""
    full = hasattr(layer, "lokr_w1") and hasattr(layer, "lokr_w2")
    return not full or float(layer.alpha) == float(layer.rank)


def portable_tensors(layer) -> dict:
    """The adapter tensors of `layer` as a file should hold them (detached).

    A LoKr whose two factors are both full carries no rank in its tensors, so every reader (LyCORIS, ComfyUI, kohya,
    A1111) applies it with scale 1 whatever `alpha` says; with alpha ≠ rank the update would come out rank/alpha
    times off. The scale is therefore folded into the small factor, W1' = (α/r)·W1, and alpha written as the rank:
    every reader, minisd's included, then computes the same ΔW = W1' ⊗ W2. Other layers are returned unchanged."""
    sd = {k: v.detach() for k, v in layer.adapter_state_dict().items()}
    if isinstance(layer, LoKrMixin) and not lokr_scale_is_portable(layer):
        sd["lokr_w1"] = sd["lokr_w1"] * layer.scale.to(sd["lokr_w1"].dtype)
        sd["alpha"] = torch.tensor(float(layer.rank))
    return sd
