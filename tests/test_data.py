"""The fine-tuning dataset: both folder layouts, repeats, crops, flips, caption dropout, and a folder of broken
or odd images (truncated, CMYK, 16-bit, RGBA, EXIF-rotated, tiny) that loads the good ones and reports the rest."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.train.data import CaptionDataset, DataError, Loader, open_rgb, scan_folder


def _img(w=40, h=30, colour=(200, 10, 10)):
    return Image.new("RGB", (w, h), colour)


def _write(folder, name, img, caption=None, **save):
    img.save(os.path.join(folder, name), **save)
    if caption is not None:
        stem = os.path.splitext(name)[0]
        open(os.path.join(folder, stem + ".txt"), "w").write(caption)


def test_kohya_and_metadata_layouts(tmp_path):
    _write(tmp_path, "a.png", _img(), "a red thing")
    _write(tmp_path, "b.jpg", _img(), None)  # no caption: empty
    ex = scan_folder(str(tmp_path))
    assert [(os.path.basename(e.path), e.caption) for e in ex] == [("a.png", "a red thing"), ("b.jpg", "")]
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "b.jpg", "text": "from jsonl"}) + "\n")
    ex = scan_folder(str(tmp_path))  # metadata.jsonl wins
    assert [(os.path.basename(e.path), e.caption) for e in ex] == [("b.jpg", "from jsonl")]


def test_broken_images_are_skipped_or_fixed(tmp_path):
    d = str(tmp_path)
    _write(d, "good.png", _img(), "good")
    # truncated PNG: the header is fine, the pixel data is cut
    _write(d, "trunc.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "t")
    data = open(os.path.join(d, "trunc.png"), "rb").read()
    open(os.path.join(d, "trunc.png"), "wb").write(data[: len(data) // 2])
    open(os.path.join(d, "garbage.jpg"), "wb").write(b"not an image at all")
    _write(d, "cmyk.jpg", _img().convert("CMYK"), "cmyk")
    a16 = np.full((30, 40), 65535 // 2, dtype=np.uint16)
    _write(d, "deep.png", Image.fromarray(a16), "16 bit")
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # fully transparent black -> white
    _write(d, "alpha.png", rgba, "rgba")
    _write(d, "tiny.png", _img(4, 4), "tiny")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    _write(d, "phone.jpg", _img(40, 30), "phone", exif=exif.tobytes())

    ds = CaptionDataset(d, resolution=16)
    used = sorted(os.path.basename(e.path) for e in ds.examples)
    assert used == ["alpha.png", "cmyk.jpg", "deep.png", "good.png", "phone.jpg"]
    assert sorted(f for f, _ in ds.skipped) == ["garbage.jpg", "tiny.png", "trunc.png"]
    s = ds.summary()
    assert "skipped 3 files" in s and "too small" in s and "unreadable" in s, s
    assert open_rgb(os.path.join(d, "phone.jpg")).size == (30, 40)          # upright
    assert open_rgb(os.path.join(d, "alpha.png")).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(os.path.join(d, "deep.png")).getpixel((0, 0)) == (127, 127, 127)
    batch = Loader(ds, batch_size=5).next_batch()
    assert batch["pixels"].shape == (5, 3, 16, 16)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1


def test_bad_folders_raise_data_error(tmp_path):
    with pytest.raises(DataError):
        CaptionDataset(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no usable images"):
        CaptionDataset(str(tmp_path))
    open(tmp_path / "x.png", "wb").write(b"junk")
    with pytest.raises(DataError, match="1 unreadable"):
        CaptionDataset(str(tmp_path))


def test_repeats_crop_flip_dropout_and_determinism(tmp_path):
    # a left-to-right gradient 48x32: centre crop to 16 keeps the middle; flip mirrors it
    a = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (32, 1, 3))
    for i in range(3):
        _write(tmp_path, f"{i}.png", Image.fromarray(a), f"cap {i}")
    ds = CaptionDataset(str(tmp_path), resolution=16, repeats=4)
    assert len(ds) == 12
    x = ds.get(0, 0)
    assert x["original_size"] == (32, 48) and x["crop"] == (0, 4)   # resized to 16x24, centre crop
    row = x["pixels"][0, 0]
    assert row[0] < row[-1]                                          # not flipped
    flipped = CaptionDataset(str(tmp_path), resolution=16, flip_prob=1.0).get(0, 0)["pixels"]
    assert torch.equal(flipped, x["pixels"].flip(-1))
    rc = CaptionDataset(str(tmp_path), resolution=16, random_crop=True, caption_dropout=0.5, seed=3)
    crops = {rc.get(i, e)["crop"] for i in range(3) for e in range(4)}
    assert len(crops) > 1
    caps = [rc.get(i, e)["caption"] for i in range(3) for e in range(6)]
    assert 0 < caps.count("") < len(caps)
    assert [rc.get(1, 2)["caption"] for _ in range(3)] == [rc.get(1, 2)["caption"]] * 3  # pure function

    # the loader's (epoch, cursor) is its whole state: restore it and the same batches follow
    ld = Loader(rc, batch_size=5)
    for _ in range(3):
        ld.next_batch()
    state = ld.state_dict()
    want = [ld.next_batch() for _ in range(3)]
    ld2 = Loader(rc, batch_size=5)
    ld2.load_state_dict(state)
    got = [ld2.next_batch() for _ in range(3)]
    for w, g in zip(want, got):
        assert torch.equal(w["pixels"], g["pixels"]) and w["captions"] == g["captions"]
