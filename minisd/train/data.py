"""The fine-tuning dataset: a folder of captioned images, each cropped to the square resolution or to its
aspect-ratio bucket (buckets.py sets `targets`).

Two folder layouts are read (the two that trainers share):

    kohya style          0001.png + 0001.txt (same stem, the caption inside), ...
    HF imagefolder       metadata.jsonl with one {"file_name": "0001.png", "text": "..."} per line

When both exist metadata.jsonl wins. An image without a caption trains with the empty caption.

Real folders hold odd files. Each image is opened and checked once when the dataset is built:

    truncated / corrupt       skipped (PIL cannot decode every pixel)
    CMYK, palette, grey       converted to RGB
    16-bit (I;16, I)          scaled to 8 bits (the high byte), not clipped to white
    RGBA / LA / transparent P composited on white (what viewers show), not "black where transparent"
    EXIF-rotated (phones)     turned upright with the EXIF orientation tag
    tiny (< MIN_SIDE px)      skipped; small but usable images are upscaled
so nothing stops a run; `summary()` lists what was skipped and why, and the trainer prints it at the end.

Randomness (crop offset, flip, caption dropout, epoch order) is drawn from numpy generators seeded by
(seed, epoch, index), not from a running generator: the data position (epoch, cursor) is then the whole
data state, and a resumed run sees exactly the batches of an uninterrupted one.

Shapes: B = batch, R = resolution; pixels are (B, 3, R, R) in [-1, 1], the VAE's input range ((B, 3, bh, bw)
with buckets: a batch holds one bucket).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 8  # pixels: below this an image holds no usable content at any resolution


class DataError(Exception):
    """A data folder that cannot be trained on (missing, empty, no readable image); one-line message."""


@dataclass
class Example:
    path: str
    caption: str


# ----------------------------------------------------------------------------------------------- reading
def scan_folder(folder: str) -> list[Example]:
    """The (image path, caption) pairs of a folder, in sorted file order."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such data folder")
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        out = []
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out.append(Example(os.path.join(folder, row["file_name"]), str(row.get("text", ""))))
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
        return out
    out = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        txt = os.path.join(folder, stem + ".txt")
        cap = open(txt, encoding="utf-8", errors="replace").read().strip() if os.path.isfile(txt) else ""
        out.append(Example(os.path.join(folder, name), cap))
    return out


def open_rgb(path: str) -> Image.Image:
    """Open any image as an upright 8-bit RGB picture; raises ValueError with the reason if unusable."""
    try:
        img = Image.open(path)
        img.load()  # decode every pixel now: a truncated file fails here, not mid-training
    except FileNotFoundError:
        raise ValueError("missing file") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    img = ImageOps.exif_transpose(img)  # phone photos store "rotate 90°" as a tag, not in the pixels
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit: convert("RGB") would clip every value > 255 to white; keep the high byte instead
        a = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((a >> 8).clip(0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # composite on white, as viewers show it; dropping alpha would expose arbitrary hidden colours
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("RGB")  # CMYK, grey, palette, YCbCr -> RGB
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"too small ({img.size[0]}x{img.size[1]} px)")
    return img


def cover_crop(w: int, h: int, tw: int, th: int) -> tuple[int, int]:
    """The size (nw, nh) that an image of w x h is resized to so that it covers a tw x th target with the
    least scaling (the target's short side fits exactly; the other side spills over and is cropped)."""
    s = max(tw / w, th / h)
    return max(tw, round(w * s)), max(th, round(h * s))


def resize_crop(img: Image.Image, width: int, height: int, random_crop: bool, flip: bool,
                rng: np.random.Generator | None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize to cover width x height (`cover_crop`), crop it (centre or random), maybe mirror.
    Returns (pixels (3, height, width) in [-1, 1], original size (h, w), crop top-left (top, left) in resized
    pixels), the last two being what SDXL's micro-conditioning wants to know."""
    w, h = img.size
    nw, nh = cover_crop(w, h, width, height)
    img = img.resize((nw, nh), Image.BICUBIC)
    if random_crop:
        top, left = int(rng.integers(nh - height + 1)), int(rng.integers(nw - width + 1))
    else:
        top, left = (nh - height) // 2, (nw - width) // 2
    img = img.crop((left, top, left + width, top + height))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)
    return a.contiguous(), (h, w), (top, left)


# ----------------------------------------------------------------------------------------------- dataset
class CaptionDataset:
    """Checked examples × repeats, with deterministic augmentation by (epoch, index)."""

    def __init__(self, folder: str, resolution: int = 64, repeats: int = 1, random_crop: bool = False,
                 flip_prob: float = 0.0, caption_dropout: float = 0.0, seed: int = 0):
        self.resolution, self.repeats, self.seed = resolution, max(1, int(repeats)), seed
        self.random_crop, self.flip_prob, self.caption_dropout = random_crop, flip_prob, caption_dropout
        self.skipped: list[tuple[str, str]] = []  # (file, reason)
        self.upscaled = 0
        self.examples: list[Example] = []
        self.sizes: list[tuple[int, int]] = []  # (w, h) of each upright image, read once here
        for ex in scan_folder(folder):
            try:
                img = open_rgb(ex.path)
            except ValueError as e:
                self.skipped.append((os.path.basename(ex.path), str(e)))
                continue
            self.upscaled += min(img.size) < resolution
            self.examples.append(ex)
            self.sizes.append(img.size)
        if not self.examples:
            more = f" ({len(self.skipped)} unreadable)" if self.skipped else ""
            raise DataError(f"{folder}: no usable images{more}")
        # the (w, h) each example is cropped to: the square, or its aspect-ratio bucket (buckets.assign_buckets)
        self.targets = [(resolution, resolution)] * len(self.examples)
        # False once the latents are cached (cache.py): `get` then reads no image, only the crop geometry
        self.load_pixels = True

    def __len__(self) -> int:
        """Examples per epoch (repeats included)."""
        return len(self.examples) * self.repeats

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled index order of one epoch, a pure function of (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def get(self, i: int, epoch: int) -> dict:
        """Item i of an epoch. The draws of its generator, in this order: flip, crop (top, left), caption
        dropout; the cache (cache.py) relies on the flip and dropout decisions being returned as they are."""
        k = i % len(self.examples)
        ex, (tw, th) = self.examples[k], self.targets[k]
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        flip = self.flip_prob > 0 and rng.random() < self.flip_prob
        if self.load_pixels:
            try:
                img = open_rgb(ex.path)
            except ValueError:  # the file changed since the check: train on a neighbour instead of stopping
                return self.get(self.neighbour(i), epoch)
            pixels, size, crop = resize_crop(img, tw, th, self.random_crop, flip, rng)
        else:  # cached latents: centre crop only (TrainConfig refuses --random-crop), geometry from the size
            assert not self.random_crop, "a random crop cannot be cached"
            (w, h), (nw, nh) = self.sizes[k], cover_crop(*self.sizes[k], tw, th)
            pixels, size, crop = None, (h, w), ((nh - th) // 2, (nw - tw) // 2)
        drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        return {"pixels": pixels, "caption": "" if drop else ex.caption, "original_size": size, "crop": crop,
                "target_size": (th, tw), "index": k, "flip": flip, "dropped": drop}

    def neighbour(self, i: int) -> int:
        """The next index with the same crop target (a batch of buckets must keep one shape)."""
        n = len(self.examples)
        for j in range(i + 1, i + len(self)):
            if self.targets[j % n] == self.targets[i % n] and j % n != i % n:
                return j % len(self)
        raise DataError(f"{self.examples[i % n].path}: became unreadable during training")

    def load(self, k: int, flip: bool) -> torch.Tensor:
        """Pixels (3, H, W) of example k, centre-cropped to its target, mirrored or not (what the cache encodes)."""
        try:
            img = open_rgb(self.examples[k].path)
        except ValueError as e:
            raise DataError(f"{self.examples[k].path}: {e}") from None
        return resize_crop(img, *self.targets[k], random_crop=False, flip=flip, rng=None)[0]

    def summary(self) -> str:
        """One paragraph: how many images are used, which were skipped and why."""
        lines = [f"data: {len(self.examples)} images used × {self.repeats} repeats"
                 + (f", {self.upscaled} upscaled (smaller than {self.resolution} px)" if self.upscaled else "")]
        if self.skipped:
            reasons = Counter(r.split(" (")[0] for _, r in self.skipped)
            lines.append(f"data: skipped {len(self.skipped)} files: "
                         + ", ".join(f"{n} {r}" for r, n in reasons.items()))
            lines += [f"  {f}: {r}" for f, r in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"  ... and {len(self.skipped) - 10} more")
        shapes = Counter(self.targets)
        if set(shapes) != {(self.resolution, self.resolution)}:  # aspect-ratio buckets (buckets.py)
            lines.append(f"data: {len(shapes)} buckets (w x h: images) "
                         + ", ".join(f"{w}x{h}: {n}" for (w, h), n in shapes.most_common()))
        return "\n".join(lines)


def collate(items: list[dict]) -> dict:
    """Dataset items -> one batch: pixels stacked (None when the latents are cached), the rest as lists."""
    pixels = None if items[0]["pixels"] is None else torch.stack([x["pixels"] for x in items])  # (B, 3, H, W)
    return {"pixels": pixels, "captions": [x["caption"] for x in items],
            "original_sizes": [x["original_size"] for x in items], "crops": [x["crop"] for x in items],
            "target_sizes": [x["target_size"] for x in items], "indices": [x["index"] for x in items],
            "flips": [x["flip"] for x in items], "dropped": [x["dropped"] for x in items]}


class Loader:
    """Batches in epoch order; its whole state is (epoch, cursor), saved in checkpoints. `plan(epoch)` is the
    epoch's sequence (here example indices, one per item; `buckets.BucketLoader`: whole batches), a pure function of
    (seed, epoch), so a resumed run rebuilds it and continues at the cursor."""

    def __init__(self, dataset: CaptionDataset, batch_size: int):
        self.ds, self.batch_size = dataset, batch_size
        self.epoch, self.cursor = 0, 0
        self._plan = self.plan(0)

    def plan(self, epoch: int):
        return self.ds.order(epoch)

    def _advance(self):
        """The next entry of the plan, moving to the next epoch's plan at the boundary."""
        if self.cursor >= len(self._plan):  # epoch boundary: reshuffle with the next epoch's seed
            self.epoch, self.cursor = self.epoch + 1, 0
            self._plan = self.plan(self.epoch)
        self.cursor += 1
        return self._plan[self.cursor - 1]

    def next_batch(self) -> dict:
        return collate([self.ds.get(int(self._advance()), self.epoch) for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._plan = self.plan(self.epoch)
