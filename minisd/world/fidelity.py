"""What minisd-tiny (or any model) draws for the world's held-out prompts, read by the probe: prompt fidelity.

The model is asked for images of held-out (shape, colour, position) triples, compositions no training caption
ever showed (`world.is_heldout`), and the probe (`minisd/world/probe.py`) reads what is in them:

  * `probe_fidelity`: full captions (template 0), scored per attribute and all at once (`probe.score`);
  * `probe_partial`: partial captions of each of the 30 ways to name only some of shape, colour, size, position and
    background (`world.sample_partial`), each named attribute scored over the prompts that name it, and the swap
    rate, a colour given to the wrong object (`probe.score_named`);
  * `caption_grid` / `grid_prompts`: the captioned grid of held-out prompts that a plain `python sample.py` draws.

probe.py scores the probe itself on true renders (`probe eval`); this file scores a generating model through it.
The command is pretraining's `eval` subcommand, beside the training it judges:

    python -m minisd.world.pretrain eval --model weights/minisd-tiny --n 64 --partial 16     # probe fidelity
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from PIL import Image, ImageDraw, ImageFont

from .. import world
from ..config import WEIGHTS_DIR
from ..model import StableDiffusion

DEFAULT_MODEL = os.path.join(WEIGHTS_DIR, "minisd-tiny")  # the shipped minisd-tiny, pretrain.py's default --out


def heldout_prompts(n: int, seed: int = 777) -> list:
    """n (attributes, caption) pairs of held-out (shape, colour, position) triples, template 0."""
    return world.sample(n, seed, split="heldout", template=0)


@torch.no_grad()
def generate(model: StableDiffusion, prompts: list[str], steps: int = 20, cfg_scale: float = 3.0, seed: int = 0,
             device="cpu", batch: int = 256, sampler: str = "ddim") -> list:
    from ..pipeline import Pipeline
    pipe = Pipeline(model, device=device)
    out = []
    for i in range(0, len(prompts), batch):
        out += pipe(prompts[i:i + batch], steps=steps, cfg_scale=cfg_scale, seed=seed + i, sampler=sampler)
    return out


def probe_fidelity(model: StableDiffusion, n: int = 64, steps: int = 20, cfg_scale: float = 3.0, seed: int = 777,
                   device="cpu") -> dict:
    """Probe scores (shape, colour, size, position, background, all) of images drawn from n held-out prompts."""
    from .probe import load_probe, score
    pairs = heldout_prompts(n, seed)
    images = generate(model, [c for _, c in pairs], steps, cfg_scale, seed, device)
    res = score(images, [a for a, _ in pairs], load_probe(device="cpu"))
    return {k: res[k] for k in ("n", "shape", "colour", "size", "position", "background", "all")}


def partial_prompts(n: int, seed: int = 778) -> list:
    """n (attributes, caption, named) per partial kind: every subset of world.NAMEABLE but the full one (30 kinds),
    attributes from the held-out split, a wording per prompt from world.PHRASINGS."""
    kinds = [s for s in world.SUBSETS if len(s) < len(world.NAMEABLE)]
    return [row for i, subset in enumerate(kinds) for row in world.sample_partial(n, seed + i, "heldout", subset)]


def probe_partial(model: StableDiffusion, n: int = 16, steps: int = 20, cfg_scale: float = 3.0, seed: int = 778,
                  device="cpu") -> tuple[dict, dict]:
    """Probe scores of images drawn from n partial held-out prompts of each kind (`partial_prompts`): the totals
    over all kinds (`probe.score_named`: each attribute over the prompts that name it, all named right, swap
    rate) and the same per kind, {named subset: scores}."""
    from .probe import load_probe, score_named
    rows = partial_prompts(n, seed)
    images = generate(model, [c for _, c, _ in rows], steps, cfg_scale, seed, device)
    probe = load_probe(device="cpu")
    total = score_named(images, [a for a, _, _ in rows], [s for _, _, s in rows], probe)
    kinds = {}
    for i in range(0, len(rows), n):
        part = rows[i:i + n]
        kinds[part[0][2]] = score_named(images[i:i + n], [a for a, _, _ in part], [s for _, _, s in part], probe)
    return total, kinds


def _pct(res: dict, keys) -> str:
    return "  ".join(f"{k} {'-' if res[k] is None else f'{100 * res[k]:.1f}%'}" for k in keys)


def caption_grid(images: list, captions: list[str], cols: int = 4, scale: int = 2) -> Image.Image:
    """Images (upscaled `scale`x, nearest) in a grid, each caption wrapped under its image in PIL's default font."""
    font = ImageFont.load_default()
    side = images[0].width * scale
    wrap = []
    for c in captions:  # greedy word wrap to the cell width (~6 px per character in the default font)
        lines, cur = [], ""
        for w in c.split():
            if cur and len(cur) + 1 + len(w) > side // 6:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        wrap.append(lines + [cur])
    text_h = 12 * max(len(w) for w in wrap) + 4
    rows = (len(images) + cols - 1) // cols
    pad = 4
    grid = Image.new("RGB", (cols * (side + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, wrap)):
        x, y = pad + (i % cols) * (side + pad), pad + (i // cols) * (side + text_h + pad)
        grid.paste(im.resize((side, side), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + side + 2 + 12 * j), line, fill="black", font=font)
    return grid


def grid_prompts(n: int = 8, seed: int = 3) -> list[str]:
    """n held-out prompts for the default grid: one per shape first, so the grid shows the whole vocabulary."""
    pairs, seen = [], set()
    for a, c in heldout_prompts(200, seed):
        if c not in pairs and (a.shape not in seen or len(seen) == len(world.SHAPES)):
            seen.add(a.shape)
            pairs.append(c)
        if len(pairs) == n:
            break
    return pairs


# ---------------------------------------------------------------------------------------------------- command

def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m minisd.world.pretrain eval",
                                description="Probe fidelity of a model on held-out world prompts: full captions "
                                            "(template 0) and, with --partial, prompts naming only some attributes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=64, help="held-out full-caption prompts (0: none)")
    p.add_argument("--partial", type=int, default=0,
                   help="held-out partial prompts of each of the 30 kinds (which attributes are named; 0: none); "
                        "prints each kind, the totals and the swap rate (a colour given to the wrong object)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[3.0], help="guidance scale(s) to compare")
    p.add_argument("--seed", type=int, default=777, help="full prompts; partial prompts use seed + 1 onwards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.n < 0 or a.partial < 0 or a.n + a.partial == 0:
        p.error("--n and --partial must be >= 0, and one of them > 0")
    if a.steps < 1:
        p.error("--steps must be at least 1")
    from ..formats import load_model
    model = load_model(a.model).float()
    for c in a.cfg:
        t0 = time.time()
        if a.n:
            res = probe_fidelity(model, a.n, a.steps, c, a.seed, a.device)
            print(f"cfg {c} full: n {res['n']}  " + _pct(res, list(res)[1:]) + f"  ({time.time() - t0:.0f}s)",
                  flush=True)
        if a.partial:
            t0 = time.time()
            total, kinds = probe_partial(model, a.partial, a.steps, c, a.seed + 1, a.device)
            for named, res in kinds.items():
                print(f"cfg {c} partial {'+'.join(named):<32} " + _pct(res, [*named, "all", "swap"]), flush=True)
            worst = min((res[k], k, "+".join(named)) for named, res in kinds.items() for k in named)
            print(f"cfg {c} partial: n {total['n']}  " + _pct(total, list(total)[1:])
                  + f"  worst cell {worst[2]}:{worst[1]} {100 * worst[0]:.1f}%  ({time.time() - t0:.0f}s)", flush=True)
    return 0
