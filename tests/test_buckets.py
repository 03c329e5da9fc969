"""Aspect-ratio buckets: the bucket list (area bound, divisibility, range), nearest-aspect assignment, the
cover-and-crop geometry, single-bucket batches that cover an epoch exactly once, and exact --resume."""
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd.train.buckets import BucketLoader, assign_buckets, buckets_for, make_buckets, nearest_bucket  # noqa: E402
from minisd.config import SD15, SDXL_BASE, TINY  # noqa: E402
from minisd.train.data import CaptionDataset  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402

torch.set_num_threads(1)
SIZES = [(96, 48), (48, 96), (64, 64), (80, 60), (40, 90), (100, 40), (64, 70)]  # (w, h)


def write_shapes(folder, sizes=SIZES):
    """Images of the given sizes: a noise texture (so crops differ) and a caption naming the shape."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
        open(os.path.join(folder, f"{i}.txt"), "w").write(f"picture {i} of {w} by {h}")
    return folder


def fake_model(cfg):
    return SimpleNamespace(cfg=cfg, vae_scale=2 ** (len(cfg.vae.ch_mult) - 1))


def test_bucket_list_bounds_and_steps():
    bs = make_buckets(64, 8, 32, 128)
    assert (64, 64) in bs and (32, 128) in bs and (128, 32) in bs
    for w, h in bs:
        assert w * h <= 64 * 64 and w % 8 == 0 and h % 8 == 0 and 32 <= min(w, h) and max(w, h) <= 128
        assert (h, w) in bs                                  # every shape in both orientations
        # maximal: the tallest height for its width, or the widest width for its height (the transpose)
        assert w * (h + 8) > 64 * 64 or h + 8 > 128 or h * (w + 8) > 64 * 64 or w + 8 > 128
    ratios = [w / h for w, h in bs]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    # automatic steps: 64 px for the full models (multiples of VAE factor 8 × 8), 4 px for the tiny test model
    assert {(w % 64, h % 64) for w, h in buckets_for(fake_model(SD15), 512)} == {(0, 0)}
    assert {(w % 64, h % 64) for w, h in buckets_for(fake_model(SDXL_BASE), 1024)} == {(0, 0)}
    tiny = buckets_for(fake_model(TINY), 64)
    assert min(w for w, _ in tiny) == 32 and max(w for w, _ in tiny) == 128 and (60, 68) in tiny
    with pytest.raises(ValueError, match="multiple of 64"):
        buckets_for(fake_model(SD15), 512, step=32)       # 32 px = 4 latent px: SD1's UNet halves it 3 times
    with pytest.raises(ValueError, match="no bucket fits"):
        buckets_for(fake_model(TINY), 64, min_side=100, max_side=120)


def test_nearest_aspect_ratio():
    bs = [(64, 64), (48, 80), (80, 48), (32, 128), (128, 32)]
    assert nearest_bucket(300, 200, bs) == (80, 48)    # 1.5: |ln 1.5 − ln 5/3| = 0.105 beats ln 1.5 = 0.405
    assert nearest_bucket(200, 300, bs) == (48, 80)
    assert nearest_bucket(1000, 220, bs) == (128, 32)  # 4.5 nearest 4
    assert nearest_bucket(50, 49, bs) == (64, 64)
    # log space: 2.2:1 is nearer 4:1 (|ln 2.2 − ln 4| = 0.60) than 1:1 (0.79); a linear distance says 1:1
    assert nearest_bucket(220, 100, [(64, 64), (128, 32)]) == (128, 32)
    # 2:1 is equally far from 1:1 and 4:1 in log space: the larger bucket wins
    assert nearest_bucket(200, 100, [(120, 30), (64, 64)]) == (64, 64)
    assert nearest_bucket(200, 100, [(64, 64), (128, 32)]) == (64, 64)                # equal areas: first


def test_cover_and_crop_to_bucket(tmp_path):
    write_shapes(str(tmp_path), [(90, 30)])
    ds = CaptionDataset(str(tmp_path), resolution=32)
    assign_buckets(ds, [(32, 32), (64, 16)])
    assert ds.targets == [(64, 16)]
    x = ds.get(0, 0)
    # cover 64x16 with a 90x30 image: scale max(64/90, 16/30) = 0.711 -> 64x21, centre crop rows 2..18
    assert x["pixels"].shape == (3, 16, 64) and x["original_size"] == (30, 90) and x["crop"] == (2, 0)
    assert x["target_size"] == (16, 64)
    ds.load_pixels = False                              # the cached-latent path computes the same geometry
    y = ds.get(0, 0)
    assert y["pixels"] is None and (y["original_size"], y["crop"], y["target_size"]) == ((30, 90), (2, 0), (16, 64))


def test_batches_single_bucket_and_state(tmp_path):
    ds = CaptionDataset(write_shapes(str(tmp_path)), resolution=64, repeats=2, random_crop=True, flip_prob=0.5,
                        seed=5)
    assign_buckets(ds, buckets_for(fake_model(TINY), 64))
    for (w, h), (bw, bh) in zip(ds.sizes, ds.targets):
        assert bw * bh <= 64 * 64 and bw % 4 == 0 and bh % 4 == 0
        assert abs(math.log(bw / bh) - math.log(w / h)) < 0.08   # dense 4 px steps: every ratio is near
    assert len(set(ds.targets)) >= 5
    ld = BucketLoader(ds, batch_size=3)
    seen, shapes = [], set()
    for _ in range(len(ld._plan)):                   # one epoch
        b = ld.next_batch()
        assert len(set(b["target_sizes"])) == 1                        # one bucket per batch
        th, tw = b["target_sizes"][0]
        assert b["pixels"].shape == (len(b["captions"]), 3, th, tw)
        seen += [f"{k}:{c}" for k, c in zip(b["indices"], b["captions"])]
        shapes.add((th, tw))
    assert ld.epoch == 0 and len(seen) == len(ds) and len(shapes) >= 5
    assert sorted(seen) == sorted(f"{i % 7}:{ds.examples[i % 7].caption}" for i in range(len(ds)))
    assert ld.plan(1) != ld.plan(0)                     # reshuffled each epoch, a pure function of (seed, epoch)
    assert ld.plan(1) == BucketLoader(ds, batch_size=3).plan(1)
    # the state (epoch, cursor) restores the batch sequence across the epoch boundary
    state = ld.state_dict()
    want = [ld.next_batch() for _ in range(4)]
    ld2 = BucketLoader(ds, batch_size=3)
    ld2.load_state_dict(state)
    got = [ld2.next_batch() for _ in range(4)]
    for w, g in zip(want, got):
        assert torch.equal(w["pixels"], g["pixels"]) and w["captions"] == g["captions"] and w["crops"] == g["crops"]


def test_bucket_training_resumes_exactly(tmp_path):
    data = write_shapes(str(tmp_path / "data"))
    flags = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2", "--data", data,
             "--buckets", "--max-steps", "5", "--seed", "2", "--flip", "0.5", "--random-crop", "--no-samples"]
    cfg, _ = parse_config(flags + ["--out", str(tmp_path / "full"), "--save-every", "0"])
    full = Trainer(cfg, str(tmp_path / "full"), log=lambda s: None)
    want = full.run()["losses"]
    part = str(tmp_path / "part")
    cfg, _ = parse_config(flags + ["--out", part, "--save-every", "2"])
    killed = Trainer(cfg, part, log=lambda s: None)
    json.dump(cfg.to_dict(), open(os.path.join(part, "config.json"), "w"))
    real_step = killed.train_step

    def dying_step():
        if killed.step == 3:
            raise KeyboardInterrupt
        return real_step()
    killed.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert train.main(["--resume", part, "--threads", "1"]) == 0
    got = [json.loads(line)["loss"] for line in open(os.path.join(part, "loss.jsonl"))]
    assert got == want, (got, want)   # bitwise on the CPU
