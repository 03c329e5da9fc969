"""Images in the middle of a training run, without disturbing it: validation grids every N steps (and, through
`sampling`, the world runs' before/after grids with the probe's scores: minisd/world/validation.py).

`validate(trainer, prompts)` writes `<run>/validation/step_000100.png`: one image per prompt, captioned, drawn with
the same seed at every step so the grids of a run can be compared side by side (what changes is the adapter only).

Leaving training exactly as it was is the point of `sampling(trainer)`:
  * every RNG a training step draws from (the trainer's generator, torch CPU/CUDA, numpy, python) is saved before and
    restored after, so a run with validation has the loss sequence of a run without, and resume stays exact;
  * the model goes to eval mode (adapter dropout off) and back to train mode;
  * no dtype is touched: the pipeline is told not to cast, because casting the UNet to bf16 would also round the
    fp32 adapter weights the optimizer updates;
  * with EMA on, the images show the EMA weights (what the final files hold); the raw weights come back exactly;
  * networks that latent / text caching had moved off the GPU go back off it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from PIL import Image, ImageDraw, ImageFont

from ..formats.safe_write import atomic_path, ensure_folder
from ..pipeline import Pipeline
from .cache import offload_cached
from .rng import rng_state, set_rng_state


def parse_prompts(spec: str) -> list[str]:
    """`a cat|a dog` -> ["a cat", "a dog"]; a .txt file (or any existing file) -> its non-empty lines."""
    if spec.endswith(".txt") or os.path.isfile(spec):
        from ..formats.images import read_text_file
        try:  # a regular UTF-8 file: a FIFO would block the read
            prompts = [line.strip() for line in read_text_file(spec).splitlines()]
        except ValueError as e:
            raise ValueError(f"--validation-prompts {spec}: {e}") from None
    else:
        prompts = [p.strip() for p in spec.split("|")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--validation-prompts {spec!r}: no prompt in it")
    return prompts


def validation_prompts(cfg) -> list[str]:
    """The prompts of the validation grids: --validation-prompts (the embedded world has defaults of its own:
    minisd/world/validation.py)."""
    if cfg.validation_prompts:
        return parse_prompts(cfg.validation_prompts)
    raise ValueError("--validate-every needs --validation-prompts ('a cat|a dog', or a .txt file with one prompt "
                     "per line) when the data is not the embedded world")


@contextmanager
def sampling(trainer):
    """A Pipeline over the trainer's model that leaves the training state exactly as it was (module docstring)."""
    saved = rng_state(trainer.gen)
    try:
        with trainer.eval_weights():
            yield Pipeline(trainer.model, device=trainer.device, dtype=trainer.amp_dtype or torch.float32, cast=False)
    finally:
        trainer.model.train()
        set_rng_state(trainer.gen, saved)
        offload_cached(trainer)  # the Pipeline brought cached-away VAE / text encoders back to the GPU


def validate(trainer, prompts: list[str]) -> str:
    """Draw `prompts` at the current step and write the captioned grid; returns its path."""
    cfg = trainer.cfg
    images = []
    with sampling(trainer) as pipe:
        for i in range(0, len(prompts), 8):  # chunks of 8 prompts bound the attention memory
            images += pipe(prompts[i:i + 8], steps=cfg.validation_steps, cfg_scale=5.0, seed=cfg.seed + i,
                           width=trainer.resolution, height=trainer.resolution)
    title = f"step {trainer.step}" + (" (EMA weights)" if cfg.ema_decay > 0 else "")
    folder = ensure_folder(os.path.join(trainer.run_dir, "validation"))  # a link planted there is refused
    path = os.path.join(folder, f"step_{trainer.step:06d}.png")
    with atomic_path(path) as tmp:  # a kill mid-write leaves no half-written grid, a planted link is not followed
        caption_grid(images, prompts, title).save(tmp)
    return path


def caption_grid(images: list[Image.Image], captions: list[str], title: str, cols: int = 4) -> Image.Image:
    """Images in rows of `cols`, each cell the image (128-256 px) over its wrapped caption, a title bar on top."""
    side = min(256, max(128, images[0].width))
    font = ImageFont.load_default()
    line_h, lines = 12, 4
    cell_h = side + line_h * lines + 6
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * side, 20 + rows * cell_h), "white")
    d = ImageDraw.Draw(grid)
    d.text((4, 4), title, fill="black", font=font)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * side, 20 + (i // cols) * cell_h
        # nearest-neighbour when enlarging keeps tiny images' pixels sharp
        grid.paste(im.resize((side, side), Image.NEAREST if im.width < side else Image.LANCZOS), (x, y))
        for j, text in enumerate(wrap(cap, side - 4, d, font)[:lines]):
            d.text((x + 2, y + side + 2 + j * line_h), text, fill="black", font=font)
    return grid


def wrap(text: str, width: int, d: ImageDraw.ImageDraw, font) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than the line gets a line of its own)."""
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and d.textlength(trial, font=font) > width:
            out.append(line)
            line = word
        else:
            line = trial
    return out + ([line] if line else [])
