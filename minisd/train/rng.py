"""The random state of a training run, saved and restored as a whole.

A step draws from the trainer's own CPU generator (the VAE sample, t, ε: minisd/trainer.py `Draws`), adapter
dropout from the global torch generators (CPU and CUDA); the numpy and python ones are kept too, for anything else
that draws. Checkpoints save all of them, so a resumed run continues the exact loss sequence of an uninterrupted
one; validation grids save and restore them around sampling, so a run with grids draws what one without does.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(gen: torch.Generator) -> dict:
    """Every RNG a step may touch (tensors and ints only, so torch.load(weights_only=True) reads it)."""
    np_state = np.random.get_state()
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(gen: torch.Generator, s: dict) -> None:
    gen.set_state(s["gen"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
