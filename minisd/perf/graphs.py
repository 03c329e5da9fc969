"""CUDA graphs: record the kernels of one call once, then replay them with a single launch.

What it changes: nothing in the numbers. The replay runs the same kernels with the same arguments in the same
order as the eager call (same shapes, library heuristics and workspaces), only launched from a recording:
sampled images are bit for bit the eager ones (tests/test_graphs.py). Used by sample.py --cuda-graph
(`use_cuda_graph`: the Pipeline's UNet call), train.py --cuda-graph (a micro-batch's forward + backward) and bench/.

Why. A Stable Diffusion UNet call is several thousand small kernels (every norm, activation, add and dtype cast is
one). From Python each costs ~5-20 µs to launch, so for small batches the GPU waits on the CPU: an SDXL LoRA step
at 1024 px holds ~95 ms of GPU work in ~400 ms of wall time (bench/NOTES.md). A CUDA graph is a recording of those
launches with their arguments (pointers included); replaying it costs one launch, and the GPU runs back to back.

What that demands from the recorded function (torch.cuda.graphs docs, "Constraints"):
    - the same shapes, dtypes and devices at every call: inputs are copied into fixed buffers, and the kernels read
      those buffers; a call with other shapes is an error here, not a silent re-record
    - no host synchronisation inside (`.item()`, `print(tensor)`, Python branches on tensor values), and no
      Python-side randomness: whatever Python decided while recording is frozen into the graph
    - tensors the kernels read or write outside the inputs (parameters, `.grad`, optimizer state) keep their
      storage: update them in place (optimizers do), never rebind them (`p.data = ...`, `zero_grad(set_to_none=True)`)
    - random numbers from the default CUDA generator are fine: each replay advances its offset (new dropout masks)

Memory: intermediate tensors of the recorded call live in a pool private to the graph, kept between replays
(about the eager call's peak); outputs are copied out (`clone`) so the caller never holds a buffer that the next
replay overwrites.

    g = CudaGraph(lambda x, t, c: unet(x, t, c))     # or any function of tensors returning tensor(s)
    eps = g(x, t, c)                                 # calls 1-2 eager (warm-up), then record once, then replay

A training step draws random numbers on the host (t, ε from a CPU generator: minisd/trainer.py `Draws`), which a
graph cannot do. `StepGraph` wraps such a step unchanged: it makes the step's draws itself, in the step's order,
and hands them in as inputs (same numbers as eager, bit for bit; see its docstring).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..trainer import Draws
from ..pipeline import Pipeline


class CudaGraph:
    """fn(*args) -> tensor | tuple of tensors, replayed from one CUDA graph.

    The first `warmup` calls run fn eagerly on a side stream: cuDNN / cuBLAS pick their algorithms, the allocator
    and autograd initialise lazily, none of which may happen while recording. The next call copies its tensor
    arguments into fixed buffers and records fn reading them; it and every later call then copy their arguments
    in and replay. Arguments may be tensors or tuples of tensors; others (None, numbers) must be equal at every
    call. Every call returns fn's result (fresh tensors), so the warm-up calls are real calls: a training step can
    be graphed from step 1."""

    def __init__(self, fn: Callable, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA GPU")
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list = []          # the fixed input buffers (or the constant non-tensor arguments)
        self.outputs = None             # the graph's own output tensors

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(args)
        if self.graph is None:
            self._record(args)
        else:
            self._load(args)
        self.graph.replay()
        return _clone(self.outputs)

    def _eager(self, args):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _record(self, args) -> None:
        # fixed buffers on the GPU; CPU tensors (timesteps, weights drawn on the host) are moved there
        device = next((a.device for a in _tensors(args) if a.is_cuda), torch.device("cuda"))
        self.inputs = _buffers(args, device)
        self.signature = _signature(args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph):
            self.outputs = self.fn(*self.inputs)
        self.graph = graph                  # only a complete recording is ever replayed

    def _load(self, args) -> None:
        sig = _signature(args)
        if sig != self.signature:
            raise ValueError(f"CUDA graph recorded for arguments {self.signature}, called with {sig}: "
                             "a graph replays fixed shapes")
        _copy(self.inputs, args)


# Arguments may be tensors, tuples / lists / dataclasses of them (nested), or constants (None, numbers, strings).
def _fields(a) -> list | None:
    """The values of a dataclass instance, else None."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return [getattr(a, f.name) for f in dataclasses.fields(a)]
    return None


def _buffers(a, device: torch.device):
    """A fixed GPU copy of every tensor in a (CPU tensors, e.g. timesteps drawn on the host, move there)."""
    if torch.is_tensor(a):
        return a.to(device, copy=True)
    if _fields(a) is not None:
        return dataclasses.replace(a, **{f.name: _buffers(getattr(a, f.name), device) for f in dataclasses.fields(a)})
    return type(a)(_buffers(x, device) for x in a) if isinstance(a, (tuple, list)) else a


def _tensors(a):
    if torch.is_tensor(a):
        yield a
    elif isinstance(a, (tuple, list)) or _fields(a) is not None:
        for x in (_fields(a) if _fields(a) is not None else a):
            yield from _tensors(x)


def _signature(a):
    """What must not change between calls: shape and dtype of a tensor, the value of anything else."""
    if torch.is_tensor(a):
        return ("tensor", tuple(a.shape), a.dtype)
    if _fields(a) is not None:
        return (type(a).__name__, *(_signature(x) for x in _fields(a)))
    return tuple(_signature(x) for x in a) if isinstance(a, (tuple, list)) else a


def _copy(buf, a) -> None:
    if torch.is_tensor(a):
        buf.copy_(a, non_blocking=True)
    elif isinstance(a, (tuple, list)) or _fields(a) is not None:
        for b, x in zip(*((_fields(buf), _fields(a)) if _fields(a) is not None else (buf, a))):
            _copy(b, x)


def _clone(out):
    if torch.is_tensor(out):
        return out.clone()
    return tuple(_clone(o) for o in out) if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------- training steps
class StepGraph:
    """step(draw, *args) -> tensor(s), replayed from one CUDA graph, where `draw` is the step's source of random
    numbers (`Draws`: randint / randn from the CPU generator `gen`, in call order, moved to `device`).

    A recording cannot draw on the host: whatever it drew while recording would be replayed forever. So the step is
    wrapped, not rewritten. The warm-up calls run it eagerly with a `Draws` that notes each call (kind, shape,
    dtype): the plan, the same at every call because the shapes are. From then on each call makes the plan's draws
    from `gen` itself, in the plan's order and with the same calls (so the same numbers, and the generator ends in
    the same state as after an eager call), passes them to a `CudaGraph` as inputs, and the recorded step receives
    them in order from `draw` - at the recording, the fixed buffers they are copied into. A step that asks for other
    draws than its warm-up calls made is an error, not a silent mismatch."""

    def __init__(self, step: Callable, gen: torch.Generator, device: torch.device | str, warmup: int = 2):
        if warmup < 1:
            raise ValueError("StepGraph needs at least one eager warm-up call to learn the step's draws")
        self.step, self.gen, self.device = step, gen, torch.device(device)
        self.plan: list | None = None          # [(kind, args), ...] of the warm-up calls
        self.recorder = CudaGraph(self._call, warmup=warmup)

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The recording, once made."""
        return self.recorder.graph

    def __call__(self, *args):
        if self.recorder.calls < self.recorder.warmup:  # eager: the step draws for itself; the draws are noted
            draw = _NotedDraws(self.gen, self.device)
            out = self.recorder(draw, *args)
            if self.plan is not None and draw.plan != self.plan:
                raise RuntimeError(f"StepGraph: the step drew {draw.plan}, before {self.plan}: draws must not change")
            self.plan = draw.plan
            return out
        host = Draws(self.gen, "cpu")               # the same calls on the same generator: the same numbers
        values = [getattr(host, kind)(*a) for kind, a in self.plan]
        return self.recorder(values, *args)

    def _call(self, draw, *args):
        if isinstance(draw, list):                  # recording: the draws are the graph's input buffers
            draw = _HandedDraws(draw, self.plan)
        out = self.step(draw, *args)
        if isinstance(draw, _HandedDraws) and draw.next != len(self.plan):
            raise RuntimeError(f"StepGraph: the step drew {draw.next} of its {len(self.plan)} planned numbers")
        return out


class _NotedDraws(Draws):
    """`Draws` that also lists each call: ("randint", (high, shape)) or ("randn", (shape, dtype))."""

    def __init__(self, gen, device):
        super().__init__(gen, device)
        self.plan = []

    def randint(self, high, shape):
        self.plan.append(("randint", (high, tuple(shape))))
        return super().randint(high, shape)

    def randn(self, shape, dtype=torch.float32):
        self.plan.append(("randn", (tuple(shape), dtype)))
        return super().randn(shape, dtype)


class _HandedDraws:
    """The draws of a recorded call: given tensors, handed out in the plan's order, each checked against its entry."""

    def __init__(self, values: list, plan: list):
        self.values, self.plan, self.next = values, plan, 0

    def _take(self, kind, args):
        if self.next >= len(self.plan) or self.plan[self.next] != (kind, args):
            raise RuntimeError(f"StepGraph: the step asked for {kind}{args}, its plan says "
                               f"{self.plan[self.next] if self.next < len(self.plan) else 'no more draws'}")
        self.next += 1
        return self.values[self.next - 1]

    def randint(self, high, shape):
        return self._take("randint", (high, tuple(shape)))

    def randn(self, shape, dtype=torch.float32):
        return self._take("randn", (tuple(shape), dtype))


# ------------------------------------------------------------------------------------------- graphed sampling
class UNetGraphs:
    """unet(x, t, context, y=None), each call replayed from a CUDA graph; one graph per input signature (shape and
    dtype of x, t and context; y given or not, and its shape), so calls of the sizes seen before reuse their
    recording. Per signature the first call runs eagerly (cuDNN / cuBLAS pick their algorithms), the second records
    and replays, every later one copies its inputs in and replays. Used by `use_cuda_graph` and by the
    minisd sampling benchmark (bench/sampling.py).

    Each graph keeps a private memory pool of about one UNet forward's activations (plus its input buffers) until
    `clear()` or until this object goes. The recording fixes everything Python decided during it: after swapping
    modules, rebinding parameters (`p.data = ...`) or changing Python-side settings the UNet reads (a LoRA scale),
    call `clear()`. Weights updated in place (`load_state_dict`, `copy_`) are seen by the next replay."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.graphs: dict[tuple, CudaGraph] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in (x, t, context, y))
        graph = self.graphs.get(key)
        if graph is None:
            # one eager warm-up call is enough for inference (no autograd state to initialise)
            graph = self.graphs[key] = CudaGraph(self._forward, warmup=1)
        # CudaGraph's buffers, streams and recording use the current CUDA device: make it x's (cuda:1 too)
        with torch.cuda.device(x.get_device()):                      # -1 (a CPU tensor): no switch
            return graph(x, t, context, y)

    def _forward(self, x, t, context, y):
        return self.unet(x, t, context, y=y)

    def clear(self) -> None:
        """Drop every recording and its memory pool."""
        self.graphs.clear()


def use_cuda_graph(pipe: Pipeline) -> Pipeline:
    """Replay the UNet call of the pipeline's denoising loop (`pipe.run_unet`) from CUDA graphs (`UNetGraphs`,
    kept as `pipe.graphs`); sample.py --cuda-graph. It removes the Python and launch overhead of the UNet's several
    thousand small kernels, which dominates for small batches, small images and many steps (SD1.5, 512 px, batch 1
    on an H100: 31.5 -> 76.7 UNet it/s, bench/NOTES.md); large SDXL images gain less, their kernels are long
    already. Same kernels, same order: the images do not change. Costs: the first call of each size (batch,
    width x height, guidance on/off) runs one step eagerly and records at the second, which takes about one extra
    step; each recorded size keeps a private memory pool of about one UNet forward's activations while the
    pipeline lives (`pipe.graphs.clear()` frees them). CUDA devices only. With `compile_unet_blocks`
    (perf/compile.py) on top, the recorded kernels are the compiled ones. Returns the pipeline."""
    if pipe.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, not {str(pipe.device)!r}")
    pipe.graphs = UNetGraphs(pipe.model.unet)
    pipe.run_unet = pipe.graphs          # an instance attribute: the loop's `self.run_unet(...)` now replays
    return pipe
