"""The probe: a small CNN that reads a 64×64 image of the world (minisd/world/__init__.py) and names its attributes.

It scores generated images against the prompt they were made from: prompt fidelity (shape, colour, size, position,
background), style adoption after a style fine-tune, and subject adoption after DreamBooth / textual inversion.
One trunk, one linear head per attribute:

    shape (7)  colour (8)  size (2)  position (9)  background (8)  style (4, "plain" included)  subject (2)

Shape legend: B=batch, C=channels; images are (B, 3, 64, 64) floats in [0, 1].

The probe must be fair to a small diffusion model, whose pictures are soft, slightly noisy and colour-cast; so it is
trained with augmentation (`augment`): Gaussian blur, down/up-sampling (the VAE's softening), additive noise and a
per-channel colour jitter. The shipped weights (weights/probe.safetensors) were trained on the CPU with
`python -m minisd.world.probe train`; docs/WORLD.md records how well they read held-out images, clean and augmented.

CLI:  python -m minisd.world.probe train --out weights/probe.safetensors
      python -m minisd.world.probe score FOLDER          (PNGs + attributes.jsonl, as world.write_folder writes)
      python -m minisd.world.probe eval                  (accuracy on fresh held-out procedural images)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .. import world
from ..config import WEIGHTS_DIR
from . import Attributes

HEADS = {"shape": world.SHAPES, "colour": world.COLOURS, "size": world.SIZES, "position": world.POSITIONS,
         "background": world.COLOURS, "style": world.STYLES, "subject": ("no", "yes")}
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "probe.safetensors")


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # 0=Conv3x3, 1=BatchNorm, 2=ReLU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Probe(nn.Module):
    """Conv trunk down to a 4×4 map, read two ways: pooled over space (mean and max: *what* is there, wherever it
    is) and a 1×1-reduced 4×4 map flattened (*where* it is); one MLP layer, then a linear head per attribute.
    149k parameters, 0.6 MB in fp32; ~170 ms per training batch of 64 on one CPU core."""

    def __init__(self, widths=(16, 32, 48, 64, 96), strides=(1, 2, 2, 2, 2), where: int = 8, hidden: int = 128,
                 heads: dict[str, tuple[str, ...]] = HEADS):
        super().__init__()
        self.heads_spec = {k: tuple(v) for k, v in heads.items()}
        c, blocks = 3, []
        for w, s in zip(widths, strides):
            blocks.append(_block(c, w, s))
            c = w
        # the first block keeps full resolution: stripes (6 px) and dots (5 px) are gone after one stride-2 conv
        self.trunk = nn.Sequential(*blocks)
        side = 64 // math.prod(strides)
        self.where = nn.Conv2d(c, where, 1)  # few channels per cell: position needs little, and stays cheap
        # fc: 0=Linear(pooled 2C + where·side² → hidden), 1=ReLU, 2=Dropout
        self.fc = nn.Sequential(nn.Linear(2 * c + where * side * side, hidden), nn.ReLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in self.heads_spec.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x * 2.0 - 1.0)                             # (B, C, 4, 4); inputs centred around 0
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)   # (B, 2C)
        h = self.fc(torch.cat([pooled, self.where(h).flatten(1)], 1))  # (B, hidden)
        return {k: head(h) for k, head in self.heads.items()}     # name -> (B, classes) logits

    @torch.no_grad()
    def predict(self, images) -> list[Attributes]:
        """Read images (PIL images, or a (B, 3, 64, 64) tensor in [0, 1]); every head's argmax as Attributes.
        shape and colour come from their heads even where the subject head says "yes"."""
        x = images if torch.is_tensor(images) else to_tensor(images)
        was_training = self.training
        self.eval()
        out = {k: v.argmax(1).tolist() for k, v in self(x.to(next(self.parameters()).device)).items()}
        self.train(was_training)
        spec = self.heads_spec
        return [Attributes(shape=spec["shape"][out["shape"][i]], colour=spec["colour"][out["colour"][i]],
                           size=spec["size"][out["size"][i]], position=spec["position"][out["position"][i]],
                           background=spec["background"][out["background"][i]], style=spec["style"][out["style"][i]],
                           subject=bool(out["subject"][i])) for i in range(x.shape[0])]


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, 64, 64) float in [0, 1]; other sizes are resized (box filter, i.e. area average)."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (world.SIZE, world.SIZE):
            im = im.resize((world.SIZE, world.SIZE), Image.BOX)
        arrs.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 64, 64)


def labels(attrs: list[Attributes]) -> dict[str, torch.Tensor]:
    """Class indices per head; -100 (ignored by cross_entropy) for shape/colour of subject images."""
    out = {k: [] for k in HEADS}
    for a in attrs:
        for k in ("size", "position", "background", "style"):
            out[k].append(HEADS[k].index(getattr(a, k)))
        out["shape"].append(-100 if a.subject else HEADS["shape"].index(a.shape))
        out["colour"].append(-100 if a.subject else HEADS["colour"].index(a.colour))
        out["subject"].append(int(a.subject))
    return {k: torch.tensor(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- augmentation

def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, separable 7-tap kernel; sigma (B,) in pixels, 0 leaves the image as is."""
    B = x.shape[0]
    t = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B·3, 7): one kernel per channel of each image
    y = F.pad(x.reshape(1, B * 3, 64, 64), (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=B * 3)  # horizontal pass
    y = F.conv2d(y, k[:, None, :, None], groups=B * 3)  # vertical pass
    return y.reshape(B, 3, 64, 64)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """The degradations a small latent diffusion model adds, each applied to about half of the batch.

    softening: bilinear down to 32 or 43 px and back up (a VAE/upsampler loses the finest detail)
    blur:      Gaussian, sigma up to 1.0 px
    colour:    per-channel gain ±8 %, offset ±0.04, contrast ±10 %
    noise:     Gaussian, std up to 0.05
    strength scales every magnitude (0: identity)."""
    B, g = x.shape[0], generator
    u = lambda *s: torch.rand(*s, generator=g)
    pick = lambda: (u(B) < 0.5).float()
    # softening: resample a random half of the batch through a lower resolution
    soft = pick().bool()
    if soft.any() and strength > 0:
        side = 32 if u(1).item() < 0.5 else 43
        low = F.interpolate(x[soft], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        up = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
        x = x.clone()
        x[soft] = x[soft] + strength * (up - x[soft])
    x = _blur(x, pick() * u(B) * strength)  # sigma up to 1 px
    gain = 1 + pick()[:, None] * (u(B, 3) * 2 - 1) * 0.08 * strength
    offset = pick()[:, None] * (u(B, 3) * 2 - 1) * 0.04 * strength
    contrast = 1 + pick() * (u(B) * 2 - 1) * 0.10 * strength
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast[:, None, None, None] + mean  # contrast around the image mean
    x = x * gain[:, :, None, None] + offset[:, :, None, None]
    x = x + torch.randn(x.shape, generator=g) * (pick() * u(B) * 0.05 * strength)[:, None, None, None]
    return x.clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- data

def probe_attributes(n: int, seed: int, split: str = "all") -> list[Attributes]:
    """The probe's mix: 1/2 plain shapes, 1/8 each style, 1/8 subject; `split` applies to the shapes."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(8, size=n)  # 0-3 plain, 4-6 one style each, 7 subject
    out = []
    for k in kinds:
        style = world.STYLES[k - 3] if 4 <= k <= 6 else "plain"
        out.append(world.sample_attributes(rng, split, style, subject=bool(k == 7)))
    return out


def render_batch(attrs: list[Attributes]) -> torch.Tensor:
    """Render attributes to a (B, 3, 64, 64) uint8 tensor (uint8 keeps a training pool of 8000 images at 100 MB)."""
    arr = np.stack([np.asarray(world.render(a)) for a in attrs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------- training

def train_probe(out: str | None = DEFAULT_WEIGHTS, n: int = 8000, epochs: int = 10, batch_size: int = 64,
                lr: float = 3e-3, seed: int = 0, log=print) -> Probe:
    """Train a probe on n procedural images (all splits, mixed styles and subjects) with augmentation on 3 of every
    4 images; AdamW, one-cycle schedule (10 % warm-up, cosine decay). Saves safetensors to `out` (None: don't save)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    attrs = probe_attributes(n, seed)
    pool, y = render_batch(attrs), labels(attrs)
    log(f"rendered {n} images in {time.time() - t0:.1f} s")
    model = Probe()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total, seen = 0.0, 0
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            x = pool[idx].float() / 255.0
            # a quarter of the images stay clean, so clean renders are read exactly as well
            keep = torch.rand(batch_size, generator=g) < 0.25
            x = torch.where(keep[:, None, None, None], x, augment(x, g))
            logits = model(x)
            loss = sum(F.cross_entropy(logits[k], y[k][idx], ignore_index=-100) for k in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * batch_size, seen + batch_size
        log(f"epoch {epoch + 1}/{epochs}  loss {total / seen:.4f}  {time.time() - t0:.0f} s")
    model.eval()
    if out:
        save_probe(model, out, {"train_images": str(n), "epochs": str(epochs), "seed": str(seed),
                                "train_seconds": f"{time.time() - t0:.0f}"})
        log(f"saved {out}")
    return model


def save_probe(model: Probe, path: str, info: dict[str, str] | None = None) -> None:
    """Weights plus the head vocabularies (JSON in the safetensors metadata), so the file explains itself."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": "minisd-probe-1", "heads": json.dumps(model.heads_spec), **(info or {})}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)


def load_probe(path: str = DEFAULT_WEIGHTS, device: str | torch.device = "cpu") -> Probe:
    """Load the shipped probe (or one saved by `train_probe`), in eval mode."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "minisd-probe-1":
        raise ValueError(f"{path} is not a minisd probe file (metadata format={meta.get('format')!r})")
    model = Probe(heads=json.loads(meta["heads"]))
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------- scoring

FIDELITY = ("shape", "colour", "size", "position", "background")


def read(images, probe: Probe, batch_size: int = 256) -> list[Attributes]:
    """The probe's reading of every image (PIL images or a (B, 3, 64, 64) tensor in [0, 1]), in batches."""
    pred = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pred += probe.predict(chunk if torch.is_tensor(chunk) else to_tensor(chunk))
    return pred


def frac(hits: list) -> float | None:
    """The fraction of true items; None for an empty list (no image qualifies: `-` in the tables)."""
    return sum(hits) / len(hits) if hits else None


def score(images, attrs: list[Attributes], probe: Probe | None = None, batch_size: int = 256) -> dict:
    """Compare what the probe reads in `images` with the prompted `attrs`. Fractions in [0, 1], None when no image
    qualifies:

    shape, colour          prompts of ordinary shapes (not the subject)
    size, position, background   every prompt
    all                    ordinary prompts with shape, colour, size, position and background all right
    style                  predicted style equals the prompted one (every prompt; "plain" counts)
    style_adoption         the same, over prompts with a style (outlined/striped/dotted) only
    style_leak             prompts without a style that came out styled (a fine-tune leaking into the base)
    subject                subject prompts read as the subject
    subject_leak           ordinary prompts read as the subject"""
    pred = read(images, probe or load_probe(), batch_size)
    if len(pred) != len(attrs):
        raise ValueError(f"{len(images)} images but {len(attrs)} attribute rows")
    ordinary = [(p, a) for p, a in zip(pred, attrs) if not a.subject]
    res = {"n": len(attrs)}
    for k in FIDELITY:
        pool = ordinary if k in ("shape", "colour") else list(zip(pred, attrs))
        res[k] = frac([getattr(p, k) == getattr(a, k) for p, a in pool])
    res["all"] = frac([all(getattr(p, k) == getattr(a, k) for k in FIDELITY) for p, a in ordinary])
    res["style"] = frac([p.style == a.style for p, a in zip(pred, attrs)])
    res["style_adoption"] = frac([p.style == a.style for p, a in ordinary if a.style != "plain"])
    res["style_leak"] = frac([p.style != "plain" for p, a in ordinary if a.style == "plain"])
    res["subject"] = frac([p.subject for p, a in zip(pred, attrs) if a.subject])
    res["subject_leak"] = frac([p.subject for p, a in ordinary])
    return res


def score_named(images, attrs: list[Attributes], named: list, probe: Probe | None = None,
                batch_size: int = 256) -> dict:
    """Score images drawn from partial prompts: prompt i names only the attributes in `named[i]` (a subset of
    world.NAMEABLE; the others may come out as anything). Fractions in [0, 1], None when no prompt qualifies:

    shape ... background   right, over the prompts that name it
    all                    every named attribute right
    swap                   a colour given to the wrong object, over prompts naming a colour or a background:
                           the shape drawn in the named background colour, or the background drawn in the named
                           shape colour ("a red circle on a blue background" -> a blue circle, or a red background)"""
    pred = read(images, probe or load_probe(), batch_size)
    if not len(pred) == len(attrs) == len(named):
        raise ValueError(f"{len(pred)} images, {len(attrs)} attribute rows, {len(named)} subsets")
    rows = list(zip(pred, attrs, [set(n) for n in named]))
    res = {"n": len(rows)}
    for k in FIDELITY:
        res[k] = frac([getattr(p, k) == getattr(a, k) for p, a, n in rows if k in n])
    res["all"] = frac([all(getattr(p, k) == getattr(a, k) for k in n) for p, a, n in rows])
    res["swap"] = frac([("background" in n and p.colour == a.background) or ("colour" in n and p.background == a.colour)
                        for p, a, n in rows if n & {"colour", "background"}])
    return res


def evaluate(probe: Probe, n: int = 2000, seed: int = 12345, split: str = "heldout", strength: float = 0.0) -> dict:
    """Score the probe on fresh procedural images (its own mix of styles and subjects), optionally augmented."""
    attrs = probe_attributes(n, seed, split)
    x = render_batch(attrs).float() / 255.0
    if strength > 0:
        x = augment(x, torch.Generator().manual_seed(seed), strength)
    return score(x, attrs, probe)


def format_table(res: dict, title: str = "") -> str:
    """A two-column text table of a `score` result."""
    lines = [title] if title else []
    cell = lambda k, v: "-" if v is None else str(v) if k == "n" else f"{100 * v:.1f} %"
    lines += [f"{k:<16}{cell(k, v):>8}" for k, v in res.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minisd.world.probe", description="Attribute probe for the procedural "
                                "world: train it, score a folder of generated images, or evaluate it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a probe on procedural images (CPU is fine: a few minutes)")
    t.add_argument("--out", default=DEFAULT_WEIGHTS, help="output .safetensors (default weights/probe.safetensors)")
    t.add_argument("--n", type=int, default=8000, help="training images (default 8000)")
    t.add_argument("--epochs", type=int, default=10, help="passes over them (default 10)")
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="score FOLDER: PNGs listed in its attributes.jsonl (the prompted attributes)")
    s.add_argument("folder")
    s.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    e = sub.add_parser("eval", help="accuracy on fresh held-out procedural images, clean and augmented")
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--seed", type=int, default=12345)
    for q in (s, e):
        q.add_argument("--weights", default=DEFAULT_WEIGHTS, help="probe file (default weights/probe.safetensors)")
    for q in (t, s, e):
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cmd == "train":
        train_probe(a.out, a.n, a.epochs, seed=a.seed)
    elif a.cmd == "score":
        rows = world.read_attributes(a.folder)
        images = [Image.open(os.path.join(a.folder, name)) for name, _ in rows]
        res = score(images, [r for _, r in rows], load_probe(a.weights))
        print(json.dumps(res) if a.json else format_table(res, f"probe scores for {a.folder}"))
    else:
        probe = load_probe(a.weights)
        for strength, name in ((0.0, "clean"), (1.0, "augmented")):
            print(format_table(evaluate(probe, a.n, a.seed, "heldout", strength), f"held-out, {name}") + "\n")


if __name__ == "__main__":
    main()
