"""CUDA graphs: record the kernels of one call once, then replay them with a single launch.

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
"""
from __future__ import annotations

from typing import Callable

import torch


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


# Arguments may be tensors, tuples / lists of them (nested), or constants (None, numbers, strings).
def _buffers(a, device: torch.device):
    """A fixed GPU copy of every tensor in a (CPU tensors, e.g. timesteps drawn on the host, move there)."""
    if torch.is_tensor(a):
        return a.to(device, copy=True)
    return type(a)(_buffers(x, device) for x in a) if isinstance(a, (tuple, list)) else a


def _tensors(a):
    if torch.is_tensor(a):
        yield a
    elif isinstance(a, (tuple, list)):
        for x in a:
            yield from _tensors(x)


def _signature(a):
    """What must not change between calls: shape and dtype of a tensor, the value of anything else."""
    if torch.is_tensor(a):
        return ("tensor", tuple(a.shape), a.dtype)
    return tuple(_signature(x) for x in a) if isinstance(a, (tuple, list)) else a


def _copy(buf, a) -> None:
    if torch.is_tensor(a):
        buf.copy_(a, non_blocking=True)
    elif isinstance(a, (tuple, list)):
        for b, x in zip(buf, a):
            _copy(b, x)


def _clone(out):
    if torch.is_tensor(out):
        return out.clone()
    return tuple(_clone(o) for o in out) if isinstance(out, (tuple, list)) else out
