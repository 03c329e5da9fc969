"""UNet (minisd/unet.py, attention.py) and its name table (keys_unet.py) against diffusers' UNet2DConditionModel.

Tier 1: tiny random diffusers UNets of each family (SD1, SD2, SDXL, LDM, block-removed) are converted
with `unet_from_diffusers`, loaded strictly into ours built from `unet_config_from_diffusers(config)`,
and compared on outputs and on gradients w.r.t. the latents and the text states (fp32, CPU: bit-exact).
Then the official layouts: our module tree on the meta device must equal, name by name and shape by
shape, the UNet part of each official single-file manifest and (through the table) of each diffusers one.
"""
import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from conftest import REFERENCE, randomize
from minisd.config import LDM_256, SD2_BASE, SD2_V, SD15, SDXL_BASE, TINY
from minisd.formats.keys_unet import (diffusers_unet_config, unet_config_from_diffusers, unet_from_diffusers,
                              unet_name_pairs, unet_to_diffusers)
from minisd.perf.checkpoint import set_gradient_checkpointing
from minisd.unet import UNetModel, sdxl_vector_cond, timestep_embedding

# Measured max-abs difference vs diffusers, outputs and input gradients of every case: 0.0 (2-core x86 VM, torch
# 2.13 CPU): the same torch ops in the same order. Kept bit-exact; a planted change of a norm eps or a scale shows.
TOL = 0.0
CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
BASE = dict(block_out_channels=[32, 64], norm_num_groups=8, cross_attention_dim=32, sample_size=8)
POOLED, TIME_EMBED = 16, 8  # SDXL-style case: pooled text width and per-number sinusoid width

CASES = {
    # (a) SD1: 1x1-conv projections, a fixed number of heads (4 -> 8- and 16-wide heads)
    "sd1": dict(down_block_types=[CA_DOWN, DOWN], up_block_types=[UP, CA_UP], layers_per_block=2,
                attention_head_dim=4),
    # (b) SD2: Linear projections, heads per level (2, 4) = a fixed head width of 16
    "sd2": dict(down_block_types=[CA_DOWN, CA_DOWN], up_block_types=[CA_UP, CA_UP], layers_per_block=1,
                attention_head_dim=[2, 4], use_linear_projection=True, cross_attention_dim=48),
    # (c) SDXL: no attention at level 0, depth 2 at level 1 (and in the middle), text_time vector conditioning
    "sdxl": dict(down_block_types=[DOWN, CA_DOWN], up_block_types=[CA_UP, UP], layers_per_block=2,
                 transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                 projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED),
    # (d) LDM: context (80) wider than the model (32, 64), fixed 8 heads
    "ldm": dict(down_block_types=[CA_DOWN, DOWN], up_block_types=[UP, CA_UP], layers_per_block=1,
                attention_head_dim=8, cross_attention_dim=80),
    # (e) block-removed (BK-SDM / segmind style): per-level layers_per_block, no middle block, 3 levels
    "removed": dict(block_out_channels=[32, 64, 64], down_block_types=[CA_DOWN, CA_DOWN, DOWN],
                    up_block_types=[UP, CA_UP, CA_UP], layers_per_block=[1, 2, 1], mid_block_type=None,
                    attention_head_dim=4),
}


def make_pair(name: str, seed: int = 0):
    """A random diffusers UNet and ours with its weights (converted by the table, loaded strictly)."""
    config = {**BASE, **CASES[name]}
    theirs = randomize(UNet2DConditionModel(**config), seed=seed).eval()
    cfg = unet_config_from_diffusers(dict(theirs.config))
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), cfg), strict=True)
    return theirs, ours, cfg


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name):
    theirs, ours, cfg = make_pair(name)
    g = torch.Generator().manual_seed(1)
    B = 2
    # 10x6 latents with 3 levels (10x6 -> 5x3 -> 3x2) also exercise the odd-size upsampling.
    H, W = (10, 6) if name == "removed" else (8, 8)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    ctx = torch.randn(B, 7, cfg.context_dim, generator=g)
    t = torch.tensor([999.0, 17.5]) if name != "ldm" else torch.tensor([999, 3])   # float and int timesteps
    w = torch.randn(B, cfg.out_channels, H, W, generator=g)    # random cotangent for the gradients
    kwargs, y = {}, None
    pooled = torch.randn(B, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 832.0, 1216.0]])

    results = []
    for model in (theirs, ours):
        xi, ci, pi = (v.clone().requires_grad_(True) for v in (x, ctx, pooled))
        if model is theirs:
            if name == "sdxl":
                kwargs = {"added_cond_kwargs": {"text_embeds": pi, "time_ids": time_ids}}
            out = model(xi, t, encoder_hidden_states=ci, **kwargs).sample
        else:
            if name == "sdxl":
                y = sdxl_vector_cond(pi, time_ids, embed_dim=TIME_EMBED)
            out = model(xi, t, ci, y=y)
        inputs = [xi, ci] + ([pi] if name == "sdxl" else [])
        grads = torch.autograd.grad((out * w).sum(), inputs)
        results.append((out.detach(), grads))

    (ref, ref_g), (got, got_g) = results
    assert got.shape == ref.shape == x.shape[:1] + (cfg.out_channels, H, W)
    d = max_diff(got, ref)
    assert d <= TOL, f"{name}: output max diff {d:.3g} (ref max |.| {ref.abs().max():.3g})"
    for label, a, b in zip(("x", "context", "pooled"), got_g, ref_g):
        d = max_diff(a, b)
        assert d <= TOL, f"{name}: grad w.r.t. {label} max diff {d:.3g} (ref max |.| {b.abs().max():.3g})"


@pytest.mark.parametrize("name", list(CASES))
def test_table_round_trip_and_config(name):
    theirs, ours, cfg = make_pair(name)
    sd = theirs.state_dict()
    back = unet_to_diffusers(unet_from_diffusers(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # Our config written back as a diffusers config builds the same diffusers model (what export does).
    extra = {"addition_time_embed_dim": TIME_EMBED} if cfg.adm_in_channels else {}
    rebuilt = UNet2DConditionModel(**diffusers_unet_config(cfg, **extra))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert unet_config_from_diffusers(diffusers_unet_config(cfg, **extra)) == cfg


def test_table_is_strict():
    theirs, _, cfg = make_pair("sd1")
    sd = dict(theirs.state_dict())
    with pytest.raises(KeyError, match="unconsumed"):
        unet_from_diffusers({**sd, "down_blocks.0.extra.weight": torch.zeros(1)}, cfg)
    sd.pop("up_blocks.1.attentions.2.proj_out.bias")
    with pytest.raises(KeyError, match="missing"):
        unet_from_diffusers(sd, cfg)
    # Only the converted module pairs, once each.
    pairs = unet_name_pairs(cfg)
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)


def test_gradient_checkpointing_same_gradients():
    _, ours, cfg = make_pair("sdxl")
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g)
    t = torch.tensor(500.0)                       # one 0-dim timestep for the whole batch
    results = []
    for on in (False, True):
        set_gradient_checkpointing(ours, on)
        ours.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = ours(xi, t, ctx, y=y)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in ours.named_parameters()}))
    (o0, gx0, gp0), (o1, gx1, gp1) = results
    assert torch.equal(o0, o1)
    # Same operations, but the recompute's inner backward sums some gradients in another order:
    # equal up to fp32 rounding, judged relative to each gradient's largest entry.
    rel = lambda a, b: max_diff(a, b) / b.abs().max().item()
    worst = max([rel(gx1, gx0)] + [rel(gp1[n], gp0[n]) for n in gp0])
    assert worst < 3e-6, f"gradients differ by {worst:.3g} (relative) with checkpointing"  # measured 7.8e-7


@pytest.mark.parametrize("dim", [320, 7])
def test_timestep_embedding(dim):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    d = max_diff(timestep_embedding(t, dim), ref)
    assert d <= 0.0, f"timestep embedding max diff {d:.3g}"  # measured 0.0: bit-exact


# ------------------------------------------------------------------------------------ official layouts

def manifest(file: str, prefix: str) -> dict:
    tensors = json.load(open(os.path.join(REFERENCE, file)))["tensors"]
    return {k[len(prefix):]: tuple(v["shape"]) for k, v in tensors.items() if k.startswith(prefix)}


def meta_shapes(cfg) -> dict:
    with torch.device("meta"):
        model = UNetModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare(ours: dict, ref: dict, what: str):
    assert ours.keys() == ref.keys(), (f"{what}: only ours {sorted(ours.keys() - ref.keys())[:5]}, "
                                       f"only official {sorted(ref.keys() - ours.keys())[:5]}")
    wrong = [(k, ours[k], ref[k]) for k in ref if ours[k] != ref[k]]
    assert not wrong, f"{what}: shape mismatches, first {wrong[:5]}"


OFFICIAL = [  # preset, single-file manifest, diffusers manifest, diffusers unet config
    ("sd15", SD15, "sd15_single_file.json", "sd15_diffusers.json", "sd15/unet.json"),
    ("sd2_base", SD2_BASE, "sd2_base_single_file.json", None, "sd21_base/unet.json"),
    ("sd2_v", SD2_V, "sd21_768v_single_file.json", "sd21_768v_diffusers.json", "sd21_768v/unet.json"),
    ("sdxl_base", SDXL_BASE, "sdxl_base_single_file.json", "sdxl_base_diffusers.json", "sdxl_base/unet.json"),
    ("ldm_256", LDM_256, "ldm_txt2img_f8_large_original.json", "ldm_text2im_large_256_diffusers.json",
     "ldm_text2im_large_256/unet.derived.json"),
]


@pytest.mark.parametrize("name,preset,single,folder,config", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_official_layouts(name, preset, single, folder, config):
    ours = meta_shapes(preset.unet)
    compare(ours, manifest(single, "model.diffusion_model."), f"{name} single file")
    if folder:
        ref = manifest(folder, "unet/")
        meta = {k: torch.empty(s, device="meta") for k, s in ref.items()}
        mapped = {k: tuple(v.shape) for k, v in unet_from_diffusers(meta, preset.unet).items()}
        compare(ours, mapped, f"{name} diffusers folder")
    official = json.load(open(os.path.join(REFERENCE, "configs", config)))
    assert unet_config_from_diffusers(official) == preset.unet
    # Our diffusers config agrees with the official one on every key both have.
    mine = diffusers_unet_config(preset.unet)
    differ = {k: (mine[k], official[k]) for k in mine.keys() & official.keys() if mine[k] != official[k]}
    assert not differ, f"{name}: diffusers config differs: {differ}"


def test_tiny_preset_round_trips():
    assert unet_config_from_diffusers(diffusers_unet_config(TINY.unet)) == TINY.unet
