"""Stopping a training run cleanly: Ctrl-C (SIGINT) or SIGTERM ends it at a step boundary with a checkpoint.

    first signal    noted only; the step in flight finishes (so a resume repeats the uninterrupted run exactly),
                    then the loop writes checkpoint.pt at that step, stopped.txt saying why and how to resume, and
                    ends with `Stopped` (train.py: one line with the `--resume` command, exit 128 + signal number:
                    130 for SIGINT, 143 for SIGTERM, the shell's convention)
    second signal   exits at once (os._exit). checkpoint.pt is only ever replaced by an atomic rename, so the
                    previous checkpoint is intact; stopped.txt says which step it holds

`StopGuard` is the loop's side: a context around the steps that installs the handlers, and `check()` called between
steps. Any exception that ends the steps (a NaN loss, a full disk, out of memory) also leaves stopped.txt, so a run
folder that stopped says why (unless by SIGKILL, which no process can catch; its last checkpoint still resumes).
Outside the loop (loading, the world's before/after samples), `raise_on_signals()` turns both signals into
`Interrupted`, a KeyboardInterrupt, so the commands end with one line.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_NOTE = "stopped.txt"  # in the run folder: one line, why the run stopped and the command that continues it


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the training steps (`raise_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class Stopped(Exception):
    """The loop stopped at a step boundary on a signal, after writing a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, run_dir: str):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(f"stopped by {signal_name(signum)} at step {step} (checkpoint saved); "
                         f"resume with: {resume_command(run_dir)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def resume_command(run_dir: str) -> str:
    """The shell command that continues the run in run_dir, as typed in the current folder."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "train.py")
    try:
        rel = os.path.relpath(script)
        script = script if rel.startswith(os.pardir) else rel  # `train.py` from the repository, else absolute
    except ValueError:  # another drive (Windows)
        pass
    return f"python {shlex.quote(script)} --resume {shlex.quote(run_dir)}"


def write_stop_note(run_dir: str, line: str) -> None:
    """stopped.txt <- line, by a temporary file and a rename (a reader never sees half a line)."""
    path = os.path.join(run_dir, STOP_NOTE)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        try:
            os.remove(tmp)  # a leftover of a crashed process with this id (a link is removed, not followed)
        except FileNotFoundError:
            pass
        with open(tmp, "x") as f:  # exclusive: never written through a planted file or link
            f.write(line + "\n")
        os.replace(tmp, path)
    except OSError:  # a full disk must not hide the reason the run stopped: stderr still has it
        try:
            os.remove(tmp)
        except OSError:
            pass


def _can_install() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal works in the main thread only


def raise_on_signals():
    """SIGINT and SIGTERM raise `Interrupted` at once (SIGTERM would otherwise kill without a word) until the
    returned function is called, which puts the previous handlers back."""
    def _raise(signum, frame):
        raise Interrupted(signum)
    old = {s: signal.signal(s, _raise) for s in SIGNALS} if _can_install() else {}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


class StopGuard:
    """The training loop's signal handling and stop note. `trainer` needs .step, .run_dir, .save_checkpoint() and
    .ckpt_path.

        with StopGuard(trainer) as stop:
            while trainer.step < max_steps:
                stop.check()      # a signal since the last step: checkpoint, stopped.txt, raise Stopped
                ...one step...
    """

    def __init__(self, trainer, err=sys.stderr):
        self.trainer, self.err = trainer, err
        self.signum = None  # the first signal received, until check() acts on it

    def __enter__(self):
        # a stale note from an earlier stop: this (resumed) run is going again
        try:
            os.remove(os.path.join(self.trainer.run_dir, STOP_NOTE))
        except FileNotFoundError:
            pass
        # a resumed run starts from a checkpoint at its current step
        self.loaded = self.trainer.step if os.path.isfile(self.trainer.ckpt_path) else None
        self.old = {s: signal.signal(s, self._handle) for s in SIGNALS} if _can_install() else {}
        return self

    def _handle(self, signum, frame):
        t = self.trainer
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal_name(signum)}: stopping at the end of this step (checkpoint, then exit); "
                  f"{signal_name(signum)} again to quit at once", file=self.err, flush=True)
            return
        # second signal: no more work. Whatever checkpoint.pt holds is complete (atomic rename).
        line = f"stopped at once by a second {signal_name(signum)} after step {t.step}; {self._resume_part()}"
        write_stop_note(t.run_dir, line)
        print(line, file=self.err, flush=True)
        os._exit(128 + signum)

    def _resume_part(self) -> str:
        """How to go on: the checkpoint's step (as the loop last saved it, or as a resumed run loaded it) and the
        command; or, before any checkpoint, that there is nothing to resume."""
        t = self.trainer
        saved = getattr(t, "saved_step", self.loaded)
        if saved is None:
            return "no checkpoint was written yet, so there is nothing to resume: start the run again"
        return f"the checkpoint holds step {saved}; resume with: {resume_command(t.run_dir)}"

    def check(self) -> None:
        """At a step boundary: after a signal, save a checkpoint at the current step and raise `Stopped`."""
        t = self.trainer
        dist = getattr(t, "dist", None)
        if dist is not None and dist.world > 1:  # torchrun: a signal seen by any rank stops every rank here
            self.signum = dist.agree_max(self.signum or 0, t.device) or None
        if self.signum is None:
            return
        t.save_checkpoint()
        stop = Stopped(self.signum, t.step, t.run_dir)
        if dist is None or dist.is_main:
            write_stop_note(t.run_dir, str(stop))
        raise stop

    def __exit__(self, kind, exc, tb):
        for s, h in self.old.items():
            signal.signal(s, h)
        if exc is not None and not isinstance(exc, Stopped):  # NaN loss, full disk, out of memory, ...
            t = self.trainer
            why = (f"{kind.__name__}" if isinstance(exc, KeyboardInterrupt) or not str(exc).strip()
                   else "an error: " + " ".join(str(exc).split()))
            write_stop_note(t.run_dir, f"stopped by {why} after step {t.step}; {self._resume_part()}")
        return False
