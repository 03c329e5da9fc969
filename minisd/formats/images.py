"""The one image reader of minisd: `sample.py --init` and train.py's data folders both open pictures here.

A picture from disk is input like any other, so it is checked before it is trusted:

    not a regular file        refused: a FIFO, a device or a socket would block the read forever (opened with
                              O_NONBLOCK and checked with fstat on the open descriptor: S_ISREG)
    decompression bomb        refused: more than MAX_PIXELS pixels (the header says so before any pixel is
                              decoded; PIL's own limit only warns below twice its value)
    truncated / corrupt       refused (every pixel is decoded now, not at first use)
    16-bit grey (I;16, I)     scaled to 8 bits as round(v * 255 / 65535), so 65535 -> 255 and 32768 -> 128;
                              `convert("RGB")` would clip every value above 255 to white
    RGBA / LA / transparent P composited on white (what viewers show), not "black where transparent"
    CMYK, palette, grey       converted to RGB
    EXIF-rotated (phones)     turned upright with the EXIF orientation tag
    too small                 refused below `min_side` pixels (the caller's limit)

Errors are ValueError with a short reason (the caller adds the file name), never a PIL traceback.
"""
from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

# 2^28 pixels (16384 x 16384): far above any picture SD reads, far below what exhausts memory when decoded as RGB
# (768 MiB). PIL's default (89.5 M pixels) only warns, and raises from 179 M pixels on.
MAX_PIXELS = 1 << 28


def check_regular(path: str) -> os.stat_result:
    """stat(path) (links followed) and refuse anything but a regular file: opening a FIFO blocks until a writer
    comes, reading a device may never end. Raises ValueError with the reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError("missing file") from None
    except OSError as e:
        raise ValueError(f"cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ValueError(f"not a regular file ({kind})")
    return st


def open_regular(path: str):
    """A binary file object of `path`, which must be a regular file. Opened with O_NONBLOCK (a FIFO then opens at
    once instead of waiting for a writer) and checked with fstat on the open descriptor, so a file swapped for a
    FIFO between a check and the open is caught too. Raises ValueError with the reason."""
    check_regular(path)  # the friendly reasons: missing, a folder, a FIFO, ...
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"cannot read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return os.fdopen(fd, "rb")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I holding 16-bit values) -> 8-bit grey "L": round(v * 255 / 65535) per pixel, i.e.
    the value's fraction of full scale kept. A mode-I picture whose values all fit in 8 bits is read as 8-bit."""
    a = np.asarray(img).astype(np.int64)
    if img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
        return Image.fromarray(a.astype(np.uint8))
    a = a.clip(0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))  # integer round-half-up of v·255/65535


def read_image(path: str, min_side: int = 1, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open any picture as an upright 8-bit RGB image (module docstring). Raises ValueError with the reason."""
    f = open_regular(path)
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ValueError(f"{w}x{h} pixels: more than the {max_pixels:,} this reader decodes (a "
                                 "decompression bomb, or a picture far larger than any model takes)")
            img.load()  # decode every pixel now: a truncated file fails here, not mid-run
    except ValueError:
        raise
    except Image.DecompressionBombError as e:  # frames of an animation, or another size PIL finds first
        raise ValueError(f"refused as a decompression bomb ({str(e).split('.')[0]})") from None
    except Image.DecompressionBombWarning as e:
        raise ValueError(f"refused as a decompression bomb ({str(e).split('.')[0]})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ...
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    img = ImageOps.exif_transpose(img)  # phone photos store "rotate 90°" as a tag, not in the pixels
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        img = to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # composite on white, as viewers show it; dropping alpha would expose arbitrary hidden colours
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")  # CMYK, grey, palette, YCbCr, F -> RGB
    if min(img.size) < min_side:
        raise ValueError(f"too small ({img.size[0]}x{img.size[1]} px; at least {min_side} px a side)")
    return img


def read_text_file(path: str, limit: int = 64 << 20) -> str:
    """A UTF-8 text file (metadata.jsonl, a caption, a prompts file, a TOML config): regular files only, at most
    `limit` bytes. Raises ValueError with the reason."""
    f = open_regular(path)
    try:
        with f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"larger than the {limit:,} bytes a text file here may have")
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read ({e.strerror})") from None
