"""LoRA files as kohya sd-scripts' own code lays them out (tests/kohya_lora.py, a port of its networks/lora.py naming
and tensors), read by minisd and by diffusers, merged weights against the equation worked by hand:

    W' = W + s · (alpha / dim) · up @ down          (conv: up [out, dim, 1, 1], down [dim, in, kh, kw], flattened)

in float64 from the file's tensors, for every module the file names. SD1 with conv layers (LoCon: conv_dim on
ResnetBlock2D / Downsample2D / Upsample2D, which also gives their Linear time_emb_proj and 1x1 shortcut the network dim)
and SDXL with both text encoders (lora_te1_ / lora_te2_, Stability-named UNet as kohya's SDXL UNet is). minisd must
place every key (no module left over, no tensor unread, no other weight touched); diffusers' `load_lora_weights` +
`fuse_lora(lora_scale=s)` is held to the same hand-computed weights.

The generator's keys and shapes equal those of kohya's own LoRANetwork (tools/check_kohya_fixture.py, run by hand on an
sd-scripts checkout: SD1 387 keys, full-size SDXL 2436 keys, all equal). Which module a key names comes from the tree
the generator walked (each kohya name is built from a real module of
the diffusers / transformers model), so the expected weight sits at a known diffusers path, and through `sgm_tree`
(checked here against diffusers' single-file converter) at a known Stability path = minisd's module path.
"""
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT
from kohya_lora import lora_module_tensors, network_modules, sgm_tree, transformers4_tree, write_kohya_lora
from minisd.adapters.mix import apply_adapters
from minisd.formats import load_model
from minisd.formats.lora_read import read_adapter_file
from test_e2e import (clip_tokenizer, make_scheduler, scheduler_config, tiny_clip, tiny_sdxl_pipeline, tiny_unet,
                      tiny_vae)

torch.set_num_threads(1)
# Merged weight vs the float64 hand computation, max-abs over all modules (2-core x86 VM, fp32 weights of std 0.05,
# updates 2e-3 to 6e-2): minisd 7.7e-9 to 8.6e-9 over the generated and kohya-written files, diffusers the same - the
# fp32 rounding of the ΔW product and of W + ΔW (half an ulp of 0.1 is 3.7e-9). Bound ~3x.
TOL = 3e-8


def sd1_pipeline():
    unet = tiny_unet(3, layers_per_block=2)  # two resnets per level: 1x1 shortcuts, up/downsamplers, 3x3 convs
    return StableDiffusionPipeline(vae=tiny_vae(1), text_encoder=tiny_clip(2), tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=make_scheduler("ddim", scheduler_config("sd15/scheduler_config.json")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("kohya_sd1")
    sd1_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("kohya_sdxl")
    tiny_sdxl_pipeline().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("make", [lambda: sd1_pipeline().unet, lambda: tiny_sdxl_pipeline().unet])
def test_sgm_tree_is_stabilitys_layout(make):
    """The Stability-named tree the SDXL generator walks: diffusers' own single-file converter maps its state dict
    back onto the diffusers UNet key for key, tensor for tensor."""
    unet = make()
    sd = {"model.diffusion_model." + k: v for k, v in sgm_tree(unet).state_dict().items()}
    back = convert_ldm_unet_checkpoint(sd, dict(unet.config))
    ref = unet.state_dict()
    assert set(back) == set(ref), sorted(set(back) ^ set(ref))[:6]
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def expected(lora, tensors, scale):
    """{lora_name: W + s·(alpha/dim)·up@down} in float64 from the file's tensors (the hand computation)."""
    out = {}
    for name, (module, dim, alpha) in lora.items():
        down = tensors[name + ".lora_down.weight"].double().flatten(1)
        up = tensors[name + ".lora_up.weight"].double().flatten(1)
        assert float(tensors[name + ".alpha"]) == alpha and down.shape[0] == dim
        out[name] = module.weight.double() + scale * (alpha / dim) * (up @ down).reshape(module.weight.shape)
    return out


def trees_and_paths(pipe, transformers4=True):
    """(text-encoder trees, UNet tree) kohya walks for this pipeline, and {id(module): diffusers path},
    {id(module): minisd path}. transformers4: the text-encoder names of kohya's pinned transformers 4.54.1
    (`text_model.` inside), else those kohya writes under transformers 5."""
    sdxl = isinstance(pipe, StableDiffusionXLPipeline)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    trees = [transformers4_tree(te) if transformers4 else te for te in encoders]
    tree = sgm_tree(pipe.unet)
    diff = {id(m): "unet." + p for p, m in pipe.unet.named_modules()}
    ours = {id(m): "unet." + p for p, m in tree.named_modules()}  # minisd's UNet has Stability's names
    comps = ["text_encoder", "text_encoder_2"]
    for i, te in enumerate(encoders):
        diff.update({id(m): f"{comps[i]}.{p}" for p, m in te.named_modules()})
        # minisd's CLIP keeps transformers 4's `text_model.` (the official key names)
        ours.update({id(m): f"text_encoders.{i}.{p}" for p, m in transformers4_tree(te).named_modules()})
    # SD1: kohya's original_unet has diffusers' names, so the diffusers UNet is the tree; SDXL: Stability's names
    return trees, (tree if sdxl else pipe.unet), diff, ours


def generate(folder, pipe_cls, path, transformers4=True, **kw):
    """Write the kohya file for the pipeline in `folder`; returns ({lora_name: (module, dim, alpha)},
    {lora_name: diffusers path}, {lora_name: minisd path}, tensors)."""
    pipe = pipe_cls.from_pretrained(folder)
    trees, unet, diff, ours = trees_and_paths(pipe, transformers4)
    lora = write_kohya_lora(path, trees, unet, sdxl=pipe_cls is StableDiffusionXLPipeline, **kw)
    return (lora, {n: diff[id(m)] for n, (m, *_) in lora.items()}, {n: ours[id(m)] for n, (m, *_) in lora.items()},
            load_file(path))


def check_minisd(folder, path, lora, ours_path, tensors, scale):
    model = load_model(folder).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = read_adapter_file(model, path)
    # every key read (nothing dropped), one minisd module per kohya module, each where its source module is
    assert sum(len(t) for t in adapter.modules.values()) == len(tensors)
    assert set(adapter.modules) == {ours_path[n] for n in lora}, sorted(set(adapter.modules) ^ set(ours_path.values()))
    apply_adapters(model, [(adapter.modules, adapter.ranks, scale, "kohya")], merge=True)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {ours_path[n] + ".weight" for n in lora}  # no other weight touched
    ref = expected(lora, tensors, scale)
    diffs = [(after[ours_path[n] + ".weight"].double() - ref[n]).abs().max().item() for n in lora]
    return max(diffs)


def check_diffusers(folder, pipe_cls, path, lora, diff_path, tensors, scale):
    from peft.tuners.tuners_utils import BaseTunerLayer
    pipe = pipe_cls.from_pretrained(folder)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=scale, components=["unet", "text_encoder"] +
                   (["text_encoder_2"] if pipe_cls is StableDiffusionXLPipeline else []))
    ref = expected(lora, tensors, scale)
    comps = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    adapted = sum(isinstance(m, BaseTunerLayer) for c in comps for m in getattr(pipe, c).modules())
    assert adapted == len(lora), (adapted, len(lora))  # diffusers placed every module the file names, no more
    diffs = []
    for n in lora:
        comp, _, inner = diff_path[n].partition(".")
        mod = getattr(pipe, comp).get_submodule(inner)
        w = mod.get_base_layer().weight if isinstance(mod, BaseTunerLayer) else mod.weight
        diffs.append((w.double() - ref[n]).abs().max().item())
    return max(diffs)


def effect(lora, tensors, scale):
    ref = expected(lora, tensors, scale)
    return min((ref[n] - m.weight.double()).abs().max().item() for n, (m, *_) in lora.items())


@pytest.mark.parametrize("scale,transformers4", [(0.7, True), (-0.4, False)])
def test_sd1_kohya_file_with_conv_layers(sd1, tmp_path, scale, transformers4):
    path = str(tmp_path / "kohya_sd1.safetensors")
    lora, diff_path, ours_path, tensors = generate(sd1, StableDiffusionPipeline, path, transformers4, lora_dim=4,
                                                   alpha=3.0, conv_dim=2, conv_alpha=1.5, seed=1)
    names = set(lora)
    # what the generator wrote is kohya's SD1 layout: names, shapes, alpha, metadata
    te = "lora_te_text_model_encoder_layers_" if transformers4 else "lora_te_encoder_layers_"
    assert te + "0_self_attn_q_proj" in names and te + "1_mlp_fc2" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj" in names
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    assert tensors["lora_unet_down_blocks_0_downsamplers_0_conv.alpha"].item() == 1.5
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors["lora_unet_up_blocks_0_resnets_1_time_emb_proj.alpha"].item() == 3.0
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in names and "lora_unet_mid_block_resnets_1_conv2" in names
    assert not any("conv_in" in n or "conv_out" in n or "time_embedding" in n for n in names)  # not in a target class
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert len(meta["sshs_model_hash"]) == 64
    print(f"SD1 kohya file: {len(lora)} modules ({sum(t.ndim == 4 and t.shape[-1] == 3 for t in tensors.values())} "
          f"3x3 convs), {len(tensors)} tensors; smallest max |ΔW| {effect(lora, tensors, scale):.1e}")

    d_ours = check_minisd(sd1, path, lora, ours_path, tensors, scale)
    d_diff = check_diffusers(sd1, StableDiffusionPipeline, path, lora, diff_path, tensors, scale)
    print(f"max |W' - hand|: minisd {d_ours:.1e}, diffusers {d_diff:.1e}")
    assert d_ours <= TOL and d_diff <= TOL, (d_ours, d_diff)
    assert effect(lora, tensors, scale) > 1000 * TOL  # every module's update is far above the tolerance


def test_sdxl_kohya_file_both_text_encoders(sdxl, tmp_path):
    scale = 0.8
    path = str(tmp_path / "kohya_sdxl.safetensors")
    lora, diff_path, ours_path, tensors = generate(sdxl, StableDiffusionXLPipeline, path, lora_dim=4, alpha=1.0,
                                                   conv_dim=2, conv_alpha=2.0, seed=2)
    names = set(lora)
    assert not any(n.startswith("lora_te_") for n in names)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in names
    assert not any("text_projection" in n for n in names)  # te2's projection is outside CLIPAttention / CLIPMLP
    # Stability's names, as kohya's SDXL UNet has them (tiny: one resnet per level, attention at level 1 with depth 2)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_middle_block_1_proj_in" in names and "lora_unet_middle_block_2_in_layers_2" in names
    assert "lora_unet_output_blocks_1_2_conv" in names and "lora_unet_input_blocks_2_0_op" in names
    assert "lora_unet_input_blocks_3_0_skip_connection" in names and "lora_unet_output_blocks_0_0_emb_layers_1" in names
    assert tensors["lora_unet_input_blocks_1_0_out_layers_3.lora_down.weight"].shape == (2, 32, 3, 3)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    te1 = sum(n.startswith("lora_te1_") for n in names)
    te2 = sum(n.startswith("lora_te2_") for n in names)
    print(f"SDXL kohya file: {len(lora)} modules (te1 {te1}, te2 {te2}), {len(tensors)} tensors")

    d_ours = check_minisd(sdxl, path, lora, ours_path, tensors, scale)
    d_diff = check_diffusers(sdxl, StableDiffusionXLPipeline, path, lora, diff_path, tensors, scale)
    print(f"max |W' - hand|: minisd {d_ours:.1e}, diffusers {d_diff:.1e}")
    assert d_ours <= TOL and d_diff <= TOL, (d_ours, d_diff)
    assert effect(lora, tensors, scale) > 1000 * TOL


@pytest.mark.parametrize("which,scale", [("sd1", 0.6), ("sdxl", 1.2)])
def test_files_written_by_kohyas_own_code(request, which, scale):
    """tests/golden/kohya_{sd1_locon,sdxl}.safetensors were written by kohya's own LoRANetwork + save_weights (fp16,
    dim 4 alpha 2, conv_dim 2 conv_alpha 1; tools/check_kohya_fixture.py) for these tiny pipelines' configs. Their keys
    and shapes are the generator's, and minisd and diffusers merge them to the hand-computed weights."""
    folder = request.getfixturevalue(which)
    path = os.path.join(ROOT, "tests", "golden", f"kohya_{'sd1_locon' if which == 'sd1' else 'sdxl'}.safetensors")
    tensors = load_file(path)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    pipe_cls = StableDiffusionXLPipeline if which == "sdxl" else StableDiffusionPipeline
    trees, unet, diff, ours = trees_and_paths(pipe_cls.from_pretrained(folder))
    mods = network_modules(trees, unet, 4, 2.0, 2, 1.0)
    gen = torch.Generator().manual_seed(0)
    shapes = {f"{n}.{k}": tuple(v.shape) for n, m, d, a in mods for k, v in lora_module_tensors(m, d, a, gen).items()}
    assert shapes == {k: tuple(v.shape) for k, v in tensors.items()}, sorted(set(shapes) ^ set(tensors))[:6]
    lora = {n: (m, d, float(a)) for n, m, d, a in mods}
    d_ours = check_minisd(folder, path, lora, {n: ours[id(m)] for n, (m, *_) in lora.items()}, tensors, scale)
    d_diff = check_diffusers(folder, pipe_cls, path, lora, {n: diff[id(m)] for n, (m, *_) in lora.items()}, tensors,
                             scale)
    print(f"{which}: kohya's own file, {len(lora)} modules; max |W' - hand|: minisd {d_ours:.1e}, "
          f"diffusers {d_diff:.1e}")
    assert d_ours <= TOL and d_diff <= TOL, (d_ours, d_diff)
    assert effect(lora, tensors, scale) > 1000 * TOL
