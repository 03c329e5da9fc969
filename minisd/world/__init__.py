"""Appendix: the embedded world (this file), its probe (probe.py), minisd-tiny's pretraining (pretrain.py), a model's
prompt fidelity read by the probe (fidelity.py) and world style runs' validation (validation.py). Only the commands
and this folder import it.

The world: a procedural, captioned image dataset that minisd-tiny is trained on and evaluated with.

Every 64×64 RGB image holds one shape on a flat background, drawn with PIL at 4× and box-downsampled
(anti-aliased edges). Everything is a pure function of a seed (numpy `default_rng`), so the same seed gives the
same bytes on every machine, and nothing needs a download.

    shape       circle square triangle star diamond cross heart                 (7)
    colour      red green blue yellow purple orange white black                 (8, also the background palette)
    size        small (radius ≈ 7.5 px) | large (radius ≈ 12.5 px)
    position    3×3 grid: top left, top middle, top right, middle left, center, ... bottom right
    background  one palette colour, never the shape's colour
    jitter      ±1.5 px offset, ±8 % scale, ±8° rotation (kept small: a 45° square would be a diamond)

Captions, four templates (`caption(attrs, template=k)`, `parse_caption` inverts all of them):

    0  a small red circle at the top left on a blue background
    1  a small red circle, top left, blue background
    2  an image of a small red circle at the top left on a blue background
    3  a blue background with a small red circle at the top left

Partial captions name any subset of shape, colour, size, position and background (`partial_caption(attrs,
named, phrasing)`, `PHRASINGS`: the templates with parts left out, and four more natural wordings), e.g.
"a red circle on a blue background", "a shape at the top left", "red shape on blue"; `parse_named` reads what
any of them names.

Fine-tuning material the base model never sees:
  * styles, appended to the caption as ", <style> style": outlined (an inner stroke 0.2·radius wide, background
    inside), striped (diagonal stripes), dotted (polka dots). Stripes and dots use a contrast colour: black on
    light shapes, white on dark ones, so the shape's own colour stays dominant.
  * the subject: a teal crescent with a pink dot in its hollow (colours outside the palette, a shape outside the
    list), captioned with a rare token in place of "<colour> <shape>": "a small sks emblem at the center on a
    black background". Subjects are always plain; their `colour` is "" and `shape` is "emblem".

Held-out split: the triple (shape s, colour c, position p) is held out when (s + 2c + p) mod 9 == 0. Each
(shape, colour) pair then misses exactly one position in train, and every pair of attributes still appears in
train, so held-out prompts test composition rather than unseen words.

CLI: python -m minisd.world OUT --n 1000 --seed 0 [--split train|heldout|all] [--style striped] [--subject]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart")
PALETTE = {  # sRGB, chosen far apart so blur or a colour cast cannot turn one into another
    "red": (220, 35, 35), "green": (35, 165, 60), "blue": (35, 75, 220), "yellow": (245, 215, 35),
    "purple": (135, 45, 175), "orange": (245, 135, 25), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
STYLES = ("plain", "outlined", "striped", "dotted")
SPLITS = ("train", "heldout", "all")
SUBJECT_TOKEN = "sks"  # rare CLIP token, the DreamBooth convention
SUBJECT_COLOURS = ((0, 150, 150), (235, 80, 160))  # teal crescent, pink dot: neither is in PALETTE

SIZE = 64           # output side, pixels
SS = 4              # supersampling factor of the drawing canvas
CENTRES = (15.0, 32.0, 49.0)  # grid cell centres; a large shape at a corner still fits (15 - 1.5 - 13.5 ≥ 0)
RADIUS = {"small": 7.5, "large": 12.5}
STROKE = 0.2        # outline width as a fraction of the radius: 1.5 px small, 2.5 px large (holes stay visible)
STRIPE_PERIOD, STRIPE_WIDTH = 6.0, 2.5   # diagonal stripes, pixels
DOT_PERIOD, DOT_RADIUS = 5.0, 1.3        # polka dots, pixels

TEMPLATES = (
    "a {size} {thing} at the {position} on a {background} background",
    "a {size} {thing}, {position}, {background} background",
    "an image of a {size} {thing} at the {position} on a {background} background",
    "a {background} background with a {size} {thing} at the {position}",
)


@dataclass
class Attributes:
    """Ground truth of one image. `dx, dy` (pixels), `scale` and `angle` (degrees) are the render jitter."""
    shape: str
    colour: str
    size: str
    position: str
    background: str
    style: str = "plain"
    subject: bool = False
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0


def is_heldout(shape: str, colour: str, position: str) -> bool:
    """True for the (shape, colour, position) triples reserved for evaluation (one position per shape/colour pair)."""
    s, c, p = SHAPES.index(shape), COLOURS.index(colour), POSITIONS.index(position)
    return (s + 2 * c + p) % 9 == 0


def sample_attributes(rng: np.random.Generator, split: str = "train", style: str = "plain",
                      subject: bool = False) -> Attributes:
    """Draw one image's attributes. split: "train" (no held-out triple), "heldout" (only those), "all".

    The number of draws per call is fixed for a given outcome, so a seed fixes the whole sequence."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if subject and style != "plain":
        raise ValueError("the subject is always drawn plain")
    while True:  # rejection sampling: held-out triples are 1/9 of all, so this loops ~1.1 or ~9 times
        shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        size = SIZES[rng.integers(len(SIZES))]
        background = COLOURS[rng.integers(len(COLOURS))]
        jitter = rng.uniform(-1.0, 1.0, size=4)
        if background == colour:
            continue
        if subject or split == "all" or is_heldout(shape, colour, position) == (split == "heldout"):
            break
    if subject:  # the subject replaces shape and colour; the split does not apply to it
        shape, colour = "emblem", ""
    return Attributes(shape, colour, size, position, background, style, subject,
                      dx=round(1.5 * jitter[0], 3), dy=round(1.5 * jitter[1], 3),
                      scale=round(1.0 + 0.08 * jitter[2], 3), angle=round(8.0 * jitter[3], 3))


# ---------------------------------------------------------------------------------------------------- drawing

def _outline(shape: str) -> list[tuple[float, float]] | None:
    """Unit-radius outline of a shape as polygon points (y down, centred at 0); None for the circle."""
    if shape == "square":
        a = 0.8  # half side: a square of radius 1 would look much bigger than the circle
        return [(-a, -a), (a, -a), (a, a), (-a, a)]
    if shape == "triangle":  # equilateral, centroid lowered so the triangle sits centred in its box
        return [(math.cos(math.radians(t)), math.sin(math.radians(t)) + 0.15) for t in (-90, 30, 150)]
    if shape == "star":  # five points, inner radius 0.45
        return [((1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    if shape == "diamond":  # a rhombus, taller than wide, so it is not just a rotated square
        return [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    if shape == "cross":  # plus sign, arm half-width 0.3
        a, b = 0.3, 0.9
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "heart":  # the classic parametric heart curve, scaled to radius ~1
        ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return [(float(u) / 16.5, float(v) / 16.5 - 0.1) for u, v in zip(x, y)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, stroke: float = 0.0) -> np.ndarray:
    """Coverage mask of a shape on the 4× canvas (float in [0, 1]). stroke > 0: only an inner band that wide."""
    canvas = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    draw = ImageDraw.Draw(canvas)
    pts = _outline(shape)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    if pts is None:
        box = [(cx - r) * SS, (cy - r) * SS, (cx + r) * SS, (cy + r) * SS]
        # PIL draws an ellipse's width inward, which is exactly the inner stroke we want
        draw.ellipse(box, fill=None if stroke else 255, outline=255 if stroke else None,
                     width=round(stroke * SS) if stroke else 1)
        return np.asarray(canvas, dtype=np.float32) / 255.0
    xy = [((cx + r * (c * x - s * y)) * SS, (cy + r * (s * x + c * y)) * SS) for x, y in pts]
    draw.polygon(xy, fill=255)
    fill = np.asarray(canvas, dtype=np.float32) / 255.0
    if not stroke:
        return fill
    # inner stroke: a closed line twice as wide as the stroke, clipped to the filled shape
    band = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(band).line(xy + xy[:1], fill=255, width=round(2 * stroke * SS), joint="curve")
    return fill * np.asarray(band, dtype=np.float32) / 255.0


def _pattern(kind: str) -> np.ndarray:
    """Stripe or dot coverage on the 4× canvas, in image coordinates so neighbouring images share the phase."""
    y, x = np.mgrid[0:SIZE * SS, 0:SIZE * SS].astype(np.float32) / SS + 0.5 / SS
    if kind == "striped":  # 45° stripes: the phase along x + y
        return (((x + y) / math.sqrt(2)) % STRIPE_PERIOD < STRIPE_WIDTH).astype(np.float32)
    # dotted: distance to the nearest point of a square lattice
    gx, gy = (x % DOT_PERIOD) - DOT_PERIOD / 2, (y % DOT_PERIOD) - DOT_PERIOD / 2
    return (gx * gx + gy * gy < DOT_RADIUS ** 2).astype(np.float32)


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (Rec. 601 luma)."""
    return (20, 20, 20) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (245, 245, 245)


def render(attrs: Attributes) -> Image.Image:
    """Draw the image for `attrs`: a deterministic function of the attributes alone."""
    col, row = POSITIONS.index(attrs.position) % 3, POSITIONS.index(attrs.position) // 3
    cx, cy = CENTRES[col] + attrs.dx, CENTRES[row] + attrs.dy
    r = RADIUS[attrs.size] * attrs.scale
    layers = []  # (coverage mask on the 4× canvas, RGB), composited in order over the background
    if attrs.subject:
        disk = _mask("circle", cx, cy, r, 0.0)
        bite = _mask("circle", cx + 0.4 * r, cy - 0.15 * r, 0.8 * r, 0.0)  # the crescent's hollow
        layers.append((disk * (1.0 - bite), SUBJECT_COLOURS[0]))
        layers.append((_mask("circle", cx + 0.25 * r, cy + 0.05 * r, 0.28 * r, 0.0), SUBJECT_COLOURS[1]))
    else:
        rgb = PALETTE[attrs.colour]
        if attrs.style == "outlined":
            layers.append((_mask(attrs.shape, cx, cy, r, attrs.angle, stroke=STROKE * r), rgb))
        else:
            fill = _mask(attrs.shape, cx, cy, r, attrs.angle)
            layers.append((fill, rgb))
            if attrs.style in ("striped", "dotted"):
                layers.append((fill * _pattern(attrs.style), _contrast(rgb)))
    img = np.empty((SIZE * SS, SIZE * SS, 3), dtype=np.float32)
    img[:] = PALETTE[attrs.background]
    for mask, rgb in layers:
        img += mask[..., None] * (np.asarray(rgb, dtype=np.float32) - img)
    # box downsampling = exact area coverage, i.e. anti-aliasing
    img = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------- captions

def caption(attrs: Attributes, template: int = 0, token: str = SUBJECT_TOKEN) -> str:
    """The caption of `attrs` in one of `TEMPLATES`; styled images end with ", <style> style"."""
    thing = f"{token} emblem" if attrs.subject else f"{attrs.colour} {attrs.shape}"
    text = TEMPLATES[template % len(TEMPLATES)].format(size=attrs.size, thing=thing, position=attrs.position,
                                                        background=attrs.background)
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)  # "a orange background" -> "an orange background"
    return text if attrs.style == "plain" else f"{text}, {attrs.style} style"


def _template_regex(template: str) -> re.Pattern:
    """A regex with named groups matching every caption made from `template`."""
    alt = lambda names: "(?:" + "|".join(re.escape(n) for n in names) + ")"
    groups = {"size": alt(SIZES), "position": alt(POSITIONS), "background": alt(COLOURS),
              "thing": rf"(?:{alt(COLOURS)} {alt(SHAPES)}|\S+ emblem)"}
    out = re.sub(r"\ba\\ ", r"an?\\ ", re.escape(template))  # the article "a" may have become "an"
    for name, rx in groups.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(out + rf"(?:, (?P<style>{alt(STYLES[1:])}) style)?")


_REGEXES = [_template_regex(t) for t in TEMPLATES]


def parse_caption(text: str) -> dict:
    """Invert `caption`: {shape, colour, size, position, background, style, subject} (jitter is not in captions)."""
    for rx in _REGEXES:
        m = rx.fullmatch(text.strip())
        if m is None:
            continue
        subject = m["thing"].endswith(" emblem")
        colour, shape = ("", "emblem") if subject else m["thing"].split(" ")
        return dict(shape=shape, colour=colour, size=m["size"], position=m["position"],
                    background=m["background"], style=m["style"] or "plain", subject=subject)
    raise ValueError(f"not a caption of this world: {text!r}")


# ---------------------------------------------------------------------------------------------------- partial captions

# What a caption can name. A partial caption names a subset; the picture still has all five (unnamed ones free).
NAMEABLE = ("shape", "colour", "size", "position", "background")
SUBSETS = tuple(tuple(k for i, k in enumerate(NAMEABLE) if m >> i & 1) for m in range(1, 2 ** len(NAMEABLE)))
# How a partial caption is worded: the four TEMPLATES with parts left out (0-3), then natural phrasings (4-7).
# {thing} is "[size] [colour] shape-word", the word "shape" when no shape is named; [...] parts drop out with
# their attribute. Phrasing k < 4 with every attribute named is exactly `caption(attrs, k)`.
PHRASINGS = (
    "a {thing}[ at the {position}][ on a {background} background]",
    "a {thing}[, {position}][, {background} background]",
    "an image of a {thing}[ at the {position}][ on a {background} background]",
    "[a {background} background with ]a {thing}[ at the {position}]",
    "{thing}[ in the {position}][ on {background}]",                 # "red circle on blue"
    "a picture of a {thing}[ in the {position}][, {background} background]",
    "[{background} background, ]{thing}[, {position}]",
    "a {thing}[ on a {background} background][ at the {position}]",  # background before position
)


def partial_caption(attrs: Attributes, named, phrasing: int = 0) -> str:
    """A caption of a plain shape that names only the attributes in `named` (a subset of NAMEABLE), worded by
    PHRASINGS[phrasing]: partial_caption(a, ("shape", "colour", "background")) = "a red circle on a blue background"."""
    named = set(named)
    if not named or not named <= set(NAMEABLE):
        raise ValueError(f"named must be a non-empty subset of {NAMEABLE}, got {sorted(named)}")
    if attrs.subject or attrs.style != "plain":
        raise ValueError("partial captions describe plain shapes (the base model's material) only")
    words = [getattr(attrs, k) for k in ("size", "colour") if k in named]
    values = {"thing": " ".join(words + [attrs.shape if "shape" in named else "shape"]),
              "position": attrs.position, "background": attrs.background}
    # keep an optional [...] part only when its attribute is named
    text = re.sub(r"\[([^\]]*\{(\w+)\}[^\]]*)\]", lambda m: m[1] if m[2] in named else "",
                  PHRASINGS[phrasing % len(PHRASINGS)])
    text = text.format(**values)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)  # "a orange background" -> "an orange background"


_POSITION_RX = re.compile(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b")


def parse_named(text: str) -> dict:
    """What a caption of this world names, by keywords, whatever the wording: {attribute: value} for the
    attributes it names. A colour is the background's when the next word is "background" or the word before is
    "on" ("on blue"), otherwise the shape's. Names the same attribute twice with two values: ValueError."""
    low = text.lower()
    found = [("position", m[1]) for m in _POSITION_RX.finditer(low)]
    words = re.findall(r"[a-z]+", _POSITION_RX.sub(" ", low))   # positions out, so "middle" etc. are gone
    for i, w in enumerate(words):
        nxt, prev = words[i + 1] if i + 1 < len(words) else "", words[i - 1] if i else ""
        if w in SHAPES:
            found.append(("shape", w))
        elif w in SIZES:
            found.append(("size", w))
        elif w in COLOURS:
            found.append(("background" if nxt == "background" or prev == "on" else "colour", w))
    out = {}
    for key, value in found:
        if out.setdefault(key, value) != value:
            raise ValueError(f"{text!r} names the {key} twice: {out[key]} and {value}")
    return out


def sample_partial(n: int, seed: int, split: str = "train", named=None) -> list[tuple[Attributes, str, tuple]]:
    """n (attributes, partial caption, named attributes) triples: a subset drawn uniformly from SUBSETS (or the
    given `named` for every one) and a phrasing uniformly from PHRASINGS, per image, from one rng."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        attrs = sample_attributes(rng, split)
        subset = SUBSETS[rng.integers(len(SUBSETS))] if named is None else tuple(named)
        out.append((attrs, partial_caption(attrs, subset, int(rng.integers(len(PHRASINGS)))), subset))
    return out


# ---------------------------------------------------------------------------------------------------- folders

def sample(n: int, seed: int, split: str = "train", style: str | None = None, subject: bool = False,
           template: int | None = None, token: str = SUBJECT_TOKEN) -> list[tuple[Attributes, str]]:
    """n (attributes, caption) pairs from one seed. template None: a random template per image (same rng)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        attrs = sample_attributes(rng, split, style or "plain", subject)
        k = int(rng.integers(len(TEMPLATES))) if template is None else template
        out.append((attrs, caption(attrs, k, token)))
    return out


def write_folder(out_dir: str, n: int, seed: int = 0, split: str = "train", style: str | None = None,
                 subject: bool = False, template: int | None = None, token: str = SUBJECT_TOKEN) -> str:
    """Write an image folder both trainers read: 00000.png + 00000.txt (kohya), metadata.jsonl (HF imagefolder:
    {"file_name", "text"}) and attributes.jsonl (ground truth: {"file_name", "text", **Attributes})."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as meta, \
            open(os.path.join(out_dir, "attributes.jsonl"), "w") as truth:
        for i, (attrs, text) in enumerate(sample(n, seed, split, style, subject, template, token)):
            name = f"{i:05d}"
            render(attrs).save(os.path.join(out_dir, name + ".png"))
            with open(os.path.join(out_dir, name + ".txt"), "w") as f:
                f.write(text + "\n")
            meta.write(json.dumps({"file_name": name + ".png", "text": text}) + "\n")
            truth.write(json.dumps({"file_name": name + ".png", "text": text, **asdict(attrs)}) + "\n")
    return out_dir


def read_attributes(folder: str) -> list[tuple[str, Attributes]]:
    """Read attributes.jsonl back: [(file_name, Attributes)] in file order."""
    fields = set(Attributes.__dataclass_fields__)
    with open(os.path.join(folder, "attributes.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["file_name"], Attributes(**{k: v for k, v in row.items() if k in fields})) for row in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minisd.world", description="Write a folder of the procedural "
                                "world: NNNNN.png + NNNNN.txt captions, metadata.jsonl and attributes.jsonl.")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="train: never a held-out (shape, colour, position) triple; heldout: only those; all")
    p.add_argument("--style", choices=STYLES[1:], default=None, help="draw every image in this style")
    p.add_argument("--subject", action="store_true", help=f"draw the subject ('{SUBJECT_TOKEN} emblem') instead")
    p.add_argument("--token", default=SUBJECT_TOKEN, help="word for the subject in captions (default sks)")
    p.add_argument("--template", type=int, default=None, choices=range(len(TEMPLATES)),
                   help="use one caption template (default: random per image)")
    a = p.parse_args(argv)
    if a.subject and a.style:
        p.error("--subject and --style cannot be combined (the subject is always plain)")
    write_folder(a.out, a.n, a.seed, a.split, a.style, a.subject, a.template, a.token)
    print(f"wrote {a.n} images to {a.out}")

