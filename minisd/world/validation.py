"""What a style run on the embedded world adds to the generic training loop (minisd/train/): its own validation
prompts, and the before/after grids read by the probe.

World runs are recognised by their data folder: `world.write_folder` writes `attributes.jsonl` (the ground truth of
every image) beside the images. train.py passes `validation_prompts` below to the Trainer and calls
`sample_and_score` before the first step and after the last; both sample through `sampling` (minisd/train/
validation.py), which leaves every RNG, dtype and train mode of the run as it was, so the losses do not change.
"""
from __future__ import annotations

import json
import os

from PIL import Image

from ..formats.safe_write import atomic_path, write_text
from ..train.validation import sampling
from ..train.validation import validation_prompts as given_prompts
from . import sample
from .probe import score

WORLD_PROMPTS = 4  # held-out prompts of a world run's validation grid


def is_world_folder(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "attributes.jsonl"))


def validation_prompts(cfg) -> list[str]:
    """The prompts of the validation grids: --validation-prompts, else (world runs) held-out prompts in the style."""
    if cfg.validation_prompts or not is_world_folder(cfg.data):
        return given_prompts(cfg)
    if getattr(cfg, "method", "lora") == "ti":  # issue 17: a textual inversion learns the subject, named by its token
        return [c for _, c in sample(WORLD_PROMPTS, seed=10_000 + cfg.seed, split="heldout", subject=True,
                                     token=cfg.ti_token)]
    # the seed of the before/after grids' held-out prompts: the validation grid shows their first few
    return [c for _, c in sample(WORLD_PROMPTS, seed=10_000 + cfg.seed, split="heldout", style=cfg.style)]


def sample_and_score(trainer, tag: str, subject: str | None = None) -> dict:
    """World runs only: draw held-out prompts in the trained style, save a 4x4 grid `samples_<tag>.png` and the
    probe's reading of every image (`probe_<tag>.json`): style adoption, shape and colour accuracy.
    subject: the subject's token (textual inversion, issue 17): half the prompts name the subject with it, half are
    ordinary plain prompts; the probe reads subject fidelity and subject leak instead of the style."""
    cfg = trainer.cfg
    if subject:
        half = cfg.n_eval // 2
        pairs = [p for pair in zip(sample(half, seed=10_000 + cfg.seed, split="heldout", subject=True, token=subject),
                                   sample(half, seed=20_000 + cfg.seed, split="heldout")) for p in pair]
    else:
        pairs = sample(cfg.n_eval, seed=10_000 + cfg.seed, split="heldout", style=cfg.style)
    attrs, prompts = [a for a, _ in pairs], [c for _, c in pairs]
    images = []
    with sampling(trainer) as pipe:  # EMA weights if on; dtypes, RNGs and train mode left as they were
        for i in range(0, len(prompts), 8):  # chunks of 8 prompts bound the attention memory
            images += pipe(prompts[i:i + 8], steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, seed=cfg.seed + i)
    side = trainer.resolution
    grid = Image.new("RGB", (4 * side, 4 * side), "white")
    for i, im in enumerate(images[:16]):
        grid.paste(im.resize((side, side)), ((i % 4) * side, (i // 4) * side))
    with atomic_path(os.path.join(trainer.run_dir, f"samples_{tag}.png")) as tmp:  # never through a planted link
        grid.save(tmp)
    res = score(images, attrs)
    write_text(os.path.join(trainer.run_dir, f"probe_{tag}.json"), json.dumps(res, indent=2))
    pct = lambda v: "-" if v is None else f"{100 * v:.0f} %"
    if subject:
        trainer.log(f"probe {tag}: subject {pct(res['subject'])}, subject leak {pct(res['subject_leak'])}, shape "
                    f"{pct(res['shape'])}, colour {pct(res['colour'])} ({len(images)} held-out prompts, half "
                    f"'{subject} emblem')")
        return res
    trainer.log(f"probe {tag}: style adoption {pct(res['style_adoption'])}, shape {pct(res['shape'])}, "
                f"colour {pct(res['colour'])} ({len(images)} held-out '{cfg.style}' prompts)")
    return res
