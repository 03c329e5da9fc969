"""AdamW with 8-bit optimizer state, in plain PyTorch (no bitsandbytes, no hand-written kernels, runs on any device;
on CUDA the update is fused into a few kernels by torch.compile, which changes only rounding order: see Speed).

AdamW (Loshchilov & Hutter 2019, Algorithm 2, with Adam's bias correction, Kingma & Ba 2015):

    θ ← θ (1 - lr·λ)                                      decoupled weight decay
    m ← β1 m + (1 - β1) g          v ← β2 v + (1 - β2) g²
    θ ← θ - lr · (m / (1 - β1ᵗ)) / (√(v / (1 - β2ᵗ)) + ε)

The update is computed in fp32 exactly like `torch.optim.AdamW`; only the *stored* m and v are 8-bit. Each is cut into
blocks of 256 values with one fp32 absmax per block (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"), and each value is stored as a code on a non-linear grid relative to its block's absmax a:

    m: int8 code c ∈ [-127, 127],  m̂ = a · sign(c) · (|c| / 127)²     square-law companding (fine steps near 0)
    v: uint8 code c ∈ [0, 255],    v̂ = a · (c / 255)⁴                 i.e. √v̂ = √a · (c/255)²: √v, the quantity that
                                                                     divides the step, is itself square-law coded
Why non-linear: with a linear grid, every v below a/510 in a block rounds to 0 and the step m / (√v + ε) explodes (in
our measurement below the parameters drift ~100 % away from fp32 AdamW). The power grids reach a·6e-5 (m) and
a·2e-10 (v) at a relative precision of ~1/c per code step. bitsandbytes uses a "dynamic tree" map (sign, decimal
exponent, linear fraction) for the same reason; the power law is simpler to write and tracked slightly better here.
A guard zeroes m wherever v̂ rounds to 0, so a stale m can never be divided by ε alone.

Measured tracking (tests/test_adamw8bit.py, 200 steps of a 3-layer MLP regression, lr 1e-3, λ 1e-2): relative parameter
error ‖θ_8bit - θ_fp32‖ / ‖θ_fp32 - θ_0‖ ≈ 0.02 (linear m + √-coded v: 0.031; a dynamic-tree map: 0.032; linear m and v:
1.01, diverged); final loss equal to 3 digits. The test asserts < 0.05.

Memory: 1 + 1 bytes per value + 2 · 4 / 256 bytes of scales = 2.03 bytes per parameter (fp32 AdamW: 8). Tensors with
fewer than `min_8bit_size` (4096) values keep fp32 state (biases, norms: negligible memory, and exact). The fused
path's chunk buffers add < 1 block of padding per tensor. Its temporaries during a step, one chunk at a time: the flat
θ and g in the parameters' dtype (2 · 4 · 2²⁵ bytes = 256 MB for fp32 at the default chunk_size), plus what the
compiled kernels keep between them (on the CPU one fp32 and one int8 buffer of the chunk's length, ~160 MB); never
a flat copy of the whole model. When the state is first created or re-packed (first step, after load_state_dict),
the per-tensor state and one chunk's buffers coexist for a moment: ~2 bytes per parameter + 64 MB.

Speed. Two code paths, one set of equations and one state layout (a state_dict moves freely between them):
- eager (the CPU, other devices, `fused=False`): the round trip dequantize → update → quantize as ~45 PyTorch ops per
  tensor, each a launch and a full pass over the tensor in memory (of the order of 400 bytes of traffic per
  parameter). Measured on one H100 (torch 2.11): 13.3 ms/step for 100.7M fp32 parameters in 6 tensors (torch AdamW:
  3.1 ms foreach, 1.1 ms fused), and 304 ms for the SD1.5 UNet parameter set (686 tensors, 860M parameters;
  bitsandbytes in that run: 80 ms).
- fused (the default for parameters on CUDA when Triton is installed, `fused=None`): the same update written as one
  function of flat tensors (`update_8bit`) and compiled by torch.compile, which fuses it into one to three kernels
  that read θ, g and the codes once and write them back. Per-call costs (Dynamo's guards, the launches, Python) are
  paid per *chunk*, not per tensor: the 8-bit tensors of a group with the same device, dtype and step are laid end
  to end in chunks of whole tensors of up to `chunk_size` = 2²⁵ values (`_Chunk`; SD1.5's 293 8-bit tensors make
  31 chunks), each tensor padded with zeros to a multiple of the block so that no block straddles two tensors: the
  blocks, hence the codes, are those of the per-tensor update. Per chunk and step: θ and g are gathered into two
  flat buffers (torch.cat), one compiled call updates the chunk, one foreach copy puts θ back. The codes and scales
  are never gathered: each chunk keeps them in four flat buffers, and every parameter's state entries are views into
  them, of one tensor's shapes. Traffic: ~40 bytes per parameter (the gather and the copy back double θ's and g's).
  The small fp32-state tensors of a group are updated together by torch._foreach_* ops, ~10 launches for all of
  them. What changes between steps (lr from a schedule, the bias corrections 1 - β1ᵗ and √(1 - β2ᵗ)) enters the
  compiled graph as one small fp32 tensor, so a new lr does not recompile; sizes are dynamic, so one graph serves
  every chunk (one graph per parameter dtype). Cost: the first step compiles, expect tens of seconds (~20 s measured
  for Inductor's C++ backend on a 2-core CPU with a cold cache; TORCHINDUCTOR_CACHE_DIR keeps the result for later
  runs). Run without torch.compile (`compile_fused = False`), the chunked path equals the eager path bit for bit;
  compiled kernels may round an ulp differently, which now and then moves a code by one step: on the CPU the
  parameters agree to ~1e-4 of the update after 30 steps (tests/test_adamw8bit.py). Measured on one H100 in one run
  (BENCHMARKS.md, row optim-sd15, SD1.5 parameter set): 32.6 ms/step, against bitsandbytes' 62.9 ms at the same
  2.03 bytes/param and torch's fused fp32 AdamW's 11.1 ms at 8. On the CPU it is slower than the eager path (compiled: 1.7-3.5x in our measurement on 2 cores), which
  is why fused=None keeps the CPU on the eager path.
For a LoRA's few million parameters either path is noise. The point of doing it in PyTorch: it installs and runs
everywhere (bitsandbytes setup failures are a top complaint of SD trainer users).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

# (levels, power) of the two grids: m signed square law, v unsigned fourth-power law
M_GRID = (127, 2)
V_GRID = (255, 4)


def quantize(x: torch.Tensor, signed: bool, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise non-linear 8-bit codes of x: (codes [numel] int8 or uint8, absmax [ceil(numel / block)] fp32)."""
    levels, power = M_GRID if signed else V_GRID
    flat = x.reshape(-1).float()
    n = flat.numel()
    xb = F.pad(flat, (0, (-n) % block)).view(-1, block)  # (blocks, block); padding zeros do not change absmax
    absmax = xb.abs().amax(1)
    unit = xb.abs() / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [0, 1]
    code = torch.round(unit.pow(1.0 / power) * levels)  # companding: the grid is uniform in unit^(1/power)
    if signed:
        code = (code * torch.sign(xb)).to(torch.int8)
    else:
        code = code.to(torch.uint8)
    return code.reshape(-1)[:n].contiguous(), absmax


def dequantize(code: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, signed: bool,
               block: int = 256) -> torch.Tensor:
    """Inverse of `quantize` (up to the rounding): fp32 tensor of `shape`."""
    levels, power = M_GRID if signed else V_GRID
    n = code.numel()
    c = F.pad(code.float(), (0, (-n) % block)).view(-1, block)
    x = (c.abs() / levels).pow(power) * absmax[:, None]
    if signed:
        x = x * torch.sign(c)
    return x.reshape(-1)[:n].reshape(shape)


# The step's scalars, in this order, as one fp32 tensor `hp` on the parameters' device (see `step_scalars`)
HP = ("1 - lr·λ", "1 - β1", "β2", "1 - β2", "-lr / (1 - β1ᵗ)", "√(1 - β2ᵗ)", "ε")


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, wd: float, t: int,
                 device: torch.device) -> torch.Tensor:
    """`HP` for step t as a [7] fp32 tensor, each value computed in double on the host as the eager path does. A
    tensor, not Python floats: torch.compile would bake floats into the graph and recompile whenever lr changes."""
    hp = torch.tensor([1 - lr * wd, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t),
                       eps], dtype=torch.float32)
    if device.type == "cuda":  # from pinned memory, asynchronously: a plain copy would wait for the queued kernels
        return hp.pin_memory().to(device, non_blocking=True)
    return hp.to(device)


def update_8bit(w: torch.Tensor, g: torch.Tensor, m_code: torch.Tensor, m_absmax: torch.Tensor, v_code: torch.Tensor,
                v_absmax: torch.Tensor, hp: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """One AdamW step of one 8-bit tensor as a pure function: (new θ [n] fp32, m_code, m_absmax, v_code, v_absmax).
    w, g: [n] parameter and gradient (any float dtype); codes [n]; absmax [ceil(n / block)]; hp: `step_scalars`.
    Blocks never mix values across their boundaries, so [n] may also be a `_Chunk`: tensors laid end to end, each
    padded with zeros to whole blocks.
    The same ops in the same order as the eager path of `AdamW8bit.step`, with its scalars read from hp."""
    m = dequantize(m_code, m_absmax, w.shape, True, block)
    v = dequantize(v_code, v_absmax, w.shape, False, block)
    grad = g.float()
    x = w.float() * hp[0]                               # θ (1 - lr·λ)
    m = m.lerp(grad, hp[1])                             # β1 m + (1 - β1) g
    v = torch.addcmul(v * hp[2], hp[3] * grad, grad)    # β2 v + (1 - β2) g², rounded as the eager addcmul_
    denom = v.sqrt() / hp[5] + hp[6]                    # √(v / (1 - β2ᵗ)) + ε
    x = x + hp[4] * m / denom                           # θ - lr / (1 - β1ᵗ) · m / denom
    v_code, v_absmax = quantize(v, False, block)
    m_code, m_absmax = quantize(m, True, block)
    m_code = m_code.masked_fill(v_code == 0, 0)         # guard: no step from m where v̂ = 0
    return x, m_code, m_absmax, v_code, v_absmax


_COMPILED: dict[int, Callable] = {}  # block size -> compiled fused step (one per process; graphs are shared)


def fused_step_fn(block: int, compile: bool = True):
    """fn(w, g, m_code, m_absmax, v_code, v_absmax, hp): `update_8bit`, then its results written into w and the state
    tensors in place. Compiled, the writes are the stores of the fused kernel(s), not extra passes over memory.

    `block` is closed over, so it is a constant of the graph (the per-block absmax is then a reduction of fixed
    length, kept in registers). For the same reason this is compiled with dynamic=None plus sizes marked dynamic per
    call (see `_Chunk.step`) rather than dynamic=True, which would make the closed-over int symbolic too.
    fullgraph=True: a graph break would silently split the fusion, so fail loudly instead."""
    def fused_step(w, g, m_code, m_absmax, v_code, v_absmax, hp):
        x, m_code_new, m_absmax_new, v_code_new, v_absmax_new = update_8bit(w, g, m_code, m_absmax, v_code,
                                                                            v_absmax, hp, block)
        w.copy_(x)  # casts back to the parameter's dtype (round to nearest), as the eager path's p.copy_(w)
        m_code.copy_(m_code_new)
        m_absmax.copy_(m_absmax_new)
        v_code.copy_(v_code_new)
        v_absmax.copy_(v_absmax_new)

    if not compile:
        return fused_step
    if block not in _COMPILED:
        _COMPILED[block] = torch.compile(fused_step, fullgraph=True)
    return _COMPILED[block]


@functools.cache
def _triton_available() -> bool:
    """torch.compile's CUDA backend (Inductor) generates Triton kernels: without Triton there is no fused path."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


STATE_8BIT = ("m_code", "m_absmax", "v_code", "v_absmax")


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class _Chunk:
    """Whole 8-bit parameters of one bucket (one device, dtype and step) laid end to end in flat buffers, each padded
    with zeros to a multiple of the block size so that no block straddles two tensors: the chunk's blocks are the
    blocks of its tensors, and `update_8bit` of the chunk is `update_8bit` of each tensor, bit for bit.

    Parameter i with n_i values, r_i = n_i rounded up to the block size b, o_i = r_0 + … + r_{i-1}, N = Σ r_i:
        m_code, v_code     [N]      p_i's codes at [o_i, o_i + n_i), then r_i - n_i zeros
        m_absmax, v_absmax [N / b]  p_i's scales at [o_i / b, (o_i + r_i) / b)
    The state entries of p_i are views of exactly these ranges: the same shapes as one tensor's state ([n_i] codes,
    [⌈n_i / b⌉] scales), so `state_dict` and the eager path see no difference. The padding is zero in θ, g and the
    codes, hence m = v = 0 there; it stays 0 (m = 0 lerp 0, v = β2·0 + 0), quantizes to code 0 and leaves each
    block's absmax alone, as the per-tensor path's padding does."""

    def __init__(self, params: list[torch.Tensor], block: int):
        self.params, self.block = params, block
        sizes = [p.numel() for p in params]
        self.pads = [_round_up(n, block) - n for n in sizes]
        self.splits = [x for n, pad in zip(sizes, self.pads) for x in (n, pad)]  # [n_0, pad_0, n_1, pad_1, ...]
        self.numel = sum(self.splits)                                            # N
        zeros = torch.zeros(block, dtype=params[0].dtype, device=params[0].device)
        self.padding = [zeros[:pad] if pad else None for pad in self.pads]  # what follows each tensor in θ and g
        self.buffers: tuple[torch.Tensor, ...] = ()   # m_code [N], m_absmax [N/b], v_code [N], v_absmax [N/b]
        self.views: list[tuple[torch.Tensor, ...]] = []  # per parameter: its four state entries

    def pack(self, state: dict) -> None:
        """Make every parameter's 8-bit state a view into this chunk's buffers; where an entry is not that view
        already (first step, `load_state_dict`, an eager step, an older chunk), copy all of the state into fresh
        buffers (a few foreach copies)."""
        if self.views and all(state[p].get(k) is v for p, vs in zip(self.params, self.views)
                              for k, v in zip(STATE_8BIT, vs)):
            return
        dev, total, b = self.params[0].device, self.numel, self.block
        self.buffers = (torch.zeros(total, dtype=torch.int8, device=dev), torch.zeros(total // b, device=dev),
                        torch.zeros(total, dtype=torch.uint8, device=dev), torch.zeros(total // b, device=dev))
        blocks = [(n + pad) // b for n, pad in zip(self.splits[::2], self.pads)]
        codes = [t.split(self.splits)[::2] for t in self.buffers[0::2]]  # [n_i] views (the padding left out)
        scales = [t.split(blocks) for t in self.buffers[1::2]]           # [⌈n_i / b⌉] views
        self.views = list(zip(codes[0], scales[0], codes[1], scales[1]))
        for j, k in enumerate(STATE_8BIT):
            dst = [vs[j] for vs in self.views]
            src = [state[p][k] for p in self.params]
            for d, s, p in zip(dst, src, self.params):
                if s.shape != d.shape or s.dtype != d.dtype:
                    raise ValueError(f"AdamW8bit: state {k} of a parameter of shape {tuple(p.shape)} is "
                                     f"{s.dtype} {tuple(s.shape)}, expected {d.dtype} {tuple(d.shape)}")
            torch._foreach_copy_(dst, src)
        for p, vs in zip(self.params, self.views):
            state[p].update(zip(STATE_8BIT, vs))

    def step(self, fn: Callable, hp: torch.Tensor) -> None:
        """One AdamW step of every parameter of the chunk by one call of fn (`fused_step_fn`)."""
        ws, gs = [], []
        for p, pad in zip(self.params, self.padding):  # flat views; a non-contiguous p (channels-last) or grad
            ws.append(p.reshape(-1))                    # is copied in its logical order, the order of the codes
            gs.append(p.grad.reshape(-1))
            if pad is not None:
                ws.append(pad)
                gs.append(pad)
        w, g = torch.cat(ws), torch.cat(gs)          # [N], [N]: the chunk's θ and g, temporary
        args = (w, g) + self.buffers
        for a in args:  # sizes are graph inputs, not constants: one graph for every chunk
            torch._dynamo.maybe_mark_dynamic(a, 0)
        fn(*args, hp)  # new θ into w (in p's dtype), new codes and scales into the buffers, i.e. into the state
        dense, dense_new = [], []
        for p, new in zip(self.params, w.split(self.splits)[::2]):
            if p.is_contiguous():
                dense.append(p)
                dense_new.append(new.view(p.shape))
            else:  # kept apart: one such pair would send the whole foreach copy down its slow per-tensor path
                p.copy_(new.view(p.shape))
        if dense:
            torch._foreach_copy_(dense, dense_new)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bits (see the module docstring). Same hyperparameters and defaults as
    `torch.optim.AdamW`; `block_size` values share one scale; tensors below `min_8bit_size` keep fp32 state.

    `fused`: None (default) = the fused path for parameters on CUDA when Triton is available, the eager path for
    everything else; True = fused for every parameter (on the CPU torch.compile needs a C++ compiler); False = eager
    everywhere. The fused path's first step compiles (some tens of seconds). `compile_fused = False` runs the fused
    path's function without torch.compile (tests, debugging); `chunk_size` caps the values per compiled call.

    State per parameter: `step` (int); 8-bit: `m_code` int8, `m_absmax` fp32, `v_code` uint8, `v_absmax` fp32;
    fp32: `exp_avg`, `exp_avg_sq`. `state_dict()` / `load_state_dict()` round-trip exactly (dtypes preserved), so a
    resumed run continues bit for bit; both paths read and write the same state. On the fused path the four 8-bit
    entries are views into flat per-chunk buffers (`_Chunk`), of the same shapes and dtypes; torch.save writes each
    buffer once, and a loaded state is re-packed into fresh buffers at the next step."""

    compile_fused = True
    # Values per chunk of the fused 8-bit path (2²⁵ = 32M): large enough that the SD1.5 UNet (860M values) is 31
    # compiled calls per step, small enough that its two temporary flat buffers (θ and g in the parameters' dtype:
    # 256 MB for fp32) fit next to a full fine-tune on a 16 GB GPU. A larger tensor is a chunk of its own.
    chunk_size = 2 ** 25

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = 256, min_8bit_size: int = 4096,
                 fused: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.fused = fused  # not a group setting: a state_dict saved on a GPU must load and run on the CPU

    def __getstate__(self) -> dict:  # torch's keeps defaults, state and groups only: copies would lose `fused`
        return {**super().__getstate__(), "fused": self.fused}

    def _use_fused(self, p: torch.Tensor) -> bool:
        if self.fused is None:
            return p.is_cuda and _triton_available()
        return self.fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            small, large = [], []  # parameters of the fused path: fp32 state / 8-bit state
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(state, p, group)
                if self._use_fused(p):
                    state["step"] += 1
                    (large if "m_code" in state else small).append(p)
                else:
                    self._step_eager(p, state, group)
            if small:
                self._step_fused_fp32(small, group)
            if large:
                self._step_fused_8bit(large, group)
        return loss

    @staticmethod
    def _step_eager(p: torch.Tensor, state: dict, group: dict) -> None:
        """The reference path: one tensor, plain PyTorch ops (dequantize, the fp32 update, quantize)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        block = group["block_size"]
        grad = p.grad.float()
        eight_bit = "m_code" in state
        if eight_bit:  # the moments live in fp32 only during this step
            m = dequantize(state["m_code"], state["m_absmax"], p.shape, True, block)
            v = dequantize(state["v_code"], state["v_absmax"], p.shape, False, block)
        else:
            m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]
        # the fp32 update, written op for op like torch.optim.AdamW (single-tensor path)
        w = p.float() if p.dtype != torch.float32 else p
        w.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        if w is not p:
            p.copy_(w)
        if eight_bit:
            v_code, v_absmax = quantize(v, False, block)
            m_code, m_absmax = quantize(m, True, block)
            m_code.masked_fill_(v_code == 0, 0)  # guard: no step from m where v̂ = 0 (see docstring)
            state.update(m_code=m_code, m_absmax=m_absmax, v_code=v_code, v_absmax=v_absmax)

    def _step_fused_8bit(self, params: list[torch.Tensor], group: dict) -> None:
        """8-bit tensors, packed into chunks (see `_layout`): per chunk, θ and g gathered into two flat buffers, one
        call of the compiled `fused_step_fn` over the chunk, and θ scattered back by one foreach copy. The codes and
        scales are not gathered: they live in the chunk's flat buffers, and the state entries are views into them."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        fn = fused_step_fn(group["block_size"], self.compile_fused)
        buckets = {}  # one flat chunk holds one device and dtype; the bias corrections (hp) depend on t
        for p in params:
            buckets.setdefault((p.device, p.dtype, self.state[p]["step"]), []).append(p)
        for (device, _, t), ps in buckets.items():
            hp = self._scalars(lr, beta1, beta2, eps, wd, t, device)  # one tiny host-to-device copy per bucket
            for chunk in self._layout(ps, group["block_size"]):
                chunk.step(fn, hp)

    def _scalars(self, *args) -> torch.Tensor:
        """`step_scalars(*args)`, kept for equal arguments: the buckets of one --fused-backward step (minisd/train/
        fused.py), each its own step() call, share one copy. Exact: the same numbers make the same tensor."""
        cache = self.__dict__.setdefault("_hp", {})  # not in __getstate__
        if not all(isinstance(a, (int, float)) for a in args[:-1]):  # a tensor lr may change in place
            return step_scalars(*args)
        if args not in cache:
            if len(cache) >= 16:  # a few groups' worth; older steps' entries are never asked for again
                cache.clear()
            cache[args] = step_scalars(*args)
        return cache[args]

    def _layout(self, params: list[torch.Tensor], block: int) -> list[_Chunk]:
        """The chunks of one bucket of 8-bit parameters (same device, dtype, step), kept from step to step.

        Whole tensors in parameter order, up to `chunk_size` values each (a larger tensor is a chunk of its own). A
        chunk is rebuilt, its state copied into fresh flat buffers ("re-packed"), where a state entry is no longer
        the view it made: after `load_state_dict` (which clones), after an eager step (which rebinds the entries),
        or when the bucket's parameters change (a parameter without a gradient this step: a different bucket, a new
        layout; a parameter whose state still views an old chunk keeps that chunk's buffers alive until its own
        next step re-packs it)."""
        layouts = self.__dict__.setdefault("_layouts", {})  # not in __getstate__: copies and pickles rebuild
        key = (block, self.chunk_size, tuple(map(id, params)))  # the chunks hold the params: ids stay unique
        chunks = layouts.get(key)
        if chunks is None:
            stale = {id(p) for p in params}  # layouts sharing a parameter with this one are out of date
            for k in [k for k in layouts if stale.intersection(k[2])]:
                del layouts[k]
            groups, size = [], self.chunk_size
            for p in params:
                n = _round_up(p.numel(), block)
                if groups and size + n <= self.chunk_size:
                    groups[-1].append(p)
                    size += n
                else:
                    groups.append([p])
                    size = n
            chunks = layouts[key] = [_Chunk(ps, block) for ps in groups]
        for c in chunks:
            c.pack(self.state)  # a no-op unless a state entry is not the chunk's view any more
        return chunks

    def _step_fused_fp32(self, params: list[torch.Tensor], group: dict) -> None:
        """fp32-state tensors (biases, norms: many, small): the eager path's ops, each applied to all of them at once
        by a torch._foreach_* op (a few kernel launches in all instead of ~10 per tensor). Python floats are fine
        here: nothing is compiled."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        buckets = {}  # foreach ops want one device and dtype per list; the bias corrections depend on t
        for p in params:
            buckets.setdefault((p.device, p.dtype, self.state[p]["step"]), []).append(p)
        for (_, dtype, t), ps in buckets.items():
            grads = [p.grad.float() for p in ps]
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            ws = ps if dtype == torch.float32 else [p.float() for p in ps]
            torch._foreach_mul_(ws, 1 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, ms, denom, value=-lr / (1 - beta1 ** t))
            if ws is not ps:
                torch._foreach_copy_(ps, ws)

    @staticmethod
    def _init_state(state: dict, p: torch.Tensor, group: dict) -> None:
        state["step"] = 0
        if p.numel() >= group["min_8bit_size"]:
            blocks = math.ceil(p.numel() / group["block_size"])
            state["m_code"] = torch.zeros(p.numel(), dtype=torch.int8, device=p.device)
            state["m_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["v_code"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
            state["v_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but keeps each state tensor's own dtype: torch casts state tensors to the parameter's dtype,
        which would turn int8 codes into floats and round fp32 scales of a bf16 parameter."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                if pid in saved:
                    self.state[p] = {k: v.to(p.device).clone() if torch.is_tensor(v) else v
                                     for k, v in saved[pid].items()}
        self._layouts = {}  # the old chunks' buffers are garbage now; the next fused step packs the loaded state

    def state_bytes(self) -> int:
        """Bytes of memory held by the optimizer state (for memory budgets and the ~2 bytes/parameter test): each
        storage once, so a fused chunk's buffers count once, with their padding (< 1 block per tensor)."""
        storages = {}
        for s in self.state.values():
            for v in s.values():
                if torch.is_tensor(v):
                    st = v.untyped_storage()
                    storages[(v.device, st.data_ptr())] = st.nbytes()
        return sum(storages.values())
