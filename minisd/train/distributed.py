"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node N train.py ...`.

torchrun starts N copies of train.py and tells each its RANK, LOCAL_RANK and WORLD_SIZE (and, across machines, where
to meet: --nnodes, --rdzv-endpoint). `init_from_env` joins the process group - NCCL between GPUs, gloo between
CPU processes - and every rank builds the same model and the same adapters (same seed). Then, per optimizer step:

    data      all ranks walk the data plan of one process with batch N·B (same seed, same epochs, same buckets);
              rank r keeps its slice of each global batch (`ShardedLoader`): with buckets, a bucket's last, smaller
              batch is split as evenly as it goes, and a rank whose slice is empty runs no forward
    noise     every sample draws its own t, ε, VAE sample, ... from a generator keyed by (seed, data position) -
              `SampleDraws`, --noise-streams sample - so a sample draws the same numbers whichever rank holds it
    loss      rank r backpropagates mean_r · B_r / B_global, so the sum over ranks is the mean over the global batch
    gradient  after the micro-batches, the trainable gradients (and the step's loss) are summed over the ranks in
              one all-reduce (`reduce_step`); clipping, the optimizer, EMA and the LR schedule then see the global
              gradient, identical on every rank, so the adapters stay identical without being broadcast

Hence the stated semantics: N ranks with batch B train as one process with batch N·B and --noise-streams sample:
the same loss sequence and weights, up to float rounding of the sums (tests/test_distributed.py measures it).
Gradient accumulation sums micro-batches locally before the one all-reduce, so it sees the global gradient too.

Files: rank 0 alone writes checkpoints, loss.jsonl, validation grids, the final files (`on_main`); the others wait
for it and get its result, or its error as one line, so a failed save stops every rank instead of leaving them
waiting in the next collective. No collective ever runs inside rank 0's part (the usual multi-GPU save deadlock).
A checkpoint records the world size and every rank's RNG state: a resume at the same world size continues exactly;
at another it is refused (the global batch, and so the run, would differ).

Why one all-reduce instead of DistributedDataParallel: the trainable tensors are adapters scattered through a frozen
model and through several networks (UNet, text encoders) that the step calls directly; DDP wants one wrapped
module called through its wrapper, would broadcast the whole frozen model at start, and needs `no_sync` for
accumulation. For adapters (a few MB of gradient) one flat all-reduce per step costs about what DDP's bucketed,
backward-overlapped one does. A full fine-tune too large to replicate needs FSDP instead: README "More than one GPU".
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as tdist

from ..trainer import Draws
from .buckets import BucketLoader
from .data import collate

TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long for the others (rank 0's validation grid, say)


class DistError(ValueError):
    """Another rank failed, or a resume does not fit this world; one-line message."""


class Dist:
    """This process's place in the group: rank, world size, device. world == 1 is the plain single process."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK on a multi-GPU machine."""
        if device.type == "cuda" and self.world > 1:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def seed_dropout(self, seed: int) -> None:
        """After the adapters are built (same init everywhere): a global torch RNG per rank, so adapter dropout
        masks differ between ranks as they do between the samples of one batch."""
        if self.world > 1:
            torch.manual_seed(sample_seed(seed, (self.rank, 1 << 20)))

    # ------------------------------------------------------------------------------------- rank 0's work
    def on_main(self, fn, *args, **kwargs):
        """fn on rank 0 only; every rank waits for it and returns its result. An exception there is raised
        again on rank 0 and as a one-line DistError on the others, so no rank is left waiting."""
        if self.world == 1:
            return fn(*args, **kwargs)
        box = [None, None]  # (result, error line)
        if self.is_main:
            try:
                box[0] = fn(*args, **kwargs)
            except BaseException as e:
                box[1] = f"rank 0: {e}"
                tdist.broadcast_object_list(box, src=0)
                raise
        tdist.broadcast_object_list(box, src=0)
        if box[1]:
            raise DistError(box[1])
        return box[0]

    def main_first(self, fn, *args, **kwargs):
        """fn on rank 0, then on the others (e.g. a cache file rank 0 writes and the others read)."""
        if self.world == 1:
            return fn(*args, **kwargs)
        out = []  # rank 0's result stays on rank 0 (a cache is too big to send)
        self.on_main(lambda: out.append(fn(*args, **kwargs)))
        return out[0] if self.is_main else fn(*args, **kwargs)

    def gather(self, obj) -> list | None:
        """Every rank's obj, as a list on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    # ------------------------------------------------------------------------------------- the step
    @staticmethod
    def share(batch: dict) -> float:
        """This rank's part of the global batch, B_r / B_global (1 in a plain process)."""
        return len(batch["indices"]) / batch.get("global_size", len(batch["indices"]))

    def reduce_step(self, params: list[torch.Tensor], loss: float) -> float:
        """Sum the trainable gradients and the step's loss over the ranks, in one flat all-reduce; a rank that
        ran no forward contributes zeros. Returns the global loss (NaN on every rank if it is NaN on one)."""
        if self.world == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dev = grads[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        flat = torch.cat([g.flatten().float() for g in grads] + [has, torch.tensor([loss], device=dev)])
        tdist.all_reduce(flat)  # SUM: each rank's loss was already scaled by its share
        i = 0
        for k, (p, g) in enumerate(zip(params, grads)):
            # a tensor no rank computed a gradient for (module dropout skipped it) keeps none: the optimizer skips
            # it, as one process would
            p.grad = flat[i:i + g.numel()].view_as(g).to(g.dtype) if flat[-1 - len(params) + k] > 0 else None
            i += g.numel()
        return float(flat[-1])

    def agree_max(self, value: int, device: torch.device) -> int:
        """The largest of every rank's value, on every rank: a stop signal that reached one rank stops all of them
        at the same step boundary (signals.py), so none is left waiting in the next all-reduce."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t)

    def check_resume(self, state: dict, path: str) -> None:
        """A checkpoint continues only at the world size that wrote it."""
        saved = int(state.get("world_size", 1))
        if saved != self.world:
            raise DistError(f"{path} was written by {saved} process(es), this run has {self.world}: resume with "
                            f"torchrun --nproc_per_node {saved} (another count changes the global batch)")


_CURRENT = Dist()


def current() -> Dist:
    """The process group this process joined (`init_from_env`), or the single process."""
    return _CURRENT


def init_from_env(device: str = "auto") -> Dist:
    """Join the group torchrun describes in the environment (nothing to do without WORLD_SIZE > 1)."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:  # before any collective: NCCL's object collectives run on the current device, one per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    if world > 1:
        _CURRENT = Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _CURRENT = Dist()


# ----------------------------------------------------------------------------------------------- data and noise
def sample_seed(seed: int, key: tuple) -> int:
    """A 63-bit seed from (seed, key), by numpy's SeedSequence (a hash: nearby keys give unrelated streams)."""
    a, b = np.random.SeedSequence([seed, *key]).generate_state(2)
    return (int(a) << 31) ^ int(b)


class SampleDraws(Draws):
    """`Draws` with one generator per sample, keyed by (seed, the sample's data position): each row of a draw of
    shape (B, ...) comes from its sample's own generator, in that generator's call order (VAE sample, t, ε, ...).
    A sample draws the same numbers in any batch, on any rank."""

    def __init__(self, keys: list[tuple], seed: int, device: torch.device | str = "cpu"):
        super().__init__(None, device)
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, k)) for k in keys]

    def randint(self, high: int, shape: tuple) -> torch.Tensor:
        assert shape[0] == len(self.gens), (shape, len(self.gens))
        rows = [torch.randint(0, high, tuple(shape[1:]), generator=g) for g in self.gens]
        return torch.stack(rows).to(self.device)

    def randn(self, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        assert shape[0] == len(self.gens), (shape, len(self.gens))
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.gens]
        return torch.stack(rows).to(self.device)


def draws_for(batch: dict, gen: torch.Generator, seed: int, device) -> Draws:
    """The draws of a micro-batch: per sample where the loader keyed its samples, else the run's one stream."""
    if "draw_keys" in batch:
        return SampleDraws(batch["draw_keys"], seed, device)
    return Draws(gen, device)


class ShardedLoader:
    """Rank r's slice of the global batches of `loader`, whose batch size becomes world × B. Each item carries its
    data position (epoch, plan cursor, place in a bucket batch) as its noise key. State: the wrapped loader's."""

    def __init__(self, loader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world
        loader.batch_size *= world  # the global batch; a bucket plan is chunked by it
        loader._plan = loader.plan(loader.epoch)

    def next_batch(self) -> dict:
        L = self.loader
        if isinstance(L, BucketLoader):  # a plan entry is one whole (bucket) batch
            idx = L._advance()
            entries = [(int(i), L.epoch, (L.epoch, L.cursor, j)) for j, i in enumerate(idx)]
        else:  # a plan entry is one sample; an epoch may end inside the batch (as in Loader.next_batch)
            entries = []
            for _ in range(L.batch_size):
                i = int(L._advance())
                entries.append((i, L.epoch, (L.epoch, L.cursor, 0)))
        mine = [entries[j] for j in np.array_split(np.arange(len(entries)), self.world)[self.rank]]
        batch = collate([L.ds.get(i, ep) for i, ep, _ in mine]) if mine else {"indices": []}
        batch["draw_keys"] = [k for _, _, k in mine]
        batch["global_size"] = len(entries)
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def shard(loader, dist: Dist, noise_streams: str):
    """The loader a run uses: `ShardedLoader` under torchrun or with --noise-streams sample, else `loader`."""
    streams = noise_streams if noise_streams != "auto" else "sample" if dist.world > 1 else "batch"
    if streams == "batch" and dist.world > 1:
        raise DistError("--noise-streams batch cannot be used with more than one process (every rank would draw "
                        "the same noise); use auto or sample")
    return ShardedLoader(loader, dist.rank, dist.world) if streams == "sample" else loader
