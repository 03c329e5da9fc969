"""AutoencoderKL (minisd/vae.py) and its name table (minisd/keys_vae.py) against diffusers' AutoencoderKL.

Tier 1: tiny random diffusers VAEs (block_out_channels=(32, 64), norm_num_groups=8), converted with
`vae_from_diffusers`, loaded strictly; encoder moments, posterior samples, decoder output and input
gradients must agree within 5e-6 (fp32, CPU), for both diffusers attention namings. Plus the full-size
official layouts from the reference manifests, on the meta device (names and shapes only).
"""
import json
import os

import pytest
import torch

from conftest import REFERENCE, randomize

from diffusers import AutoencoderKL as DiffusersVAE

from minisd.config import VAEConfig
from minisd.formats.keys_vae import vae_from_diffusers, vae_to_diffusers
from minisd.perf.vae_memory import set_vae_memory, tiled
from minisd.vae import AutoencoderKL

# Measured worst difference vs diffusers (relative to max(1, |ref|), as `check` judges): 1.8e-6 (decode), 1.3e-6
# (gradients), 0.9e-6 (moments) on the 2-core x86 VM; bound 5e-6, a margin of ~3x.
TOL = 5e-6
NEW_TO_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def to_legacy(sd: dict) -> dict:
    """Rename diffusers' current attention names to the pre-0.14 ones found in older files."""
    out = {}
    for k, v in sd.items():
        for new, old in NEW_TO_LEGACY.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[k] = v
    return out


def tiny_pair(layers: int, seed: int = 0, channels=(32, 64)):
    """A random diffusers VAE and ours with its converted weights."""
    n = len(channels)
    ref = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                       up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels,
                       layers_per_block=layers, latent_channels=4, norm_num_groups=8)
    randomize(ref, seed, std=0.1).eval()
    cfg = VAEConfig(ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
                    num_res_blocks=layers, norm_num_groups=8)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict()), strict=True)
    return ref, ours


def check(name, a, b, tol=TOL):
    """max |a - b| <= tol, relative to the reference's max magnitude where that exceeds 1: with
    std-0.1 random weights, decoder outputs reach ~5 and input gradients ~15, where fp32 rounding
    of a differently ordered sum alone is ~1e-6 x magnitude."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert diff <= tol * scale, f"{name}: max abs diff {diff:.3e} > {tol:.0e} x {scale:.2f}"


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("legacy", [False, True])
def test_parity_with_diffusers(layers, legacy):
    ref, ours = tiny_pair(layers, seed=layers)
    if legacy:  # the same weights under the old attention names must load identically
        ours.load_state_dict(vae_from_diffusers(to_legacy(ref.state_dict())), strict=True)
    x = torch.rand(2, 3, 32, 48) * 2 - 1                                 # non-square catches H/W swaps
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    post_ref = ref.encode(x_ref).latent_dist
    post = ours.encode(x_ours)
    check("mean", post.mean, post_ref.mean)
    check("logvar", post.logvar, post_ref.logvar)
    check("std", post.std, post_ref.std)
    check("mode", post.mode(), post_ref.mode())
    s_ref = post_ref.sample(generator=torch.Generator().manual_seed(7))
    s = post.sample(generator=torch.Generator().manual_seed(7))
    check("sample(generator)", s, s_ref)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (3, 4)]  # noqa: E731
    check("sample([generators])", post.sample(gens()), post_ref.sample(gens()))

    # Input gradient of the encoder through mean and log-variance (weighted so no term cancels).
    wm, wl = torch.randn_like(post.mean), torch.randn_like(post.logvar)
    ((post_ref.mean * wm).sum() + (post_ref.logvar * wl).sum()).backward()
    ((post.mean * wm).sum() + (post.logvar * wl).sum()).backward()
    check("encode grad x", x_ours.grad, x_ref.grad)

    z = torch.randn(2, 4, 16, 24)                                         # f = 2 for two levels
    z_ref, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
    img_ref, img = ref.decode(z_ref).sample, ours.decode(z_ours)
    assert img.shape == (2, 3, 32, 48)
    check("decode", img, img_ref)
    w = torch.randn_like(img)
    (img_ref * w).sum().backward()
    (img * w).sum().backward()
    check("decode grad z", z_ours.grad, z_ref.grad)


def test_scaled_helpers_and_slicing():
    ref, ours = tiny_pair(1, seed=3)
    sf = ours.cfg.scale_factor
    x, z = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        lat = ours.encode_latents(x, torch.Generator().manual_seed(1))
        lat_ref = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(1)) * sf
        check("encode_latents", lat, lat_ref)
        check("decode_latents", ours.decode_latents(z), ref.decode(z / sf).sample)
        full_m, full_d = ours.encode(x).moments, ours.decode(z)
        set_vae_memory(ours, slicing=True)
        check("sliced encode", ours.encode(x).moments, full_m)
        check("sliced decode", ours.decode(z), full_d)


def test_tiling_blend_is_exact_for_local_maps():
    """With a map that has no global statistics, tiling must reproduce the untiled result: this checks
    tile placement, the last flush tile and that the blending weights of each pixel sum to 1."""
    x = torch.randn(2, 3, 40, 56)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2.0) * 3  # noqa: E731
    down = lambda t: torch.nn.functional.avg_pool2d(t, 2)  # noqa: E731
    check("tiled nearest x2", tiled(up, x, 16, 4, 2), up(x))
    check("tiled pool /2", tiled(down, x, 16, 4, 0.5), down(x))


def test_tiling_shape_and_closeness():
    _, ours = tiny_pair(1, seed=4)
    x, z = torch.rand(1, 3, 64, 96) * 2 - 1, torch.randn(1, 4, 32, 48)
    with torch.no_grad():
        full_m, full_d = ours.encode(x).moments, ours.decode(z)
        set_vae_memory(ours, tiling=True, tile_latent=24, tile_overlap=8)   # 2 x 3 overlapping tiles
        tiled_m, tiled_d = ours.encode(x).moments, ours.decode(z)
        set_vae_memory(ours, tiling=True, tile_latent=24, tile_overlap=0)   # hard seams for comparison
        seams_d = ours.decode(z)
    assert tiled_m.shape == full_m.shape and tiled_d.shape == full_d.shape
    # GroupNorm statistics are per tile, so only closeness can be asked (relative L2 error; about
    # 0.09 here with random weights and noise inputs, far less on real images), and the overlap
    # blending must beat hard seams.
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(tiled_m, full_m) < 0.2, f"tiled encode: relative L2 error {rel(tiled_m, full_m):.3f}"
    assert rel(tiled_d, full_d) < 0.2, f"tiled decode: relative L2 error {rel(tiled_d, full_d):.3f}"
    assert rel(tiled_d, full_d) < rel(seams_d, full_d)


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_exact(legacy):
    ref, _ = tiny_pair(2, seed=5)
    sd = ref.state_dict()
    sd = to_legacy(sd) if legacy else sd
    back = vae_to_diffusers(vae_from_diffusers(sd), attention_names="legacy" if legacy else "new")
    assert list(back) == list(sd) or set(back) == set(sd), f"names differ: {set(back) ^ set(sd)}"
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


def test_strict_errors():
    ref, ours = tiny_pair(1)
    sd = ref.state_dict()
    with pytest.raises(KeyError, match="unconsumed.*encoder.extra.weight"):
        vae_from_diffusers({**sd, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing.*decoder.conv_out.bias"):
        vae_from_diffusers({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"})
    mixed = {**sd, "encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)}
    with pytest.raises(KeyError, match="unconsumed"):                    # both namings at once
        vae_from_diffusers(mixed)
    with pytest.raises(KeyError, match="unconsumed.*loss.logvar"):
        vae_to_diffusers({**ours.state_dict(), "loss.logvar": torch.zeros(())})


MANIFESTS = [  # (file, VAE prefix, layout)
    ("sd15_single_file.json", "first_stage_model.", "ours"),
    ("sd15_diffusers.json", "vae/", "diffusers"),              # legacy attention names
    ("sdxl_base_diffusers.json", "vae/", "diffusers"),         # new attention names
    ("ldm_text2im_large_256_diffusers.json", "vqvae/", "diffusers"),
]


@pytest.mark.parametrize("file,prefix,layout", MANIFESTS)
def test_official_layouts(file, prefix, layout):
    with open(os.path.join(REFERENCE, file)) as f:
        tensors = json.load(f)["tensors"]
    sd = {k[len(prefix):]: torch.empty(v["shape"], device="meta") for k, v in tensors.items()
          if k.startswith(prefix)}
    assert len(sd) == 248
    converted = vae_from_diffusers(sd) if layout == "diffusers" else sd
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert set(got) == set(want), f"missing {sorted(set(want) - set(got))[:5]}, " \
                                  f"extra {sorted(set(got) - set(want))[:5]}"
    bad = [f"{k} {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
    assert not bad, bad[:5]
    model.load_state_dict(converted, strict=True, assign=True)          # every parameter filled
    if layout == "diffusers":  # and back to the same names, shapes and attention naming
        naming = "legacy" if any(".query." in k for k in sd) else "new"
        back = vae_to_diffusers(converted, attention_names=naming)
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
