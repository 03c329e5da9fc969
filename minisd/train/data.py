"""The fine-tuning dataset: a folder of captioned images, each cropped to the square resolution or to its
aspect-ratio bucket (buckets.py sets `targets`).

Three folder layouts are read (those that trainers share):

    captioned images     0001.png + 0001.txt (same stem, the caption inside), ...
    HF imagefolder       metadata.jsonl with one {"file_name": "0001.png", "text": "..."} per line
    kohya concepts       DIR/10_sks dog/0001.png (+ 0001.txt), DIR/3_dog/...: one folder per concept, named
                         <repeats>_<class tokens>; each image is seen `repeats` times an epoch (times --repeats)

metadata.jsonl wins over the others; a folder with `N_name` subfolders is read as kohya concepts. An image without a
caption file trains on its concept folder's class tokens ("sks dog", as kohya does), else on the empty caption.
What is not used is said by name in `summary()`: images skipped and why, folders and stray files not read, and the
images that had no caption file.

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
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..formats.images import read_image, read_text_file

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".caption")  # kohya's two caption extensions, .txt first
CONCEPT = re.compile(r"(\d+)_(.+)")   # kohya concept folder: "<repeats>_<class tokens>"
MIN_SIDE = 8  # pixels: below this an image holds no usable content at any resolution


class DataError(Exception):
    """A data folder that cannot be trained on (missing, empty, no readable image); one-line message."""


@dataclass
class Example:
    path: str
    caption: str
    repeats: int = 1        # a kohya concept folder's repeat count
    captioned: bool = True  # False: no caption file (the caption is the folder's class tokens, or empty)


@dataclass
class Scan:
    """What a data folder holds: the examples; images, folders and captions not used, as (name relative to the
    folder, reason); other files, which are not data (names)."""
    examples: list[Example]
    skipped: list[tuple[str, str]]
    others: list[str]


# ----------------------------------------------------------------------------------------------- reading
def scan_folder(folder: str) -> list[Example]:
    """The examples of a folder, in sorted file order (concept folders in sorted order)."""
    return scan(folder).examples


def scan(folder: str) -> Scan:
    """Read a data folder in whichever layout it has (module docstring); opens no image."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such data folder")
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        out = []
        try:
            lines = read_text_file(meta).splitlines()
        except ValueError as e:
            raise DataError(f"{meta}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text") or ""
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise DataError(f"{meta}:{n}: expected {{\"file_name\": \"...\", \"text\": \"...\"}}") from None
            # a name is a path inside the folder: "../../x.png" or "/etc/x.png" would read files elsewhere
            rel = os.path.normpath(name)
            if not name or os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep) or "\0" in name:
                raise DataError(f"{meta}:{n}: file_name {name!r} is not a path inside {folder}")
            out.append(Example(os.path.join(folder, rel), text, captioned="text" in row))
        return Scan(out, [], [])
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))  # hidden files are not data
    concepts = [n for n in names if CONCEPT.fullmatch(n) and os.path.isdir(os.path.join(folder, n))]
    if not concepts:
        return _scan_images(folder, "", names, 1, None)
    # kohya concepts: every image lives in a <repeats>_<tokens> folder; anything beside them is not read
    found = Scan([], [], [])
    for name in names:
        m = CONCEPT.fullmatch(name)
        if os.path.isdir(os.path.join(folder, name)) and name not in concepts:
            found.skipped.append((name + "/", "folder without a <repeats>_ prefix (kohya layout: DIR/10_sks dog/)"))
        elif name not in concepts:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS + CAPTION_EXTS:
                found.skipped.append((name, "beside the concept folders (kohya layout: DIR/<repeats>_<tokens>/)"))
            else:
                found.others.append(name)
        elif int(m.group(1)) == 0:
            found.skipped.append((name + "/", "repeat count 0"))
        else:
            sub = _scan_images(os.path.join(folder, name), name + "/", sorted(
                n for n in os.listdir(os.path.join(folder, name)) if not n.startswith(".")),
                int(m.group(1)), m.group(2).strip())
            found.examples += sub.examples
            found.skipped += sub.skipped
            found.others += sub.others
    return found


def _scan_images(folder: str, prefix: str, names: list[str], repeats: int, tokens: str | None) -> Scan:
    """One folder of images with same-stem caption files; `tokens` is the caption of an uncaptioned image."""
    images = {os.path.splitext(n)[0] for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS}
    found = Scan([], [], [])
    for name in names:
        stem, ext = os.path.splitext(name)
        path = os.path.join(folder, name)
        if ext.lower() in IMAGE_EXTS:
            cap = next((os.path.join(folder, stem + e) for e in CAPTION_EXTS
                        if os.path.isfile(os.path.join(folder, stem + e))), None)
            text = open(cap, encoding="utf-8", errors="replace").read().strip() if cap else (tokens or "")
            found.examples.append(Example(path, text, repeats, captioned=cap is not None))
        elif ext.lower() in CAPTION_EXTS and stem in images:
            continue  # read with its image
        elif os.path.isdir(path):
            found.skipped.append((prefix + name + "/", "a folder here is not read"))
        elif ext.lower() in CAPTION_EXTS:
            found.skipped.append((prefix + name, "caption without an image"))
        else:
            found.others.append(prefix + name)
    return found


def open_rgb(path: str) -> Image.Image:
    """Open any image as an upright 8-bit RGB picture; raises ValueError with the reason if unusable. The reader is
    minisd/formats/images.py, shared with sample.py --init (regular files only, no decompression bombs)."""
    return read_image(path, min_side=MIN_SIDE)


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
    """Checked examples × repeats, with deterministic augmentation by (epoch, index). An epoch has one slot per
    repetition of each example (its concept folder's count × `repeats`); `slots[i]` is the example of slot i."""

    def __init__(self, folder: str, resolution: int = 64, repeats: int = 1, random_crop: bool = False,
                 flip_prob: float = 0.0, caption_dropout: float = 0.0, seed: int = 0):
        self.resolution, self.repeats, self.seed = resolution, max(1, int(repeats)), seed
        self.random_crop, self.flip_prob, self.caption_dropout = random_crop, flip_prob, caption_dropout
        found = scan(folder)
        self.skipped: list[tuple[str, str]] = found.skipped  # (name relative to the folder, reason)
        self.others = found.others                             # files that are not data, by name
        self.upscaled = 0
        self.examples: list[Example] = []
        self.sizes: list[tuple[int, int]] = []  # (w, h) of each upright image, read once here
        unreadable = 0
        for ex in found.examples:
            try:
                img = open_rgb(ex.path)
            except ValueError as e:
                self.skipped.append((os.path.relpath(ex.path, folder), str(e)))
                unreadable += 1
                continue
            self.upscaled += min(img.size) < resolution
            self.examples.append(ex)
            self.sizes.append(img.size)
        if not self.examples:
            more = [f"{unreadable} unreadable"] if unreadable else []
            not_read = self.skipped[:len(self.skipped) - unreadable]  # the scan's skips come first
            more += [f"{len(not_read)} not read, e.g. {not_read[0][0]}: {not_read[0][1]}"] if not_read else []
            raise DataError(f"{folder}: no usable images" + (f" ({'; '.join(more)})" if more else ""))
        self.root = folder
        # repetition-major: slot i is example i % n while every example has the same count (the plain layout)
        counts = [ex.repeats * self.repeats for ex in self.examples]
        self.slots = [k for r in range(max(counts)) for k in range(len(counts)) if r < counts[k]]
        # the (w, h) each example is cropped to: the square, or its aspect-ratio bucket (buckets.assign_buckets)
        self.targets = [(resolution, resolution)] * len(self.examples)
        # False once the latents are cached (cache.py): `get` then reads no image, only the crop geometry
        self.load_pixels = True

    def __len__(self) -> int:
        """Examples per epoch (repeats included)."""
        return len(self.slots)

    def example_index(self, i: int) -> int:
        """The example of slot i (any i: slots wrap around)."""
        return self.slots[i % len(self.slots)]

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled index order of one epoch, a pure function of (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def get(self, i: int, epoch: int) -> dict:
        """Item i of an epoch. The draws of its generator, in this order: flip, crop (top, left), caption
        dropout; the cache (cache.py) relies on the flip and dropout decisions being returned as they are."""
        k = self.example_index(i)
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
        k = self.example_index(i)
        for j in range(i + 1, i + len(self)):
            if self.targets[self.example_index(j)] == self.targets[k] and self.example_index(j) != k:
                return j % len(self)
        raise DataError(f"{self.examples[k].path}: became unreadable during training")

    def load(self, k: int, flip: bool) -> torch.Tensor:
        """Pixels (3, H, W) of example k, centre-cropped to its target, mirrored or not (what the cache encodes)."""
        try:
            img = open_rgb(self.examples[k].path)
        except ValueError as e:
            raise DataError(f"{self.examples[k].path}: {e}") from None
        return resize_crop(img, *self.targets[k], random_crop=False, flip=flip, rng=None)[0]

    def summary(self) -> str:
        """One paragraph: how many images are used (per concept), which were skipped and why, which files were not
        read, which images had no caption file."""
        lines = [f"data: {len(self.examples)} images used × {self.repeats} repeats"
                 + (f", {self.upscaled} upscaled (smaller than {self.resolution} px)" if self.upscaled else "")]
        concepts = Counter((os.path.basename(os.path.dirname(ex.path)), ex.repeats) for ex in self.examples)
        if any(ex.repeats != 1 for ex in self.examples) or len(concepts) > 1:   # kohya concept folders
            lines.append("data: concepts (folder: images × repeats) "
                         + ", ".join(f"{c}: {n} × {r}" for (c, r), n in concepts.items())
                         + f"; {len(self)} images an epoch")
        if self.skipped:
            reasons = Counter(r.split(" (")[0] for _, r in self.skipped)
            lines.append(f"data: skipped {len(self.skipped)} files: "
                         + ", ".join(f"{n} {r}" for r, n in reasons.items()))
            lines += [f"  {f}: {r}" for f, r in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"  ... and {len(self.skipped) - 10} more")
        if self.others:
            lines.append(f"data: {len(self.others)} other files not read (not images or captions): "
                         + _names(self.others))
        bare = [ex for ex in self.examples if not ex.captioned]
        if bare:
            tokens = sorted({ex.caption for ex in bare})
            lines.append(f"data: {len(bare)} images have no caption file and train on "
                         + ("the empty caption" if tokens == [""] else
                            "their folder's class tokens " + ", ".join(repr(t) for t in tokens))
                         + ": " + _names([os.path.relpath(ex.path, self.root) for ex in bare]))
        shapes = Counter(self.targets)
        if set(shapes) != {(self.resolution, self.resolution)}:  # aspect-ratio buckets (buckets.py)
            lines.append(f"data: {len(shapes)} buckets (w x h: images) "
                         + ", ".join(f"{w}x{h}: {n}" for (w, h), n in shapes.most_common()))
        return "\n".join(lines)


def _names(names: list[str], n: int = 10) -> str:
    """The first n names, then how many more."""
    return ", ".join(names[:n]) + (f" ... and {len(names) - n} more" if len(names) > n else "")


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
