"""Held-out validation loss: every --val-loss-every N steps, the training loss of minisd/trainer.py on images the run
does not train on, with the same noise and timesteps each time, logged as `val_loss` beside `loss` in loss.jsonl
and drawn (red) in loss.png.

Why fixed draws: the training loss of one batch swings with its random t (the loss at t near 0 and near T differ by
orders of magnitude), so a curve of fresh draws is mostly noise. Here every evaluation replays one generator seeded
with `VAL_SEED + --seed`: the same VAE sample ε_z, timestep t and noise ε for every held-out image each time, so
successive values differ only because the weights did (a classic in diffusion training, e.g. diffusers'
train_text_to_image `--validation` discussions; the paper-free way to see overfitting in a fine-tune).

The held-out images: --val-data DIR (any folder train.py reads), or --val-fraction F, which takes round(F·n) images
of --data (at least 1; chosen with the run's seed, the same on every resume) out of training. Held-out images are
centre-cropped, never flipped, their captions never dropped. The VAE posterior moments (and, when the text encoders
do not train, their outputs) are computed once; each evaluation runs the UNet only.

It does not disturb the run: evaluation is in eval mode (no adapter dropout) without gradients, uses its own
generator, and saves and restores every RNG around it (rng.py); so losses, resume and the validation loss itself
are the same with and without it, and identical across a kill and --resume. It uses the raw weights (with
--ema-decay the shipped files hold the EMA ones; the loss beside the training loss is the one being trained).
"""
from __future__ import annotations

import numpy as np
import torch

from ..trainer import Draws, MicroBatch, training_loss
from .data import CaptionDataset, collate, open_rgb, resize_crop
from .rng import rng_state, set_rng_state

VAL_SEED = 1_000_003  # offset of the validation generator's seed from --seed (a stream no step ever draws)


def split_off(ds: CaptionDataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held out, kept) example indices of `ds`: round(fraction·n) of them held out (>= 1, < n), chosen by `seed`."""
    n = len(ds.examples)
    k = min(n - 1, max(1, round(fraction * n)))
    if k < 1:
        raise ValueError(f"--val-fraction needs at least 2 images in --data, it has {n}")
    held = sorted(np.random.default_rng([seed, 17]).choice(n, size=k, replace=False).tolist())
    keep = [i for i in range(n) if i not in set(held)]
    return held, keep


class ValidationLoss:
    """`vl()` -> the held-out loss at the current weights (a float)."""

    def __init__(self, trainer, items: list[dict]):
        self.trainer, self.seed = trainer, VAL_SEED + trainer.cfg.seed
        bs, m, dev = trainer.cfg.batch_size, trainer.model, trainer.device
        self.batches = []
        with torch.no_grad():
            for i in range(0, len(items), bs):
                batch = collate(items[i:i + bs])
                pixels = batch["pixels"].to(trainer.vae_dtype).to(dev)
                posterior = m.vae.encode(pixels)
                mb = MicroBatch(moments=posterior.moments.float(),                                  # (B, 2C, h, w)
                                ids=[ids.to(dev) for ids in m.tokenize(batch["captions"])])
                if not trainer.cfg.train_text_encoder:  # frozen text encoders: encode once
                    mb.context, mb.pooled = m.encode_text(mb.ids)
                if m.cfg.unet.adm_in_channels:
                    mb.time_ids = torch.tensor([[h, w, top, left, th, tw] for (h, w), (top, left), (th, tw)
                                                in zip(batch["original_sizes"], batch["crops"],
                                                       batch["target_sizes"])], dtype=torch.float32).to(dev)
                self.batches.append(mb)
        self.n = len(items)

    def __call__(self) -> float:
        tr = self.trainer
        saved = rng_state(tr.gen)
        draw = Draws(torch.Generator().manual_seed(self.seed), tr.device)  # the same draws at every evaluation
        tr.model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for mb in self.batches:
                    n = len(mb.ids[0])
                    total += n * training_loss(tr.model, tr.noise, mb, draw, **tr.step_options).item()
        finally:
            tr.model.train()
            set_rng_state(tr.gen, saved)
        return total / self.n


def build_val_loss(trainer) -> ValidationLoss | None:
    """After the dataset is built (Trainer.build_data): with --val-fraction take the held-out images out of it; the
    `ValidationLoss` over the held-out images, or None without --val-loss-every."""
    cfg = trainer.cfg
    if not cfg.val_loss_every:
        return None
    res = trainer.resolution
    if cfg.val_data is not None:
        held = CaptionDataset(cfg.val_data, res, 1, False, 0.0, 0.0, cfg.seed)
    else:
        ds = trainer.data
        out, keep = split_off(ds, cfg.val_fraction, cfg.seed)
        held = CaptionDataset.__new__(CaptionDataset)
        held.__dict__.update(ds.__dict__)
        held.examples, held.sizes = [ds.examples[i] for i in out], [ds.sizes[i] for i in out]
        held.targets = [(res, res)] * len(out)
        held.random_crop, held.flip_prob, held.caption_dropout, held.repeats = False, 0.0, 0.0, 1
        ds.examples, ds.sizes, ds.targets = ([ds.examples[i] for i in keep], [ds.sizes[i] for i in keep],
                                             [ds.targets[i] for i in keep])
        counts = [ex.repeats * ds.repeats for ex in ds.examples]
        ds.slots = [k for r in range(max(counts)) for k in range(len(counts)) if r < counts[k]]
    held.load_pixels = True
    items = [_item(held, k) for k in range(len(held.examples))]
    trainer.log(f"validation loss: {len(items)} held-out images"
                + (f" from {cfg.val_data}" if cfg.val_data else f" ({cfg.val_fraction:g} of --data)")
                + f", every {cfg.val_loss_every} steps")
    return ValidationLoss(trainer, items)


def _item(ds: CaptionDataset, k: int) -> dict:
    """Example k centre-cropped, unflipped, with its caption (the fields of CaptionDataset.get)."""
    (tw, th) = ds.targets[k]
    pixels, size, crop = resize_crop(open_rgb(ds.examples[k].path), tw, th, False, False, None)
    return {"pixels": pixels, "caption": ds.examples[k].caption, "original_size": size, "crop": crop,
            "target_size": (th, tw), "index": k, "flip": False, "dropped": False}
