"""Probabilities and sizes at values that cannot be mistaken for their mirror image.

A probability tested only at 0.5 cannot tell p from 1−p, and a size tested only square cannot tell (h, w) from
(w, h). Here: caption dropout, flip, LoRA input dropout, rank dropout (LoRA and LoHa) and module dropout at p = 0.2,
each counted over many draws against a binomial bound; SDXL sampling at 48 x 32 (w x h) against diffusers'
StableDiffusionXLPipeline on the same tiny weights; SDXL training on a wide image with aspect-ratio buckets, its
latent shape and micro-conditioning (original h, w, crop top, left, target h, w, the order of SDXL's paper,
Sec. 2.2, and of diffusers' `_get_add_time_ids`) checked against values computed here and embedded with
diffusers' own `Timesteps`.

The binomial bounds: n draws at p = 0.2 give a count with mean 0.2n and σ = √(n·0.2·0.8); every bound below is
mean ± 6σ (outside with probability < 2e-9), and 1−p (0.8n) or 0.5 (0.5n) lie far outside it. The draws are
seeded, so the counts are fixed numbers; the bound says why a correct implementation lands inside.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minisd.adapters.lycoris import LoHaLinear  # noqa: E402
from minisd.lora import LoRALinear  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.data import CaptionDataset, cover_crop  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from conftest import save_tiny_sdxl  # noqa: E402

torch.set_num_threads(1)
P = 0.2


def bound(n: int, p: float = P) -> tuple[float, float]:
    """mean ± 6σ of Binomial(n, p)."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - 6 * sd, mean + 6 * sd


def assert_binomial(count: int, n: int, what: str) -> None:
    lo, hi = bound(n)
    print(f"{what}: {count}/{n} (expected {n * P:.0f}, bound [{lo:.0f}, {hi:.0f}])")
    assert lo <= count <= hi, (what, count, n, (lo, hi))
    assert not (bound(n, 1 - P)[0] <= count <= bound(n, 1 - P)[1])  # the bounds of p and 1−p do not overlap


# ------------------------------------------------------------------------------------------- data options
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """4 captioned images, each left-right asymmetric (a mirrored image differs from the original)."""
    d = tmp_path_factory.mktemp("asym")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"caption {i}")
    return str(d)


def test_caption_dropout_at_0_2(folder):
    ds = CaptionDataset(folder, resolution=16, caption_dropout=P, seed=3)
    ds.load_pixels = False  # decisions only (the geometry is computed, no image is read)
    items = [ds.get(i, epoch) for epoch in range(500) for i in range(len(ds))]
    dropped = sum(x["dropped"] for x in items)
    assert all((x["caption"] == "") == x["dropped"] for x in items)  # a dropped item trains on ""
    assert_binomial(dropped, len(items), "caption dropout 0.2")


def test_flip_at_0_2(folder):
    ds = CaptionDataset(folder, resolution=16, flip_prob=P, seed=3)
    plain = CaptionDataset(folder, resolution=16, seed=3)
    items = [ds.get(i, epoch) for epoch in range(250) for i in range(len(ds))]
    assert_binomial(sum(x["flip"] for x in items), len(items), "flip 0.2")
    # the flag is what happens to the pixels: a flipped item is its unflipped image mirrored left-right
    for x in items[:12]:
        ref = plain.get(x["index"], 0)["pixels"]
        assert torch.equal(x["pixels"], ref.flip(-1) if x["flip"] else ref)
        assert not torch.equal(ref, ref.flip(-1))


# ------------------------------------------------------------------------------------------- adapter options
def _lora(**kw):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    lay = LoRALinear(base, rank=8, alpha=4.0, **kw)
    with torch.no_grad():
        lay.lora_up.weight.normal_()  # B = 0 would make the adapter path invisible
    return lay.train()


def test_lora_input_dropout_at_0_2():
    lay = _lora(dropout=P)
    zeros = (lay.dropout(torch.ones(20000)) == 0).sum().item()
    assert_binomial(zeros, 20000, "LoRA input dropout 0.2")


def test_module_dropout_at_0_2():
    lay = _lora(module_dropout=P)
    x = torch.randn(2, 24)
    with torch.no_grad():
        base = F.linear(x, lay.weight, lay.bias)
        skipped = sum(torch.equal(lay(x), base) for _ in range(1000))
    assert_binomial(skipped, 1000, "module dropout 0.2")


def test_rank_dropout_at_0_2_by_hand():
    """kohya's rank dropout: each rank channel of A x is zeroed with probability p, one mask per sample (shared by
    its tokens), and the survivors are scaled by 1/(1−p): Δy = (α/r)/(1−p) · B (mask ⊙ A x)."""
    lay = _lora(rank_dropout=P)
    seen = []
    lay.lora_up.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = torch.randn(50, 3, 24)  # (B, T, in)
    zeros = n = 0
    with torch.no_grad():
        base = F.linear(x, lay.weight, lay.bias)
        full = lay.lora_down(x)                                          # (B, T, r) unmasked A x
        for _ in range(10):
            delta = lay(x) - base
            h = seen.pop()                                               # (B, T, r) what B received
            mask = (h != 0)
            assert torch.equal(mask, mask[:, :1].expand_as(mask))      # one mask per sample
            assert torch.equal(h, full * mask)                          # kept channels unchanged
            want = F.linear(h, lay.lora_up.weight) * (4.0 / 8) / (1 - P)
            assert torch.allclose(delta, want, rtol=1e-5, atol=1e-5), (delta - want).abs().max()
            zeros += (~mask[:, 0]).sum().item()
            n += mask[:, 0].numel()
    assert_binomial(zeros, n, "LoRA rank dropout 0.2")


def test_loha_rank_dropout_at_0_2():
    """LyCORIS / PEFT LoHa: output rows of ΔW x zeroed with probability p, survivors scaled by 1/mean(keep)."""
    torch.manual_seed(0)
    lay = LoHaLinear(nn.Linear(24, 64), rank=4, alpha=4.0, init=False, rank_dropout=P).train()
    x = torch.randn(5, 24)
    zeros = n = 0
    with torch.no_grad():
        full = F.linear(x, lay.delta_weight())                            # (B, out) unmasked ΔW x
        base = F.linear(x, lay.weight, lay.bias)
        for _ in range(50):
            delta = lay(x) - base
            keep = (delta.abs().sum(0) > 1e-6)                            # (out,) rows that survived
            assert torch.allclose(delta, full * keep / keep.float().mean(), rtol=1e-4, atol=1e-5)
            zeros += (~keep).sum().item()
            n += keep.numel()
    assert_binomial(zeros, n, "LoHa rank dropout 0.2")


# ------------------------------------------------------------------------------------------- SDXL, non-square
H, W = 32, 48  # pixels; the tiny VAE's factor is 2: latents 16 x 24


def test_sdxl_sampling_non_square_matches_diffusers(tmp_path):
    from test_e2e import PROMPT, assert_same_image, run_sample, tiny_sdxl_pipeline
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "xl")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(  # a pre-hook must return None (list.append does)
        lambda mod, args, kwargs: seen.append((args[0].shape, kwargs["added_cond_kwargs"]["time_ids"])),
        with_kwargs=True)
    ref = pipe(PROMPT, num_inference_steps=3, height=H, width=W, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(9)).images[0]
    hook.remove()
    shape, time_ids = seen[0]
    assert tuple(shape[2:]) == (H // 2, W // 2) and time_ids[0].tolist() == [H, W, 0, 0, H, W]  # the convention
    assert ref.size == (W, H)
    out = tmp_path / "xl.png"
    run_sample([PROMPT, "--model", str(tmp_path / "xl"), "--steps", "3", "--sampler", "euler", "--cfg", "6",
                "--seed", "9", "--width", str(W), "--height", str(H), "--out", str(out), "--device", "cpu"])
    assert Image.open(out).size == (W, H)
    assert_same_image(out, ref)
    # and the transposed size is a different image (so the comparison above can fail on a swapped h, w)
    ref_t = pipe(PROMPT, num_inference_steps=3, height=H, width=W, guidance_scale=6.0, original_size=(W, H),
                 target_size=(W, H), generator=torch.Generator().manual_seed(9)).images[0]
    diff = np.abs(np.asarray(ref_t, np.int16) - np.asarray(ref, np.int16)).max()
    assert diff > 8, diff


def test_sdxl_training_non_square_micro_conditioning(tmp_path):
    """A 100 x 40 (w x h) image with buckets: the UNet gets latents of the bucket's (h/f, w/f), and the time ids
    (orig h, orig w, crop top, crop left, target h, target w) computed here from the cover-crop rule."""
    from diffusers.models.embeddings import Timesteps
    xl = save_tiny_sdxl(tmp_path / "xl")
    data = tmp_path / "wide"
    data.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 100, 3), dtype=np.uint8)).save(data / "0.png")  # h=40, w=100
    (data / "0.txt").write_text("a wide picture")
    cfg, _ = parse_config(["--model", xl, "--data", str(data), "--out", str(tmp_path / "run"), "--buckets",
                           "--batch-size", "1", "--threads", "1", "--no-progress", "--no-samples",
                           "--save-every", "0", "--resolution", "32"])
    tr = Trainer(cfg, str(tmp_path / "run"), log=lambda s: None)
    seen = {}
    tr.model.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(shape=tuple(args[0].shape), y=kwargs["y"].detach().clone()),
        with_kwargs=True)
    tr.train_step()
    f = tr.model.vae_scale
    _, C, h, w = seen["shape"]
    th, tw = h * f, w * f
    assert w > h and th * tw <= 32 * 32, (th, tw)  # a wide bucket for a wide image, within the area
    # centre crop of the image resized to cover (tw, th): scale = max(tw/100, th/40)
    s = max(tw / 100, th / 40)
    nw, nh = max(tw, round(100 * s)), max(th, round(40 * s))
    assert (nw, nh) == cover_crop(100, 40, tw, th)
    top, left = (nh - th) // 2, (nw - tw) // 2
    assert left > 0 and top == 0  # the crop happens along the width only: swapping top/left would show
    want_ids = torch.tensor([[40.0, 100.0, top, left, th, tw]])
    emb = Timesteps(8, flip_sin_to_cos=True, downscale_freq_shift=0)(want_ids.flatten()).reshape(1, -1)  # diffusers
    y = seen["y"]
    pooled = y[:, :32]
    with torch.no_grad():
        _, want_pooled = tr.model.text_encoders[1](tr.model.tokenizers[1](["a wide picture"]))
    d_ids = (y[:, 32:] - emb).abs().max().item()
    print(f"bucket {tw}x{th}, crop ({top}, {left}); time-embedding diff {d_ids:.1e}")
    assert d_ids < 1e-6, d_ids
    assert torch.allclose(pooled, want_pooled, atol=1e-6)
