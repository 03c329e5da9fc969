"""The run folder of train.py: checked before anything is made, locked while a run uses it, and left as it was when
a run is refused.

    preflight(cfg, run_dir)   before anything is written: the run folder may be made (absent or empty; with
                              --overwrite an earlier run folder holding only what train.py writes, and neither
                              --data, --model, ... nor the working directory; with --resume a run folder no other
                              train.py is using), the data folder is readable and holds images, --cache-dir may be
                              written, and the model loads (it is returned, so the Trainer does not load it twice).
    RunFolder(cfg, run_dir)   context manager: makes the folder (a run it replaces is moved aside), locks it
                              (formats/safe_write.py `RunLock`: a second train.py on it is refused with one line), and
                              when the run ends before `started()` - refused, or Ctrl-C while setting up - removes
                              what it made and puts the replaced run back. After `started()` the folder stays.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ..formats import load_model
from ..formats.safe_write import (TMP_PREFIX, Kind, RunLock, WriteError, check_folder_dest, check_parent,
                                  remove_leftovers)
from .cache import check_cache_dir
from .data import DataError, scan

# What train.py writes into a run folder; --overwrite replaces a folder holding nothing else. (The legacy `.tmp`
# names are leftovers of writes killed before safe_write.py.)
RUN_FILES = {"config.json", "checkpoint.pt", "loss.jsonl", "loss.png", "lora.safetensors", "lora_kohya.safetensors",
             "lora_diffusers.safetensors", "lora_raw.safetensors", "profile.json", "samples_before.png",
             "samples_after.png", "probe_before.json", "probe_after.json", "validation", "data", RunLock.NAME,
             "checkpoint.pt.tmp", "loss.jsonl.tmp", "stopped.txt",
             # the other methods' outputs: full fine-tune, textual inversion, hypernetwork, distillation
             "model", "model.safetensors", "embedding.safetensors", "learned_embeds.safetensors",
             "hypernetwork.safetensors", "student", "student.safetensors", "student-diffusers"}
RUN = Kind("train.py run folder", ("config.json",), lambda n: n in RUN_FILES)


def inputs(cfg, world_data: bool = False) -> list[str]:
    """What a run reads: never inside a folder --overwrite replaces (a new world run writes its data itself)."""
    return [p for p in (None if world_data else cfg.data, cfg.model, cfg.vae, cfg.init_adapter, cfg.config,
                        cfg.cache_dir, cfg.validation_prompts) if p and os.path.exists(p)]


def preflight(cfg, run_dir: str, world_data: bool):
    """Every check that needs no run folder, before one is made (module docstring); returns the loaded model."""
    busy = RunLock.holder(run_dir)
    if busy is not None:
        raise RunLock(run_dir).busy(busy)
    if cfg.resume:
        if cfg.overwrite:
            raise ValueError("--overwrite replaces a run folder, --resume continues one: give one of them")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise WriteError(f"--resume {run_dir}: the folder is not writable")
        sub = os.path.join(run_dir, "validation")  # grids are written into it: a link would lead them elsewhere
        if os.path.islink(sub) or (os.path.lexists(sub) and not os.path.isdir(sub)):
            raise WriteError(f"{sub} is not a folder of the run (a link or a file); move it away to resume")
    else:
        check_folder_dest(run_dir, cfg.overwrite, RUN, protect=inputs(cfg, world_data))
    for flag, path in (("--vae", cfg.vae), ("--init-adapter", cfg.init_adapter)):
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path}: no such file or folder")
    if not world_data:
        check_data(cfg.data)
    check_cache_dir(cfg.cache_dir)
    return load_model(cfg.model)


def check_data(folder: str) -> None:
    """The data folder can be read and holds at least one image (which ones are usable, the dataset decides)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such data folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"{folder}: the data folder is not readable")
    try:
        found = scan(folder)
    except OSError as e:
        raise DataError(f"{folder}: cannot read the data folder ({e.strerror})") from None
    if not found.examples:
        raise DataError(f"{folder}: no image in the data folder (.png, .jpg, ... with .txt captions, metadata.jsonl, "
                        "or kohya concept folders)")


class RunFolder:
    """The run folder, made and locked for the run (module docstring)."""

    def __init__(self, cfg, run_dir: str):
        self.path, self.resume = os.path.abspath(run_dir), bool(cfg.resume)
        self.made, self.adopted, self.old, self.begun = False, False, None, False
        self.lock = self.old_lock = None

    def __enter__(self) -> "RunFolder":
        if self.resume:
            self.lock = RunLock(self.path).acquire()
            remove_leftovers(self.path)  # private folders of writes a killed run left
            return self
        parent = os.path.dirname(self.path)
        check_parent(self.path)
        if os.path.isdir(self.path) and os.listdir(self.path):  # --overwrite, allowed by preflight: move it aside
            self.old_lock = RunLock(self.path).acquire()  # a train.py still in it refuses us
            self.old = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
            os.rename(self.path, self.old)  # onto the empty folder of ours just made
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(self.path)
            self.made = True
        except FileExistsError:  # an empty folder that was there (emptied again if refused), or another train.py's
            self.adopted = True
        except OSError as e:
            self._undo()
            raise WriteError(f"{self.path}: cannot make the run folder ({e.strerror})") from None
        try:
            self.lock = RunLock(self.path).acquire()
        except WriteError:
            self.made = self.adopted = False  # someone else's now: never touch it
            self._undo()
            raise
        return self

    def started(self) -> None:
        """Training has begun: the folder is kept whatever happens next, and a run it replaced is removed."""
        self.begun = True
        if self.old:
            shutil.rmtree(self.old, ignore_errors=True)
            self.old = None
        if self.old_lock:
            self.old_lock.release()
            self.old_lock = None

    def _undo(self) -> None:
        """Refused before training began: remove what this run made, put the replaced run back."""
        if self.made:
            shutil.rmtree(self.path, ignore_errors=True)
            self.made = False
        elif self.adopted:  # the empty folder that was there: emptied again
            for name in os.listdir(self.path):
                p = os.path.join(self.path, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            self.adopted = False
        if self.old:
            try:
                os.rename(self.old, self.path)
                self.old = None
            except OSError:  # another train.py made the folder meanwhile: the old run stays beside it
                pass
        if self.old_lock:
            self.old_lock.release()
            self.old_lock = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.begun:
            self._undo()
        if self.lock:
            self.lock.release()
        return False
