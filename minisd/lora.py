"""LoRA and DoRA adapter layers for nn.Linear and nn.Conv2d, plus the base class of every adapter.

LoRA (Hu et al. 2021, Eq. 3):   y = W x + b + m · (α/r) · B A x          A = lora_down [r, in], B = lora_up [out, r]
DoRA (Liu et al. 2024, Eq. 5):  W' = g ⊙ (W + m (α/r) B A),  g = dora_scale / ‖W + m (α/r) B A‖_row  (per out channel)

m is the user multiplier (`set_scale`, "LoRA strength"); α/r is the training scale (kohya and PEFT, `use_rslora` off).
DoRA's strength is PEFT's (and so diffusers' `fuse_lora(lora_scale=m)` / `set_adapters`): m scales the direction
update B A inside the norm and the magnitude stays whole, so m = 0 gives dora_scale ⊙ W / ‖W‖, not W. ComfyUI and
A1111 blend instead, W + m (W'(1) − W); the two agree at m = 1 only (README, "DoRA at strength λ").

An adapted layer *is* the base layer: `LoRALinear` subclasses nn.Linear and holds the very same `weight`/`bias`
Parameters, so the module path and the base keys do not change and the adapter tensors sit beside them, named in the
kohya spirit (export is then a name map):

    <path>.weight  <path>.bias                       the frozen base layer, unchanged
    <path>.lora_down.weight  <path>.lora_up.weight   A and B (conv: down has the base kernel, up is 1x1)
    <path>.alpha                                     0-dim buffer; scale = alpha / rank; alpha 0 or None means rank
    <path>.dora_scale                                DoRA magnitude, [out, 1] (conv [out, 1, 1, 1]) as in LyCORIS

Regularisers, all active only in training mode:
    dropout         nn.Dropout on the adapter's input x (PEFT's `lora_dropout`; kohya drops the down output instead)
    rank_dropout    zero whole rank channels of A x, one mask per sample, rescaled by 1/(1-p) (kohya)
    module_dropout  skip the whole adapter for this forward call with probability p (kohya, LyCORIS)

Memory: the LoRA path is x -> down -> up, the r-channel intermediate only; ΔW = B A is built only to merge.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterLayer:
    """Behaviour shared by every adapter layer (LoRA, DoRA, LoHa, LoKr); mixed into an nn.Linear/nn.Conv2d subclass.

    A subclass implements `delta_weight()` (the scaled ΔW, multiplier excluded) and `delta_forward(x, y)` (the adapter's
    contribution to the output given the base output y = W x + b). Everything else is here: multiplier, module dropout,
    merge/unmerge, the base-layer view. Adapter tensors are every state-dict entry except `weight` and `bias`.
    """
    kind = "adapter"

    def _adopt(self, base: nn.Module, multiplier: float, module_dropout: float, rank_dropout: float) -> None:
        """Share the base layer's Parameters (no copy) and set the common options."""
        self.weight = base.weight
        self.bias = base.bias
        self.multiplier = float(multiplier)
        self.module_dropout = float(module_dropout)
        self.rank_dropout = float(rank_dropout)
        self.merged = False

    # --- the base layer as a function ---------------------------------------------------------
    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's op with another weight and no bias (conv keeps stride, padding, dilation, groups)."""
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, weight, None)
        return F.linear(x, weight)

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """Shape a per-output-channel vector to broadcast over the output: [out] (Linear) or [out, 1, 1] (conv)."""
        return v.reshape(-1, 1, 1) if isinstance(self, nn.Conv2d) else v.reshape(-1)

    def to_base(self) -> nn.Module:
        """A plain nn.Linear / nn.Conv2d holding the same weight and bias Parameters (the adapter dropped)."""
        if isinstance(self, nn.Conv2d):
            base = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        else:
            base = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        base.weight, base.bias = self.weight, self.bias
        return base

    # --- forward ----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the adapter changes the output at the current multiplier (DoRA overrides: it does even at 0)."""
        return self.multiplier != 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # the untouched base layer: W x + b
        if self.merged or not self.active:
            return y
        # module dropout: skip the adapter for this whole call (kohya / LyCORIS regulariser)
        if self.training and self.module_dropout > 0.0 and torch.rand(()).item() < self.module_dropout:
            return y
        return y + self.strength_forward(x, y).to(y.dtype)

    def delta_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def strength_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution at the current multiplier m: m · Δ(x) (DoRA overrides: m acts inside its norm)."""
        delta = self.delta_forward(x, y)
        return delta if self.multiplier == 1.0 else delta * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        """ΔW with the training scale (α/r) applied and the multiplier not, shaped like `weight`."""
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        """What merging adds to `weight`: multiplier · ΔW (DoRA overrides: it rescales W itself)."""
        return self.multiplier * self.delta_weight()

    # --- merge / unmerge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` in place (inference speed; do not train while merged)."""
        if not self.merged:
            self.weight.add_(self.weight_delta().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`; restores the original weight up to fp32 round-off (the adapter must be unchanged since)."""
        if self.merged:
            self.weight.sub_(self.weight_delta().to(self.weight.dtype))
            self.merged = False

    def set_scale(self, multiplier: float) -> None:
        """Set the multiplier m ("strength"); a merged layer is re-merged with the new value."""
        was_merged = self.merged
        self.unmerge()
        self.multiplier = float(multiplier)
        if was_merged:
            self.merge()

    def adapter_state_dict(self) -> dict:
        """The adapter tensors of this layer (everything but the base `weight` and `bias`), not detached."""
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if k not in ("weight", "bias")}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.kind}, multiplier={self.multiplier}"


class LoRAMixin(AdapterLayer):
    """LoRA (and DoRA with `dora=True`) on top of a Linear or Conv2d; see the module docstring."""
    kind = "lora"

    def _init_lora(self, down: nn.Module, up: nn.Module, alpha, init: str, dropout: float, dora: bool) -> None:
        rank = down.weight.shape[0]
        self.rank = rank
        self.lora_down, self.lora_up = down, up
        # alpha 0 / None means alpha = rank (scale 1), the kohya convention
        self.register_buffer("alpha", torch.tensor(float(alpha or rank)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init == "gaussian":  # PEFT "gaussian": N(0, 1/r)
                nn.init.normal_(down.weight, std=1.0 / rank)
            elif init == "kaiming":  # PEFT default and kohya: nn.Linear's own init, kaiming_uniform(a=√5)
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            else:
                raise ValueError(f"unknown LoRA init {init!r} (use 'kaiming' or 'gaussian')")
            nn.init.zeros_(up.weight)  # B = 0: the adapted layer starts equal to the base
        self.dora = dora
        if dora:
            self.kind = "dora"
            # magnitude initialised to the row norm of W + ΔW (= ‖W‖_row since B = 0), shape [out, 1(, 1, 1)]
            norm = self.weight_norm()
            shape = (-1,) + (1,) * (self.weight.ndim - 1)
            self.dora_scale = nn.Parameter(norm.reshape(shape).to(down.weight.dtype))

    @property
    def scale(self) -> torch.Tensor:
        """α / r as a 0-dim tensor (no host sync, and a loaded `alpha` takes effect at once)."""
        return self.alpha / self.rank

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r) · B A x: x -> down -> (rank dropout) -> up, never materialising ΔW."""
        # fp32 adapters on bf16 activations: cast the input, unless autocast casts both to bf16 for the matmul anyway
        # (the cast would then only copy the activation twice)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        h = self.lora_down(x)
        scale = self.scale
        if self.training and self.rank_dropout > 0.0:
            # one keep-mask per sample over the r channels (dim -1 for Linear, dim 1 for conv)
            dim = 1 if isinstance(self, nn.Conv2d) else -1
            shape = [h.shape[0]] + [1] * (h.ndim - 1)
            shape[dim] = self.rank
            mask = torch.rand(shape, device=h.device) > self.rank_dropout
            h = h * mask.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected output: as if the rank were smaller
        return self.lora_up(h) * scale

    @property
    def active(self) -> bool:
        return self.dora or self.multiplier != 0.0

    def strength_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.delta_forward(x, y) if self.dora else super().strength_forward(x, y)

    def delta_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LoRA: (α/r) B A x at strength 1. DoRA: W'x − Wx at the current multiplier m (PEFT's strength)."""
        xd = self.dropout(x)
        if not self.dora:
            return self.lora_path(xd)
        # DoRA: W'x + b - (Wx + b) = (g - 1) W x + g m (α/r) B A x, the norm inside g detached (paper §4.3, PEFT)
        g = self.channel_view(self.dora_scale.flatten() / self.weight_norm())
        if self.training and isinstance(self.dropout, nn.Dropout):  # PEFT: the rescaled base term sees dropout too
            base = self.apply_weight(xd, self.weight)
        else:  # reuse the base output instead of a second W x
            base = y if self.bias is None else y - self.channel_view(self.bias)
        lora = self.lora_path(xd)
        return (g - 1) * base + g * (lora if self.multiplier == 1.0 else lora * self.multiplier)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row (s = m·α/r, m the multiplier), fp32, detached, without forming B A:

            ‖W_i + s (BA)_i‖² = ‖W_i‖² + 2s ⟨B_i, (W Aᵀ)_i⟩ + s² ⟨B_i, (B A Aᵀ)_i⟩,   i = output channel.
        Cost: one W Aᵀ product ([out, in] x [in, r]) and r x r terms; no gradient is needed since DoRA detaches it.
        In eval mode it is cached until W, A, B or alpha change (by their version counters, which in-place updates
        bump; writes through `.data` do not, hence no cache in training), so eval-mode DoRA costs about what LoRA does.
        """
        key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.lora_down.weight, self.lora_up.weight,
                                                        self.alpha)) + (self.multiplier,)
        cached = getattr(self, "_norm_cache", None)
        if not self.training and cached is not None and cached[0] == key:
            return cached[1]
        w = self.weight.flatten(1).float()
        a = self.lora_down.weight.flatten(1).float()  # [r, in·kh·kw]
        b = self.lora_up.weight.flatten(1).float()    # [out, r]
        s = self.scale.float() * self.multiplier
        cross = (b * (w @ a.T)).sum(1)
        quad = (b * (b @ (a @ a.T))).sum(1)
        sq = w.pow(2).sum(1) + 2 * s * cross + s * s * quad
        norm = sq.clamp_min(0).sqrt()
        self._norm_cache = (key, norm)
        return norm

    def delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        delta = up.flatten(1) @ down.flatten(1)  # [out, r] x [r, in·kh·kw]; up is 1x1 for conv
        return (delta * self.scale).reshape(self.weight.shape)

    def weight_delta(self) -> torch.Tensor:
        if not self.dora:
            return self.multiplier * self.delta_weight()
        # DoRA merged weight g ⊙ (W + m ΔW), g = dora_scale / ‖W + m ΔW‖ (PEFT's strength, see the module docstring)
        w = self.weight.float()
        g = self.dora_scale.float() / self.weight_norm().reshape(self.dora_scale.shape)
        return g * (w + self.multiplier * self.delta_weight().float()) - w

    @torch.no_grad()
    def merge(self) -> None:
        if self.dora and not self.merged:
            # keep g: unmerging cannot recompute the norm from the merged weight
            self._merged_g = self.dora_scale.float() / self.weight_norm().reshape(self.dora_scale.shape)
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not (self.dora and self.merged):
            return super().unmerge()
        # W' = g (W + m ΔW)  =>  W = W' / g - m ΔW
        m, g = self.multiplier, self._merged_g
        w = self.weight.float() / g - m * self.delta_weight().float()
        self.weight.copy_(w.to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={float(self.alpha):g}"


class LoRALinear(LoRAMixin, nn.Linear):
    """nn.Linear + LoRA/DoRA. down: Linear(in, r), up: Linear(r, out), both bias-free; adapter params in `dtype`
    (fp32 by default, so AMP can unscale their gradients even when the base is fp16/bf16)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None, *, init: str = "kaiming",
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False,
                 multiplier: float = 1.0, dtype: torch.dtype = torch.float32):
        # build on the meta device (allocates nothing), then share the real weight/bias
        nn.Linear.__init__(self, base.in_features, base.out_features, base.bias is not None, device="meta")
        self._adopt(base, multiplier, module_dropout, rank_dropout)
        dev = base.weight.device
        down = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dtype)
        up = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dtype)
        self._init_lora(down, up, alpha, init, dropout, dora)


class LoRAConv2d(LoRAMixin, nn.Conv2d):
    """nn.Conv2d + LoRA/DoRA ("LoCon"). down: Conv2d(in, r) with the base kernel/stride/padding/dilation,
    up: 1x1 Conv2d(r, out); the layout kohya, PEFT and ComfyUI use."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha: float | None = None, *, init: str = "kaiming",
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False,
                 multiplier: float = 1.0, dtype: torch.dtype = torch.float32):
        if base.groups != 1:
            raise NotImplementedError("LoRA on grouped convolutions is not supported")
        nn.Conv2d.__init__(self, base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                           base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        self._adopt(base, multiplier, module_dropout, rank_dropout)
        dev = base.weight.device
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                         bias=False, padding_mode=base.padding_mode, device=dev, dtype=dtype)
        up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=dev, dtype=dtype)
        self._init_lora(down, up, alpha, init, dropout, dora)


def lora_from_tensors(base: nn.Module, tensors: dict) -> LoRAMixin:
    """An empty LoRA/DoRA layer around `base` shaped like the adapter tensors `tensors` (suffix -> tensor, e.g. read
    from a file); the caller loads them. Rank from lora_down, DoRA if `dora_scale` is present."""
    down = tensors["lora_down.weight"]
    cls = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
    return cls(base, down.shape[0], dora="dora_scale" in tensors, dtype=down.dtype)
