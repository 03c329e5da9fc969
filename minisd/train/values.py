"""The values of a training run checked where they enter: flags, a TOML file, a resumed run's config.json.

config.py's `TrainConfig.validate` checks how options combine; this file checks each value on its own:

    check_type        a TOML / config.json value of its field's type: `max_steps = true` is not 1, `lr = "1e-3"`
                      not a number, `rank = [8]` or a nested table not an option (one line naming file and field)
    validate_values   finite numbers in range: no NaN / Inf anywhere, --lr > 0, --max-grad-norm >= 0,
                      --warmup-steps >= 0, --min-snr-gamma >= 0, ...; --device a device this machine has; path
                      options free of NUL bytes
    check_resume      --resume refuses, before anything is written, what changes the meaning of the saved optimizer
                      state (another optimizer, adapter kind, rank or target set) and a config.json that would
                      steer writes outside the run folder (a `cache_dir` elsewhere that the command line does not
                      name again)
"""
from __future__ import annotations

import dataclasses
import math
import os

from ..formats.checks import check_device, number

# (lowest, highest, lowest excluded) of the numeric options; None: no bound. Ranges combined with other options
# (dropouts < 1, flips <= 1, ...) stay in TrainConfig.validate.
RANGES = {
    "lr": (0, None, True), "te_lr": (0, None, False), "te1_lr": (0, None, False), "te2_lr": (0, None, False),
    "alpha": (0, None, True), "conv_alpha": (0, None, True), "weight_decay": (0, None, False),
    "warmup_steps": (0, None, False), "max_grad_norm": (0, None, False), "min_snr_gamma": (0, None, False),
    "noise_offset": (0, None, False), "input_perturbation": (0, None, False), "sample_cfg": (0, None, False),
    "resolution": (0, 1 << 16, False), "n_images": (1, None, False), "save_every": (0, None, False),
    "sample_steps": (1, None, False), "n_eval": (0, None, False), "seed": (0, 2**63 - 1, False),
    "bucket_step": (0, 1 << 16, False), "bucket_min": (0, 1 << 16, False), "bucket_max": (0, 1 << 16, False),
}
# what the saved optimizer state, adapter tensors and data position are made of: a resume must keep them
STATE_FIELDS = ("optimizer", "network", "rank", "conv_rank", "targets", "train_text_encoder", "batch_size",
                "grad_accum", "buckets", "distill_train")
# options naming a place a run writes to
WRITE_PATHS = ("cache_dir",)


def _kind(field: dataclasses.Field) -> tuple[str, bool]:
    """("int" | "float" | "bool" | "str", may be None) of a TrainConfig field."""
    t = field.type if isinstance(field.type, str) else field.type.__name__
    return t.replace("Optional[", "").rstrip("]"), t.startswith("Optional")


def check_type(field: dataclasses.Field, value, where: str) -> None:
    """A value read from a file (or a flag) for a TrainConfig field: of the field's type, a float finite."""
    name = field.name
    kind, optional = _kind(field)
    what = f"--{name.replace('_', '-')}" if where == "command line" else f"{where}: {name}"
    if value is None and optional:
        return
    ok = {"bool": isinstance(value, bool), "str": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        want = {"bool": "true or false", "str": "a string", "int": "a whole number", "float": "a number"}[kind]
        shown = "a table" if isinstance(value, dict) else "a list" if isinstance(value, list) else repr(value)
        raise ValueError(f"{what} must be {want}{' or null' if optional else ''}, got {shown[:80]}")
    if kind == "float" and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    if kind == "str" and "\0" in value:
        raise ValueError(f"{what} holds a NUL byte")


def validate_values(cfg) -> None:
    """Every number finite and in RANGES, the device one this machine has (ValueError naming the flag)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        kind, _ = _kind(f)
        if v is None or kind not in ("int", "float"):
            continue
        flag = "--" + f.name.replace("_", "-")
        lo, hi, lo_open = RANGES.get(f.name, (None, None, False))
        number(flag, v, lo=lo, hi=hi, lo_open=lo_open, integer=kind == "int")
    if cfg.device != "auto":
        check_device(cfg.device)


def check_resume(saved, cfg, run_dir: str, given: set) -> None:
    """Refuse a resume whose options change what the checkpoint's state means, or whose saved config.json would
    steer writes outside the run folder. Called before anything is written."""
    where = os.path.join(run_dir, "config.json")
    if saved.from_scratch:  # a LoRA run's folder never says this: it would start a pretraining instead
        raise ValueError(f"{where}: from_scratch = true is not a fine-tuning run's option")
    changed = [n for n in STATE_FIELDS if getattr(saved, n) != getattr(cfg, n)]
    if changed:
        diffs = ", ".join(f"--{n.replace('_', '-')} {getattr(saved, n)!r} -> {getattr(cfg, n)!r}" for n in changed)
        raise ValueError(f"--resume {run_dir}: {diffs} would change what its checkpoint's optimizer state and "
                         "data position mean; start a new run (--out) instead")
    run = os.path.realpath(run_dir)
    for name in WRITE_PATHS:
        v = getattr(saved, name)
        if v is None or name in given:
            continue  # not set, or named again on the command line / in the TOML file
        full = os.path.realpath(v if os.path.isabs(v) else os.path.join(os.getcwd(), v))
        if os.path.commonpath([full, run]) != run:
            raise ValueError(f"{where}: {name} {v!r} is outside the run folder: a run folder's config.json does not "
                             f"steer writes elsewhere; pass --{name.replace('_', '-')} {v} to confirm")
