"""What makes a run continue exactly where it stopped: the checkpoint, the loss log and the loss curve. `RunState` is
a mixin of `Trainer` (loop.py): its methods read and write the trainer's parts, written apart so that the loop
reads as the loop.

    checkpoint.pt   step, losses, the trained tensors (`trainable_state`: adapters, a full fine-tune's weights or a
                    distillation student; method_state.py), optimizer, LR schedule, grad scaler, data position,
                    EMA shadow, the TI vectors / hypernetwork MLPs, and every RNG (rng.py; each rank's under
                    torchrun): all a resumed run needs to repeat the losses of an uninterrupted one (bitwise on the
                    CPU). Written to a fresh private temporary file and renamed (formats/safe_write.py), read back
                    with torch.load(weights_only=True): a pickle that would run code is refused.
    loss.jsonl      one {"step", "loss", "lr", ...} line per optimizer step, appended as it happens; rewritten from
                    the checkpoint's losses when a run resumes, so it ends equal to the uninterrupted run's.
    loss.png        `draw_loss_curve`: raw loss, its running mean and the held-out validation loss.
"""
from __future__ import annotations

import json
import os

import torch
from PIL import Image, ImageDraw

from ..formats.safe_write import append_text, atomic_path, write_text
from ..trainer import lr_lambda
from . import method_state
from .rng import rng_state, set_rng_state


class TrainError(Exception):
    """A run that cannot go on (NaN loss, out of memory, bad resume folder); one-line message."""


class RunState:
    """Checkpoint and loss log of a `Trainer` (see the module docstring)."""

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")

    def trainable_state(self) -> dict:
        """What a checkpoint holds of the trained tensors: {"adapter": ...} or a full fine-tune's {"weights": ...}
        (method_state.py); a distillation run's {"student": ...} (train/distill_loop.py)."""
        return method_state.trainable_state(self)

    def load_trainable_state(self, s: dict) -> None:
        """The inverse of `trainable_state`, in place (the optimizer and EMA hold these very tensors)."""
        method_state.load_trainable_state(self, s)

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly, written to a temporary file and renamed (atomic)."""
        state = {"step": self.step, "losses": self.losses, **self.trainable_state(),  # adapter or weights
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict(), "loader": self.loader.state_dict(), "rng": rng_state(self.gen)}
        if self.ema:
            state["ema"] = self.ema.state_dict()
        if self.method:  # issue 17: the TI vectors / hypernetwork MLPs
            state["method"] = self.method.state_dict()
        if self.dist.world > 1:  # torchrun: the world size, and every rank's RNGs (dropout differs per rank)
            state["world_size"], state["rng_ranks"] = self.dist.world, self.dist.gather(rng_state(self.gen))
        # rank 0 writes, the others wait for it: a fresh private temporary file renamed into place
        # (formats/safe_write.py): a kill or a full disk mid-write leaves the previous checkpoint intact, and a
        # link planted at any name is never written through
        self.dist.on_main(write_atomic, state, self.ckpt_path)
        self.saved_step = self.step  # the step stopped.txt names (signals.py)

    def write_loss_log(self) -> None:
        """loss.jsonl rewritten from self.losses: at the start of `run` (a resumed run's file is cut back to its
        checkpoint's step, so it ends up equal to the uninterrupted run's) and at the end; `append_loss` in between."""
        write_text(os.path.join(self.run_dir, "loss.jsonl"), "".join(json.dumps(r) + "\n" for r in self.losses))

    def append_loss(self, record: dict) -> None:
        """One {"step", "loss", "lr"} line per optimizer step, on disk at once (closing the file flushes it)."""
        append_text(os.path.join(self.run_dir, "loss.jsonl"), json.dumps(record) + "\n")  # never through a link

    def load_checkpoint(self) -> None:
        if not os.path.isfile(self.ckpt_path):
            raise TrainError(f"{self.run_dir}: no checkpoint.pt to resume from")
        try:  # truncated, empty or foreign: one line (weights_only: a pickle that would run code is refused too)
            s = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise TrainError(f"{self.ckpt_path}: not a readable checkpoint ({why})") from None
        keys = ("optimizer", "scheduler", "scaler", "loader", "rng", "step", "losses")
        if not isinstance(s, dict) or any(k not in s for k in keys):
            raise TrainError(f"{self.ckpt_path}: not a minisd training checkpoint (expected the keys "
                             f"{', '.join(keys)})")
        if not isinstance(s["step"], int) or isinstance(s["step"], bool) or s["step"] < 0:
            raise TrainError(f"{self.ckpt_path}: step must be a whole number >= 0, got {s['step']!r}")
        if self.cfg.max_steps < s["step"]:
            raise TrainError(f"--max-steps {self.cfg.max_steps} is below the step {s['step']} this run reached; "
                             f"give --max-steps {s['step']} or more")
        self.dist.check_resume(s, self.ckpt_path)  # only at the world size that wrote it
        try:
            self._load_state(s)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            raise TrainError(f"{self.ckpt_path}: does not match this run's trained tensors and optimizer "
                             f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})") from None

    def _load_state(self, s: dict) -> None:
        """Put a checkpoint's tensors and counters into the built trainer (load_checkpoint checked its keys)."""
        self.load_trainable_state(s)  # in place: optimizer refs hold (adapter, full weights or student)
        if self.method:
            if "method" not in s:
                raise TrainError(f"{self.ckpt_path}: no {self.cfg.method} state in this checkpoint")
            self.method.load_state_dict(s["method"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        # the LR of the next step from *this* config's schedule (a resume may extend --max-steps)
        lam = lr_lambda(self.cfg)
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * lam(self.sched.last_epoch)
        self.scaler.load_state_dict(s["scaler"])
        self.loader.load_state_dict(s["loader"])
        set_rng_state(self.gen, s["rng"] if "rng_ranks" not in s else s["rng_ranks"][self.dist.rank])
        self.step, self.losses = int(s["step"]), list(s["losses"])
        if self.ema and "ema" in s:
            self.ema.load_state_dict(s["ema"])
        elif self.ema:  # EMA switched on at this resume: average from the loaded weights on
            self.ema.reset()


def write_atomic(state: dict, path: str) -> None:
    """torch.save to a fresh private temporary file, then a rename: a kill mid-write leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def draw_loss_curve(losses: list[float], path: str, size=(640, 360), val: list = ()) -> None:
    """A loss-vs-step PNG with pillow: raw losses in grey, a 20-step running mean in blue, the held-out validation
    loss (`val`: (index, value) pairs) in red."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 20, W - 20, H - 40
    d.rectangle([left, top, right, bottom], outline="black")
    if losses:
        lo, hi = min(losses + [v for _, v in val]), max(losses + [v for _, v in val])
        hi = hi if hi > lo else lo + 1e-8
        x = lambda i: left + (right - left) * i / max(1, len(losses) - 1)
        y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
        if len(losses) > 1:
            d.line([(x(i), y(v)) for i, v in enumerate(losses)], fill=(170, 170, 170))
            k = max(1, min(20, len(losses) // 5))
            mean = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                    for i in range(len(losses))]
            d.line([(x(i), y(v)) for i, v in enumerate(mean)], fill=(30, 80, 220), width=2)
        if val:  # --val-loss-every: a red dot per evaluation, joined
            pts = [(x(i), y(v)) for i, v in val]
            if len(pts) > 1:
                d.line(pts, fill=(210, 40, 40), width=2)
            for px, py in pts:
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(210, 40, 40))
        d.text((4, top), f"{hi:.4f}", fill="black")
        d.text((4, bottom - 10), f"{lo:.4f}", fill="black")
    d.text((left, bottom + 8), f"step 1 ... {len(losses)}   (grey: loss, blue: running mean"
           + (", red: held-out validation loss)" if val else ")"), fill="black")
    with atomic_path(path) as tmp:  # a link planted at loss.png is replaced, not written through
        img.save(tmp)
