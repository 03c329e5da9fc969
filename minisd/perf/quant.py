"""A quantized frozen base (--base-dtype int8 | fp8): the QLoRA idea, written out.

Adapters train beside a frozen base whose weights are only ever read. Stored in 8 bits instead of bf16 they take
half the memory; each forward dequantises the weight it needs, uses it, and lets it go. What changes: the base
weights are rounded once (an approximation, bounded below); the adapters, their gradients and the optimizer are
untouched, and the adapter file is the same as over an unquantized base.

Per output channel o (a row of a Linear's [out, in] weight, a filter of a Conv's [out, in, kh, kw] one):

    int8 (absmax, symmetric):  s_o = max_i |W_oi| / 127,  q_oi = round(W_oi / s_o) ∈ [−127, 127],  Ŵ_oi = s_o · q_oi
                               so |W_oi − Ŵ_oi| ≤ s_o / 2
    fp8 e4m3 (OCP float8):     s_o = max_i |W_oi| / 448,   q_oi = fp8(W_oi / s_o),                 Ŵ_oi = s_o · q_oi
                               3 mantissa bits: |W_oi − Ŵ_oi| ≤ 2⁻⁴·|W_oi| (normal), 2⁻¹⁰·s_o (subnormal)

Bytes: 1 per weight + 4 per output channel (the fp32 scale), against 2 per weight in bf16: about half.

Which layers: every nn.Linear / nn.Conv2d of the given modules (the UNet, the text encoders) except the adapters'
own (lora_down / lora_up: trainable, not frozen). Embeddings and norms stay as they are (small). An adapter layer
keeps its class, so its forward is unchanged: the quantized class is slotted *under* it, between the adapter mixin
and nn.Linear / nn.Conv2d, so the adapter's `super().forward(x)` - the base layer's W x + b - is the dequantising one.
`layer.weight` stays readable (a property dequantising on access: DoRA's norm, LoKr's shapes, merging).

Memory in training. `F.linear(x, W)` saves W for its backward (to compute ∂L/∂x = ∂L/∂y · W); saving the
dequantised W would keep a bf16 copy of every weight alive until the backward, which is what the quantization is
meant to avoid. `_QuantOp` saves the 8-bit weight and dequantises again in the backward (bitsandbytes' and QLoRA's
way). The base weights get no gradient: they are frozen.

Speed. Dequantising is pure memory traffic, paid three times per layer and step with gradient checkpointing (the
forward, the recompute, `_QuantOp.backward`). Written as three PyTorch ops, (q.float() * s).to(bf16), it is three
kernels and ~19 bytes moved per weight value (read 1 + write 4, read 4 + write 4, read 4 + write 2). Measured on one
H100 (SDXL LoRA 1024 px, bs1, checkpointing, int8 UNet + text encoders, eager; torch.profiler): 258.7 ms of GPU
kernels per step, up to 95.5 ms of it these three (the fp32 multiply 28.7 ms in 2464 launches, one per
dequantisation; the int8 -> fp32 copy 42.5 ms in 6045 and the bf16 cast 24.3 ms in 7043, kernels that other casts
of the step use too), at 631.9 ms/step. `dequantize_weight` now takes one of three paths, all giving
the eager bits (its docstring): on CUDA with Triton, torch.compile of the same three ops, one kernel that reads the
code (1 byte) and the row's scale and writes bf16 (2 bytes), the product in fp32 in registers, rounded as
before; eagerly (CPU, `compile_dequant = False`) int8 as one op (one kernel on CUDA, the CPU makes the temporaries
itself) and fp8 as two. Prediction, to be measured on the next GPU run: those ~95 ms of GPU time per step fall to
~15 ms (3 bytes instead of ~19 per value and pass); an eager step is bound by the CPU's launches (631.9 ms of wall
time for 258.7 ms of GPU work), and one compiled call costs about what three eager launches cost on the host
(Dynamo's guards, Inductor's wrapper), so the wall-time gain shows in full under --cuda-graph. The first step
compiles 6 small graphs (see `_compiled`; some seconds each). On the CPU compiled is faster for large weights but
slower per small call, and needs a C++ compiler and a compile per graph (6.6 s for the first on the 2-core VM), so
the CPU stays eager (1 thread, median of 20, two runs on the loaded 2-core VM, eager path / compiled, -> bf16: int8
1280x1280 2.2-4.9 / 0.35-0.38 ms, 320x320x3x3 0.85-0.89 / 0.24-0.34 ms, 64x32 0.011-0.018 / 0.041-0.057 ms; fp8
10.7-11.5 / 0.88-1.05 ms, 5.6-6.6 / 0.46-0.65 ms, 0.023-0.034 / 0.041-0.10 ms).

CUDA graphs (train.py --cuda-graph) combine with --base-dtype (config.py refuses neither with the other): the
compiled kernels are launched on the current stream from host code that does not synchronise, so they record like
any kernel. What must not happen during a recording is a compile (Inductor benchmarks its kernel configurations at
their first launch, which synchronises). `StepGraph` runs two eager warm-up steps first, which see every layer's
forward, recompute and backward, hence every graph above, and sizes are symbolic, so nothing compiles later
(tests/test_quant_fused.py: the second step compiles nothing). With train.py --compile the blocks' own graphs trace
`dequantize_plain` as written and fuse it with their neighbours.

Shapes: out = output channels (features), in = input channels; a Conv2d weight is [out, in, kh, kw].
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora import AdapterLayer

FP8 = getattr(torch, "float8_e4m3fn", None)  # OCP e4m3, max 448; torch >= 2.1, storage on any device
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest magnitude each code holds


def quantize_weight(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in int8 / float8_e4m3fn shaped like w, fp32 scale per output channel [out]) - the equations above."""
    w = w.detach().float()
    amax = w.flatten(1).abs().amax(1)                                              # (out,)
    scale = torch.where(amax > 0, amax / QMAX[kind], torch.ones_like(amax))      # an all-zero row: any scale
    ws = w / scale.view(-1, *[1] * (w.ndim - 1))
    if kind == "int8":
        return ws.round().clamp(-127, 127).to(torch.int8), scale
    if FP8 is None:
        raise ValueError("--base-dtype fp8 needs torch.float8_e4m3fn (torch >= 2.1)")
    return ws.clamp(-448, 448).to(FP8), scale


def dequantize_plain(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = s_o · q_o: the product rounded to fp32, then to `dtype`. The function torch.compile fuses into one kernel
    (eagerly three kernels: see Speed)."""
    return (q.float() * scale.view(-1, *[1] * (q.ndim - 1))).to(dtype)


# Speed switch (see the docstring): None = compiled on CUDA when Triton is there, eager elsewhere; True = compiled
# everywhere (on the CPU Inductor's C++ backend: the tests force it so); False = eager everywhere.
compile_dequant: bool | None = None
_COMPILED: list = []  # the compiled dequantize_plain, made at first use (one per process; its graphs are shared)


def _compiled():
    if not _COMPILED:
        # dynamic=True: sizes are symbols from the first call on, so one graph serves every shape of one rank;
        # fullgraph: a graph break would silently split the fusion. Graphs: one per (rank, code dtype, target
        # dtype, autocast on / off), and Dynamo fixes sizes of 1, so a 1x1 conv's [out, in, 1, 1] is one more:
        # 6 in a bf16 training run (Linear, 3x3 conv, 1x1 conv; autocast on in the forward and the recompute, off
        # in the backward: counted in tests/test_quant_fused.py), 12 for int8 + fp8 x bf16 + fp32 outside autocast.
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        _COMPILED.append(torch.compile(dequantize_plain, fullgraph=True, dynamic=True))
    return _COMPILED[0]


@functools.cache
def triton_available() -> bool:
    """Inductor's CUDA backend writes Triton kernels: no Triton, no compiled path. The same rule as
    minisd/train/adamw8bit.py's `_triton_available`, whose four lines this copies: perf/ may import only chapters
    (tests/test_layout.py), not train/ nor another perf/ module, so there is no shared place both can import."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def _use_compiled(q: torch.Tensor) -> bool:
    if compile_dequant is not None:
        return compile_dequant
    if not q.is_cuda or not triton_available():
        return False
    # Triton converts float8_e4m3fn in hardware from sm_89 (Ada / Hopper) on; older GPUs keep the eager path
    return q.dtype != FP8 or _capability(q.device.index) >= (8, 9)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = s_o · q_o in `dtype` (the product rounded to fp32, then to dtype), shaped like q. Every path gives the
    same bits:
    - compiled (CUDA + Triton; `compile_dequant`): `dequantize_plain` as one kernel;
    - inside an outer torch.compile (train.py --compile compiles whole blocks): `dequantize_plain` as written,
      which that graph's Inductor fuses with its neighbours;
    - eager: int8 as one op, torch.mul(q, s) into a `dtype` tensor: the codes promote to fp32 inside the op
      (exact: |q| <= 127), the product is rounded to fp32 and then to dtype at the store. On CUDA that is one kernel (TensorIterator
      loads int8 and stores bf16 by dynamic casting; predicted, not yet profiled); on the CPU TensorIterator makes
      the fp32 temporaries itself: fewer allocations, not fewer passes. torch has no type promotion for fp8, so
      its codes are cast first (q.float(): two ops). No cheaper exact form exists: casting the codes to bf16 is
      exact (int8 and e4m3 fit bf16's 8-bit significand), but s_o rounded to bf16 and the product rounded in bf16
      is another number (tests/test_quant_fused.py finds entries where it differs)."""
    if torch.compiler.is_compiling():
        return dequantize_plain(q, scale, dtype)
    if _use_compiled(q):
        return _compiled()(q, scale, dtype)
    w = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(q if q.dtype == torch.int8 else q.float(), scale.view(-1, *[1] * (q.ndim - 1)), out=w)


class _QuantOp(torch.autograd.Function):
    """y = op(x, Ŵ) + b for op = linear / conv2d, saving the 8-bit codes (not Ŵ) for the backward, which needs
    only ∂L/∂x (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, layer):
        w = layer.weight  # dequantised (the property below), in the layer's dtype
        ctx.save_for_backward(q, scale)
        ctx.layer, ctx.x_shape, ctx.x_dtype = layer, x.shape, x.dtype
        # under autocast F.linear / F.conv2d cast x and Ŵ to the autocast dtype themselves
        ctx.compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        return layer.base_op(x, w, bias)

    @staticmethod
    def backward(ctx, gy):
        q, scale = ctx.saved_tensors
        layer = ctx.layer
        dtype = ctx.compute or layer.dequant_dtype
        w = dequantize_weight(q, scale, dtype)  # again: Ŵ lives only inside this function
        gy = gy.to(dtype)
        if isinstance(layer, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, gy, layer.stride, layer.padding, layer.dilation,
                                            layer.groups)
        else:
            gx = gy @ w                                                            # (..., out) @ (out, in)
        return gx.to(ctx.x_dtype), None, None, None, None


class QuantizedBase:
    """Mixed in under nn.Linear / nn.Conv2d (or under an adapter layer's class): the weight as 8-bit codes
    `weight_q` and per-channel fp32 scales `weight_scale` (buffers), dequantised in forward."""
    quant_kind = "int8"

    @property
    def weight(self) -> torch.Tensor:
        """Ŵ in the dtype the weight had (a new tensor each access: write to it and nothing changes)."""
        return dequantize_weight(self.weight_q, self.weight_scale, self.dequant_dtype)

    def base_op(self, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
        if isinstance(self, nn.Conv2d):
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantOp.apply(x, self.weight_q, self.weight_scale, self.bias, self)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the codes and scales; `.to(dtype)` / `.half()` (a pipeline casting the UNet) must not
        turn fp8 codes or fp32 scales into that dtype: it sets the dtype Ŵ is dequantised to instead."""
        codes = {k: self._buffers.pop(k) for k in ("weight_q", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.zeros((), dtype=self.dequant_dtype, device=codes["weight_q"].device))
            self.dequant_dtype = probe.dtype
            self._buffers.update({k: v.to(probe.device) for k, v in codes.items()})
        return self


_CLASSES: dict[type, type] = {}


def quantized_class(cls: type) -> type:
    """cls with `QuantizedBase` placed right above nn.Linear / nn.Conv2d in its method order (one class per cls)."""
    if cls not in _CLASSES:
        plain = nn.Conv2d if issubclass(cls, nn.Conv2d) else nn.Linear
        # class QLinear(QuantizedBase, nn.Linear); then class Q<cls>(cls, QLinear): Python's method order puts
        # QLinear after every class of cls that derives from nn.Linear, i.e. under the adapter mixin
        q_plain = type(f"Quantized{plain.__name__}", (QuantizedBase, plain), {})
        if cls is plain:
            _CLASSES[cls] = q_plain
        else:  # an adapter layer: its adapter tensors are its state minus the base's, codes and scales included
            def adapter_state_dict(self) -> dict:
                return {k: v for k, v in cls.adapter_state_dict(self).items() if k not in ("weight_q", "weight_scale")}
            _CLASSES[cls] = type(f"Quantized{cls.__name__}", (cls, q_plain), {"adapter_state_dict": adapter_state_dict})
    return _CLASSES[cls]


@torch.no_grad()
def quantize_module(layer: nn.Module, kind: str) -> None:
    """Turn one Linear / Conv2d (plain or adapted) into its quantized class in place; frees the weight."""
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        raise ValueError(f"--base-dtype {kind}: conv padding mode {layer.padding_mode!r} is not supported")
    w = layer.weight
    q, scale = quantize_weight(w, kind)
    del layer._parameters["weight"]  # the Parameter goes: the property above answers `layer.weight` now
    layer.__class__ = quantized_class(type(layer))
    layer.register_buffer("weight_q", q.to(w.device))
    layer.register_buffer("weight_scale", scale.to(w.device))
    layer.dequant_dtype, layer.quant_kind = w.dtype, kind


def quantize_frozen(model: nn.Module, kind: str) -> list[str]:
    """Quantize every frozen Linear / Conv2d of `model` (not the adapters' own layers); returns their paths."""
    if kind not in QMAX:
        raise ValueError(f"quantization kind must be one of {', '.join(QMAX)}, not {kind!r}")
    inside_adapter = [name + "." for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    done = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, QuantizedBase):
            continue
        if any(name.startswith(p) for p in inside_adapter):  # lora_down / lora_up: trainable
            continue
        quantize_module(m, kind)
        done.append(name)
    return done


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear / Conv2d base weights as stored (codes + scales when quantized), adapters excluded."""
    inside_adapter = [name + "." for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or any(name.startswith(p) for p in inside_adapter):
            continue
        if isinstance(m, QuantizedBase):
            total += m.weight_q.nbytes + m.weight_scale.nbytes
        else:
            total += m.weight.nbytes
    return total
