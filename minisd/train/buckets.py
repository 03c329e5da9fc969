"""Aspect-ratio buckets: train each image at (about) its own shape instead of a centre square.

A square crop cuts the head off a portrait and the sides off a landscape, and the model learns that subjects
touch the frame edge. Aspect-ratio bucketing (NovelAI 2022, kohya's `--enable_bucket`) instead offers a set of
shapes of about the same pixel count and puts every image into the nearest one:

    buckets     every (w, h), w and h multiples of `step`, both within [min_side, max_side], w·h ≤ R²; for
                each width the tallest such height (the most pixels at that shape), and its transpose
    assignment  the bucket whose aspect ratio is nearest the image's in log space, |log(w/h) − log(bw/bh)|,
                so that 1:2 and 2:1 are equally far from 1:1; ties go to the larger area
    pixels      resize to cover the bucket (scale = max(bw/w, bh/h)), then a centre / random crop (data.py)
    batches     one bucket per batch (a batch is one tensor), the batches of an epoch shuffled by (seed, epoch)

`step` must keep every latent side divisible by the UNet's down-sampling: a pixel side is a multiple of
unit = VAE factor × 2^(UNet levels − 1) (64 px for SD1/SD2, 32 for SDXL, 4 for the tiny test model). The default
step is the smallest multiple of that unit which is at least R/16: 64 px for SD1 at 512, SD2 at 768 and SDXL
at 1024 (kohya's usual value), 4 or 8 px for the 64 px tiny models, so that they still get a dozen shapes.

Shapes: an image is (3, bh, bw) in pixels and (C, bh/f, bw/f) in latents.
"""
from __future__ import annotations

import math

import numpy as np

from .data import CaptionDataset, Loader, collate


def size_unit(model) -> int:
    """The pixel multiple every side must have: the VAE's factor times the UNet's total down-sampling."""
    return model.vae_scale * 2 ** (len(model.cfg.unet.channel_mult) - 1)


def default_step(unit: int, resolution: int) -> int:
    """The smallest multiple of `unit` that is >= resolution / 16 (64 px for the full models)."""
    return unit * max(1, math.ceil(resolution / 16 / unit))


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """All (w, h) buckets of area <= resolution², sorted from the tallest to the widest."""
    area, out = resolution * resolution, set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)  # the tallest height that keeps w·h within the area
        if h >= min_side:
            out.update({(w, h), (h, w)})
    return sorted(out, key=lambda b: (b[0] / b[1], -b[0] * b[1]))


def nearest_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest the aspect ratio w/h (in log space); of equally near ones, the largest."""
    r = math.log(w / h)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - r), 12), -b[0] * b[1]))


def buckets_for(model, resolution: int, step: int = 0, min_side: int = 0, max_side: int = 0):
    """The bucket list for a model and the --bucket-* options (0 = automatic); ValueError on a bad step."""
    unit = size_unit(model)
    step = step or default_step(unit, resolution)
    if step % unit:
        raise ValueError(f"--bucket-step {step} must be a multiple of {unit} px for this model "
                         f"(VAE factor × UNet down-sampling), e.g. {default_step(unit, resolution)}")
    # defaults: half to twice the resolution (kohya: 256..1024 at 512), rounded to the step
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or 2 * resolution // step * step
    min_side = math.ceil(min_side / step) * step  # sides are multiples of the step
    buckets = make_buckets(resolution, step, min_side, max_side // step * step)
    if not buckets:
        raise ValueError(f"no bucket fits: --bucket-min {min_side} to --bucket-max {max_side} at "
                         f"--resolution {resolution} (area {resolution}²)")
    return buckets


def assign_buckets(ds: CaptionDataset, buckets: list[tuple[int, int]]) -> None:
    """Point every example of `ds` at the bucket nearest its aspect ratio (its crop target)."""
    ds.targets = [nearest_bucket(w, h, buckets) for w, h in ds.sizes]


class BucketLoader(Loader):
    """Single-bucket batches. An epoch is a list of batches, a pure function of (seed, epoch), so the state is
    (epoch, cursor) as for `data.Loader` and a resumed run draws the same batches. A bucket's last batch may
    be smaller than batch_size (its images are not repeated to fill it)."""

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch: shuffle all indices, group them by bucket, chunk, shuffle the chunks."""
        rng = np.random.default_rng([self.ds.seed, epoch, 2])
        groups: dict[tuple[int, int], list[int]] = {}
        for i in rng.permutation(len(self.ds)):
            groups.setdefault(self.ds.targets[self.ds.example_index(i)], []).append(int(i))
        B = self.batch_size
        batches = [idx[j:j + B] for _, idx in sorted(groups.items()) for j in range(0, len(idx), B)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def next_batch(self) -> dict:
        batch = self._advance()  # one whole batch of the plan
        return collate([self.ds.get(i, self.epoch) for i in batch])
