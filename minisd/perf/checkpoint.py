"""Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): run a block without
storing its activations, and run it again inside backward to get them. Memory for activations drops from "every
intermediate of the block" to "the block's inputs"; the price is one extra forward of the block. (Measured on an
H100: 8 MLP blocks of width 256 on a 64x128-token batch, forward peak 711 MB plain, 96 MB checkpointed.)

What it changes: nothing in the forward (the same operations on the same inputs: outputs are bit for bit equal);
gradients only in rounding order (the recompute's inner backward sums some of them in another order, ~1e-7
relative in fp32: tests/test_unet.py).

    y = checkpoint(block, x, context=c)     # instead of y = block(x, context=c)
    set_gradient_checkpointing(unet, True)  # every block of a UNetModel, applied from outside the chapter

Two things make a checkpoint correct, and both are classic bugs:

1. Same randomness in the recompute. Dropout inside the block must draw the same masks twice, so the CPU and CUDA RNG
   states are saved before the forward and restored (inside `torch.random.fork_rng`, which leaves the global RNG where
   it was) for the recompute. Autocast state is replayed too, so the recompute runs at the same precision.

2. Gradients for parameters when no *input* needs one. A frozen UNet with LoRA layers gets inputs (noisy latents, text
   embeddings) that do not require grad. A reentrant checkpoint built as an autograd.Function whose only inputs are
   those tensors then produces an output that does not require grad, autograd never calls its backward, and the LoRA
   weights silently get no gradient (cloneofsimo/lora #26, huggingface/transformers #21381). Here the Function always
   receives one extra tensor that requires grad (`_ANCHOR`, empty), so its output is always part of the graph; the
   backward recomputes the block with grad enabled and calls `torch.autograd.backward` on it, which accumulates into
   the `.grad` of every parameter inside, trainable or not reached from the inputs alike.

Like PyTorch's reentrant checkpoint, parameter gradients are delivered by that inner backward: use `loss.backward()`
(what every trainer does), not `torch.autograd.grad(loss, params)`. Tensors inside lists or dicts of arguments are not
tracked (an error is raised if one requires grad); pass them as separate arguments or keyword arguments.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..unet import TimestepEmbedSequential, UNetModel

# An empty leaf that requires grad: passed to every CheckpointFunction so its outputs always require grad (point 2).
_ANCHOR = torch.empty(0, requires_grad=True)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda")]


class CheckpointFunction(torch.autograd.Function):
    """apply(fn, preserve_rng_state, anchor, *args) -> fn(*args), storing only the tensor args."""

    @staticmethod
    def forward(ctx, fn, preserve_rng_state, anchor, *args):
        ctx.fn, ctx.preserve = fn, preserve_rng_state
        ctx.is_tensor = [torch.is_tensor(a) for a in args]
        ctx.requires = [torch.is_tensor(a) and a.requires_grad for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.autocast = _autocast_state()
        if preserve_rng_state:
            ctx.cpu_rng = torch.get_rng_state()
            # CUDA generators of the devices the inputs live on (+ the current one if CUDA is in use)
            devs = {a.device.index for a in args if torch.is_tensor(a) and a.is_cuda}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                devs.add(torch.cuda.current_device())
            ctx.cuda_devs = sorted(devs)
            ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devs]
        ctx.save_for_backward(*[a for a, t in zip(args, ctx.is_tensor) if t])
        return fn(*args)  # autograd.Function.forward already runs without grad: no activations kept

    @staticmethod
    def backward(ctx, *grads):
        # rebuild the arguments: fresh leaves detached from the outer graph, requiring grad where the originals did
        saved = iter(ctx.saved_tensors)
        args = []
        for is_t, req, other in zip(ctx.is_tensor, ctx.requires, ctx.others):
            args.append(next(saved).detach().requires_grad_(req) if is_t else other)
        with torch.random.fork_rng(devices=ctx.cuda_devs if ctx.preserve else [], enabled=ctx.preserve):
            if ctx.preserve:  # replay the forward's random draws (dropout masks)
                torch.set_rng_state(ctx.cpu_rng)
                for d, state in zip(ctx.cuda_devs, ctx.cuda_rng):
                    torch.cuda.set_rng_state(state, d)
            with torch.enable_grad(), _replay_autocast(ctx.autocast):
                outputs = ctx.fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:  # accumulates into .grad of parameters inside the block and of the rebuilt leaves
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = [a.grad if req else None for a, req in zip(args, ctx.requires)]
        return (None, None, None, *input_grads)


class _replay_autocast:
    """Re-enter the autocast settings recorded in forward (for cpu and cuda)."""

    def __init__(self, state):
        self.contexts = [torch.autocast(dev, dtype=dtype, enabled=on) for dev, on, dtype in state
                         if on or dev == "cpu" or torch.cuda.is_available()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _may_have_trainable(fn) -> bool:
    """False only when fn is known to hold no parameter that requires grad (a module or a module's method)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return any(p.requires_grad for p in owner.parameters())
    return True  # a plain function may close over parameters: assume it does


def checkpoint(fn, *args, preserve_rng_state: bool = True, **kwargs):
    """fn(*args, **kwargs) with its activations recomputed in backward instead of stored (see the module docstring).

    Tensor positional and keyword arguments are saved and get gradients; other arguments are passed through.
    Outside grad mode, or when neither an input nor (as far as can be told) a parameter of fn requires grad, it is
    a plain call."""
    values = list(args) + list(kwargs.values())
    for v in values:
        if isinstance(v, (list, tuple, dict)):
            items = v.values() if isinstance(v, dict) else v
            if any(torch.is_tensor(t) and t.requires_grad for t in items):
                raise TypeError("checkpoint: pass tensors that require grad as separate arguments, not in containers")
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    if preserve_rng_state and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # Recording a CUDA graph (minisd/perf/graphs.py): generator states cannot be read or set then (each replay
        # advances them instead), so there is nothing to save. Recorders must keep random ops out of checkpointed
        # blocks (the trainer refuses --cuda-graph with dropout + checkpointing).
        preserve_rng_state = False
    if not any(torch.is_tensor(v) and v.requires_grad for v in values) and not _may_have_trainable(fn):
        return fn(*args, **kwargs)  # nothing to differentiate: nothing is stored anyway
    n, keys = len(args), list(kwargs)

    def run(*flat):  # keyword tensors travel as positional ones so that they are saved and get gradients
        return fn(*flat[:n], **dict(zip(keys, flat[n:])))
    return CheckpointFunction.apply(run, preserve_rng_state, _ANCHOR, *values)


# ------------------------------------------------------------------------------------------- the UNet's blocks
class CheckpointedBlock(TimestepEmbedSequential):
    """A UNet block whose every call with grad enabled goes through `checkpoint`. The same modules under the same
    names (the state-dict keys do not change); only the class differs, so copies (EMA: copy.deepcopy) and pickles
    keep the behaviour. `__call__` rather than `forward` is overridden so that the checkpoint wraps the whole module
    call, a block compiled by perf/compile.py included (torch.compile replaces what `Module.__call__` runs)."""

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, **kwargs)
        return super().__call__(*args, **kwargs)


def set_gradient_checkpointing(unet: UNetModel, on: bool) -> None:
    """Recompute every block of the U (input, middle and output blocks) in backward instead of storing its
    activations, or stop doing so. Recorded as `unet.gradient_checkpointing` (a plain attribute, not in the state
    dict) for code that asks."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        if block is None:
            continue
        if on and not isinstance(block, CheckpointedBlock):
            block.__class__ = CheckpointedBlock
        elif not on and isinstance(block, CheckpointedBlock):
            block.__class__ = TimestepEmbedSequential
    unet.gradient_checkpointing = on
