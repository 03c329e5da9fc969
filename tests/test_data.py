"""The fine-tuning dataset: the three folder layouts (kohya concept folders too), repeats, crops, flips, caption
dropout, and a folder of broken or odd images (truncated, CMYK, 16-bit, RGBA, EXIF-rotated, tiny) that loads the good
ones and reports the rest."""
import json
import os
from collections import Counter

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


def test_kohya_concept_folders(tmp_path):
    """DIR/<repeats>_<class tokens>/: repeats from the folder name, each folder a concept, the class tokens as the
    caption of an image without a caption file; what is not read is named in the summary with the reason."""
    dog, cat = tmp_path / "10_sks dog", tmp_path / "3_ohwx cat"
    dog.mkdir()
    cat.mkdir()
    _write(dog, "a.png", _img(colour=(1, 2, 3)), "sks dog on a sofa")
    _write(dog, "b.png", _img(colour=(4, 5, 6)))                      # no caption: the class tokens
    _write(cat, "c.jpg", _img(colour=(7, 8, 9)))
    open(cat / "c.caption", "w").write("ohwx cat, sleeping")          # kohya's other caption extension
    open(cat / "orphan.txt", "w").write("no image for me")
    open(cat / "notes.md", "w").write("x")
    (cat / "nested").mkdir()
    open(cat / "broken.png", "wb").write(b"junk")
    (tmp_path / "misc").mkdir()                                       # no <repeats>_ prefix
    (tmp_path / "0_reg").mkdir()
    _write(tmp_path / "0_reg", "r.png", _img())
    _write(tmp_path, "top.png", _img())                               # beside the concept folders
    ds = CaptionDataset(str(tmp_path), resolution=16, repeats=2)
    got = [(os.path.relpath(e.path, tmp_path), e.caption, e.repeats) for e in ds.examples]
    assert got == [("10_sks dog/a.png", "sks dog on a sofa", 10), ("10_sks dog/b.png", "sks dog", 10),
                   ("3_ohwx cat/c.jpg", "ohwx cat, sleeping", 3)]
    assert len(ds) == 2 * (10 + 10 + 3)                               # folder repeats × --repeats
    seen = Counter(ds.get(i, 0)["caption"] for i in range(len(ds)))   # every slot once: counts per example
    assert seen == {"sks dog on a sofa": 20, "sks dog": 20, "ohwx cat, sleeping": 6}
    assert sorted(ds.skipped) == sorted([
        ("0_reg/", "repeat count 0"),
        ("3_ohwx cat/broken.png", "unreadable (UnidentifiedImageError)"),
        ("3_ohwx cat/nested/", "a folder here is not read"),
        ("3_ohwx cat/orphan.txt", "caption without an image"),
        ("misc/", "folder without a <repeats>_ prefix (kohya layout: DIR/10_sks dog/)"),
        ("top.png", "beside the concept folders (kohya layout: DIR/<repeats>_<tokens>/)")])
    assert ds.others == ["3_ohwx cat/notes.md"]
    s = ds.summary()
    for name in ("0_reg/", "broken.png", "nested/", "orphan.txt", "misc/", "top.png", "notes.md"):
        assert name in s, (name, s)
    assert "10_sks dog: 2 × 10" in s and "3_ohwx cat: 1 × 3" in s
    assert "1 images have no caption file and train on their folder's class tokens 'sks dog': 10_sks dog/b.png" in s
    # the loader draws whole epochs of these slots, resumable as before
    batch = Loader(ds, batch_size=4).next_batch()
    assert batch["pixels"].shape == (4, 3, 16, 16)


def test_uncaptioned_images_are_named(tmp_path):
    _write(tmp_path, "a.png", _img(), "a caption")
    _write(tmp_path, "b.png", _img())
    open(tmp_path / "c.txt", "w").write("orphan")
    ds = CaptionDataset(str(tmp_path), resolution=16)
    s = ds.summary()
    assert "1 images have no caption file and train on the empty caption: b.png" in s, s
    assert ds.skipped == [("c.txt", "caption without an image")]
    assert len(ds) == 2 and [ds.example_index(i) for i in range(4)] == [0, 1, 0, 1]


def test_kohya_folder_with_nothing_usable_says_why(tmp_path):
    (tmp_path / "5_thing").mkdir()
    open(tmp_path / "5_thing" / "x.png", "wb").write(b"junk")
    _write(tmp_path, "top.png", _img())
    with pytest.raises(DataError, match=r"no usable images \(1 unreadable; 1 not read, e.g. top.png: beside"):
        CaptionDataset(str(tmp_path))
