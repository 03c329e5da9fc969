"""`train.py --profile`: where the time of a training step goes, stage by stage.

What it changes: nothing in the numbers; while profiling, each stage starts and ends with a device synchronisation
(see below), which costs a little throughput. Off, it is a no-op.

    prof = StageTimer(enabled=True, device=torch.device("cuda"))
    with prof.step():                       # one optimizer step
        with prof.stage("data"): ...        # any number of stages, repeated (grad_accum) or nested in the step
        with prof.stage("backward"): ...
    print(prof.table()); prof.save("profile.json")

Why synchronize. CUDA kernels run asynchronously: the Python call that launches the UNet forward returns long before
the GPU is done, and the time shows up in whatever later waits for a result (usually `loss.item()` or the optimizer).
Wall-clock timing on CUDA is only meaningful with `torch.cuda.synchronize()` at both edges of every stage; that
costs a little throughput, which is why it happens only while profiling. On the CPU every op is synchronous and the
plain wall clock is right.

The first `warmup` steps are left out of the averages: they include cuDNN / oneDNN algorithm search, the allocator
growing its pools and lazy initialisation, none of which recurs. Time inside a step but outside every stage (noise
sampling, the loss, `loss.item()`, logging) is reported as "other", so the rows add up to the step time.

Profiling off: `stage()` and `step()` return one shared no-op context, so the training loop pays nothing.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext

import torch

# the stages of a fine-tuning step, in the order they run (trainer.py); others may be added freely
STAGES = ("data", "vae_encode", "text_encoders", "unet_forward", "backward", "optimizer")
_OFF = nullcontext()


class StageTimer:
    """Accumulates seconds per stage for each step; `summary()` averages the steps after the warm-up."""

    def __init__(self, enabled: bool, device: torch.device | str = "cpu", warmup: int = 3):
        self.enabled, self.warmup = enabled, warmup
        self.cuda = torch.device(device).type == "cuda"
        self.records: list[dict] = []   # one {"step": s, "stages": {name: s}} per finished step
        self._current: dict | None = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # wait for the queued kernels, so they count where they were launched
        return time.perf_counter()

    def stage(self, name: str):
        """Context manager timing one stage of the current step (a no-op when disabled or outside a step)."""
        if not self.enabled or self._current is None:
            return _OFF
        return self._time_stage(name)

    @contextmanager
    def _time_stage(self, name: str):
        t0 = self._now()
        try:
            yield
        finally:
            stages = self._current["stages"]
            stages[name] = stages.get(name, 0.0) + self._now() - t0

    def step(self):
        """Context manager around one whole optimizer step."""
        return self._time_step() if self.enabled else _OFF

    @contextmanager
    def _time_step(self):
        self._current = {"stages": {}}
        t0 = self._now()
        try:
            yield
        finally:
            self._current["step"] = self._now() - t0
            self.records.append(self._current)
            self._current = None

    def summary(self) -> dict:
        """Averages over the measured steps: ms per step and % of the step for every stage, plus "other"."""
        kept = self.records[self.warmup:] or self.records[-1:]  # a run shorter than the warm-up: its last step
        n = len(kept)
        if n == 0:
            return {"steps_measured": 0, "warmup_skipped": 0, "step_ms": 0.0, "stages": {}}
        step_ms = 1000 * sum(r["step"] for r in kept) / n
        names = [s for s in STAGES if any(s in r["stages"] for r in kept)]
        names += sorted({s for r in kept for s in r["stages"]} - set(names))
        stages = {}
        for s in names:
            ms = 1000 * sum(r["stages"].get(s, 0.0) for r in kept) / n
            stages[s] = {"ms_per_step": ms, "percent": 100 * ms / step_ms if step_ms else 0.0}
        other = max(0.0, step_ms - sum(v["ms_per_step"] for v in stages.values()))
        stages["other"] = {"ms_per_step": other, "percent": 100 * other / step_ms if step_ms else 0.0}
        return {"steps_measured": n, "warmup_skipped": len(self.records) - n, "step_ms": step_ms,
                "synchronized": self.cuda, "stages": stages}

    def table(self) -> str:
        """The summary as a fixed-width table for the end-of-run printout."""
        s = self.summary()
        clock = "CUDA-synchronized" if s.get("synchronized") else "wall clock"
        lines = [f"profile: {s['steps_measured']} steps measured ({s['warmup_skipped']} warm-up skipped), "
                 f"{clock}", f"  {'stage':<15}{'ms/step':>10}{'%':>8}"]
        for name, v in s["stages"].items():
            lines.append(f"  {name:<15}{v['ms_per_step']:>10.2f}{v['percent']:>7.1f}%")
        lines.append(f"  {'step':<15}{s['step_ms']:>10.2f}{100.0 if s['step_ms'] else 0.0:>7.1f}%")
        return "\n".join(lines)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.summary(), f, indent=2)
