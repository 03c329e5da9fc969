"""`sample.py --lora FILE[:SCALE]` against the reference tools, on tiny random pipelines (32 px, 3 steps, CPU):

- files minisd writes (kohya layout with either UNet naming, diffusers/PEFT layout, LoRA and DoRA, UNet and text
  encoders, SD1 / SD2 / SDXL): the PNG equals diffusers' `load_lora_weights` + `fuse_lora(lora_scale=s)` at the same
  strength within 1/255 per pixel (test_e2e's bound); two files mixed equal diffusers' `set_adapters` with the two
  weights, one of them negative;
- LoHa / LoKr / LoCon kohya files: the merged weights equal the `lycoris-lora` package's own merge
  (`lycoris.utils.merge`, run on minisd's modules, whose paths are the SGM names kohya files use) within fp32 round-off;
- files written by other tools' code: PEFT + diffusers `save_lora_weights` with alpha != rank in the header;
- `--lora-merge` draws the same image; bad files end with one `error:` line.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from conftest import save_tiny_sdxl
from minisd import adapters
from minisd.formats import load_model
from minisd.formats.lora_files import save_diffusers, save_kohya
from test_e2e import (clip_tokenizer, make_scheduler, run_cli, scheduler_config, tiny_clip, tiny_sdxl_pipeline,
                      tiny_unet, tiny_vae)

torch.set_num_threads(1)
UNET_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT = "a small red circle at the top left"
SAMPLE = ["--steps", "3", "--sampler", "euler", "--cfg", "5", "--seed", "4", "--width", "32", "--height", "32",
          "--device", "cpu"]


def sd1_pipe(seed=1, sd2=False):
    kw = dict(use_linear_projection=True, attention_head_dim=(2, 4)) if sd2 else {}
    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_clip(seed + 1, act="gelu" if sd2 else "quick_gelu"),
        tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"), unet=tiny_unet(seed + 2, **kw),
        scheduler=make_scheduler("euler", scheduler_config("sd15/scheduler_config.json")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    sd1_pipe().save_pretrained(path)
    return str(path)


def adapted(folder, kind="lora", seed=1, te=True, rank=4, alpha=2.0, conv=False, **kw):
    """The minisd model of `folder` with a random non-zero adapter of `kind` in the UNet and text encoder(s)."""
    model = load_model(folder).eval()
    torch.manual_seed(seed)
    convs = ["in_layers.2", "out_layers.3"] if conv else []  # the ResBlock 3x3 convs (LoCon)
    adapters.inject(model.unet, kind, UNET_TARGETS + convs, rank=rank, alpha=alpha,
                    conv_rank=rank if conv else None, conv_alpha=alpha, **kw)
    if te:
        for enc in model.text_encoders:
            adapters.inject(enc, kind, TE_TARGETS, rank=rank, alpha=alpha, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model):
            if p.ndim:  # the zero-initialised factor (and the others) get noise; magnitudes a few % off
                p.add_(torch.randn(p.shape, generator=g) * (0.1 * p.abs().mean() + 0.3))
    return model


def draw(folder, tmp_path, *flags, name="ours.png"):
    out = tmp_path / name
    assert sample.main([PROMPT, "--model", folder, *SAMPLE, "--out", str(out), *flags]) == 0
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16), out


def reference(pipe):
    return np.asarray(pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                           generator=torch.Generator().manual_seed(4)).images[0].convert("RGB"), dtype=np.int16)


def assert_close(ours, ref, base=None):
    assert ref.std() > 2.0, "flat reference image"
    diff = np.abs(ours - ref).max()
    assert diff <= 1, f"max pixel difference {diff}/255"
    if base is not None:  # the adapter changed the picture, so "equal" is not trivially true
        assert np.abs(base - ref).max() > 10, np.abs(base - ref).max()


# ------------------------------------------------------------------------------------------- vs diffusers
@pytest.mark.parametrize("fmt,scale", [("kohya", 0.7), ("diffusers", 1.3), ("kohya", -0.6)])
def test_minisd_file_matches_diffusers(sd1, tmp_path, fmt, scale):
    model = adapted(sd1)
    path = str(tmp_path / f"{fmt}.safetensors")
    (save_kohya if fmt == "kohya" else save_diffusers)(model, path)
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    base = reference(pipe)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=scale)
    ref = reference(pipe)
    ours, out = draw(sd1, tmp_path, "--lora", f"{path}:{scale}")
    assert_close(ours, ref, base)
    assert f"Lora: {fmt}:{scale:g}" in Image.open(out).text["parameters"]
    merged, _ = draw(sd1, tmp_path, "--lora", f"{path}:{scale}", "--lora-merge", name="merged.png")
    assert_close(merged, ref)


def test_two_files_mixed_match_diffusers_set_adapters(sd1, tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_kohya(adapted(sd1, seed=1), a)
    save_diffusers(adapted(sd1, seed=2), b)
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, -0.5])
    ref = reference(pipe)
    ours, _ = draw(sd1, tmp_path, "--lora", f"{a}:0.8", "--lora", f"{b}:-0.5")
    assert_close(ours, ref)
    merged, _ = draw(sd1, tmp_path, "--lora", f"{a}:0.8", "--lora", f"{b}:-0.5", "--lora-merge", name="m.png")
    assert_close(merged, ref)


@pytest.mark.parametrize("scale", [1.0, 0.3, 1.7])
def test_dora_diffusers_file_matches_diffusers(sd1, tmp_path, scale):
    """UNet-only: diffusers 0.42 + transformers 5 do not load text-encoder DoRA magnitudes (test_lora_formats).
    At strength != 1 minisd's DoRA is PEFT's (m scales ΔW inside the norm), so the image equals diffusers' fuse_lora
    at every strength; ComfyUI / A1111 blend instead (README, "DoRA at strength λ")."""
    path = str(tmp_path / "dora.safetensors")
    save_diffusers(adapted(sd1, "dora", te=False), path)
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    base = reference(pipe)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=scale)
    ours, _ = draw(sd1, tmp_path, "--lora", f"{path}:{scale:g}")
    assert_close(ours, reference(pipe), base)


def test_sd2_kohya_file_matches_diffusers(tmp_path):
    folder = str(tmp_path / "sd2")
    sd1_pipe(seed=4, sd2=True).save_pretrained(folder)
    path = str(tmp_path / "sd2_kohya.safetensors")
    save_kohya(adapted(folder), path)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    base = reference(pipe)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=0.8)
    ours, _ = draw(folder, tmp_path, "--lora", f"{path}:0.8")
    assert_close(ours, reference(pipe), base)


sdxl_pipe = tiny_sdxl_pipeline  # the shared tiny SDXL pipeline of test_e2e


@pytest.mark.parametrize("naming", ["sgm", "diffusers"])
def test_sdxl_kohya_file_both_text_encoders_matches_diffusers(tmp_path, naming):
    folder = str(tmp_path / "xl")
    sdxl_pipe().save_pretrained(folder)
    path = str(tmp_path / "xl_kohya.safetensors")
    save_kohya(adapted(folder), path, naming=naming)
    keys = load_file(path)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    base = reference(pipe)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=0.75)
    ours, _ = draw(folder, tmp_path, "--lora", f"{path}:0.75")
    assert_close(ours, reference(pipe), base)


def test_peft_made_file_with_alpha_in_header_matches_diffusers(sd1, tmp_path):
    """A file written by diffusers' own code from a PEFT adapter (r=4, lora_alpha=12: scale 3, known only from the
    `lora_adapter_metadata` header), UNet and text encoder."""
    from peft import LoraConfig, get_peft_model_state_dict
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    ucfg = LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    tcfg = LoraConfig(r=2, lora_alpha=1, init_lora_weights=False, target_modules=["q_proj", "fc1"])
    torch.manual_seed(3)
    pipe.unet.add_adapter(ucfg)
    pipe.text_encoder.add_adapter(tcfg)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "peft"), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    path = str(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    ref_pipe = StableDiffusionPipeline.from_pretrained(sd1)
    base = reference(ref_pipe)
    ref_pipe.load_lora_weights(path)
    ref_pipe.fuse_lora(lora_scale=0.5)
    ours, _ = draw(sd1, tmp_path, "--lora", f"{path}:0.5")
    assert_close(ours, reference(ref_pipe), base)


# ------------------------------------------------------------------------------------------- vs LyCORIS
@torch.no_grad()
def lycoris_merged(folder, path, scale):
    """The minisd base model with the file applied by the lycoris-lora package's own loader: its `get_module` /
    `make_module` build each module from the file (on minisd's layers, whose paths are the names kohya files use),
    and the weight becomes what the module's forward computes with, W + m·get_weight(). (Its `merge_to` agrees for
    LoRA; for LoHa / LoKr lycoris-lora 4.1.3 applies alpha/rank twice there - `get_weight` scales and
    `get_diff_weight` scales again - unlike its own forward and every other reader: test_lycoris_merge_to_scale.)"""
    from lycoris.modules import get_module, make_module
    model = load_model(folder).eval()
    sd = {k: v.float() for k, v in load_file(path).items()}
    prefixes = [("lora_unet", model.unet)] + [
        ("lora_te" if len(model.text_encoders) == 1 else f"lora_te{i + 1}", te) for i, te in enumerate(model.text_encoders)]
    for prefix, root in prefixes:
        for name, mod in root.named_modules():
            kind, params = get_module(sd, f"{prefix}.{name}".replace(".", "_"))
            if kind is None:
                continue
            module = make_module(kind, params, name, mod)
            if kind.__name__ == "LoConModule":
                module.merge_to(scale)
            else:
                mod.weight += module.get_weight(mod.weight.shape) * scale
    return model


def minisd_merged(folder, path, scale):
    from minisd.adapters.mix import apply_adapters
    from minisd.formats.lora_read import read_adapter_file
    model = load_model(folder).eval()
    f = read_adapter_file(model, path)
    apply_adapters(model, [(f.modules, f.ranks, scale, path)], merge=True)
    return model


def assert_same_weights(a, b, tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), sorted(set(sa) ^ set(sb))[:5]
    bad = [(k, (v - sb[k]).abs().max().item()) for k, v in sa.items()
           if (v - sb[k]).abs().max().item() > tol * max(1.0, v.abs().max().item())]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"


@pytest.mark.parametrize("kind,kw", [("loha", {}), ("lokr", {}), ("lokr", {"factor": 4, "decompose_both": True}),
                                     ("lora", {"conv": True}), ("lokr", {"rank": 16, "alpha": 3.0})])
def test_lycoris_files_merge_like_lycoris(sd1, tmp_path, kind, kw):
    """LoHa, LoKr (factored W2; both factors decomposed; both full with alpha 3 != rank 16, whose scale the file must
    fold in: issue 16 (a)), LoCon (LoRA on the 3x3 convs), SGM names, UNet and text encoder."""
    kw = dict(kw)
    conv = kw.pop("conv", False)
    model = adapted(sd1, kind, conv=conv, **kw)
    path = str(tmp_path / f"{kind}.safetensors")
    save_kohya(model, path, naming="sgm")
    ours, ref = minisd_merged(sd1, path, 0.8), lycoris_merged(sd1, path, 0.8)
    base = load_model(sd1)
    changed = [k for k, v in ref.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > 10, changed
    assert_same_weights(ours, ref, 1e-6)
    # and minisd's model with the adapters merged in memory (the file round trip changes nothing)
    adapters.set_scale(model, 0.8)
    adapters.remove(model, merge=True)
    assert_same_weights(model, ours, 1e-6)


def test_lycoris_merge_to_scale(sd1, tmp_path):
    """Pins the lycoris-lora 4.1.3 behaviour named in lycoris_merged: `merge_to` of a LoHa with alpha 2, rank 4 adds
    (alpha/rank)² ΔW, its forward (alpha/rank) ΔW. With alpha = rank the two agree with minisd."""
    from lycoris.utils import merge
    for alpha, factor in ((2.0, 0.5), (4.0, 1.0)):
        path = str(tmp_path / f"loha{alpha}.safetensors")
        save_kohya(adapted(sd1, "loha", te=False, alpha=alpha), path, naming="sgm")
        base, ours = load_model(sd1), minisd_merged(sd1, path, 1.0)
        ref = load_model(sd1).eval()
        merge(list(ref.text_encoders), ref.unet, load_file(path), scale=1.0)
        k = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        d_ours = ours.unet.state_dict()[k] - base.unet.state_dict()[k]
        d_ref = ref.unet.state_dict()[k] - base.unet.state_dict()[k]
        assert torch.allclose(d_ref, factor * d_ours, atol=1e-6), alpha


def test_full_lokr_file_scale_is_folded(sd1, tmp_path):
    """LoKr with both factors full and alpha 3 != rank 16: the file holds W1·(3/16) and alpha = rank, so readers that
    apply scale 1 (all of them: the tensors show no rank) get the trained update."""
    model = adapted(sd1, "lokr", rank=16, alpha=3.0, te=False)
    path = str(tmp_path / "lokr.safetensors")
    save_kohya(model, path, naming="sgm")
    sd = load_file(path)
    full = [k[: -len(".lokr_w1")] for k in sd if k.endswith(".lokr_w1")]
    full = [n for n in full if n + ".lokr_w2" in sd]
    assert full and all(float(sd[n + ".alpha"]) == 16 for n in full)
    # the folded factor: W1' = (3/16) W1 of the trained layer
    layer = model.unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    stored = sd["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lokr_w1"]
    assert torch.allclose(stored, layer.lokr_w1.detach() * 3 / 16, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------- layouts / errors
def test_sgm_named_sd1_file_draws_like_diffusers_named(sd1, tmp_path):
    model = adapted(sd1)
    a, b = str(tmp_path / "sgm.safetensors"), str(tmp_path / "diff.safetensors")
    save_kohya(model, a, naming="sgm")
    save_kohya(model, b, naming="diffusers")
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(a))
    x, _ = draw(sd1, tmp_path, "--lora", a, name="a.png")
    y, _ = draw(sd1, tmp_path, "--lora", b, name="b.png")
    assert np.array_equal(x, y)


def test_minisd_native_file_and_aliases(sd1, tmp_path):
    """minisd's own file, and the spellings other converters use: lora_te1_ for SD1's only encoder (diffusers'
    convert_state_dict_to_kohya), CLIP paths without text_model (kohya under transformers 5), old attn-processor keys."""
    model = adapted(sd1)
    native = str(tmp_path / "native.safetensors")
    adapters.save_adapter(model, native)
    kohya = str(tmp_path / "k.safetensors")
    save_kohya(model, kohya)
    sd = load_file(kohya)
    alias = {k.replace("lora_te_text_model_", "lora_te1_"): v for k, v in sd.items()}
    save_file(alias, str(tmp_path / "alias.safetensors"))
    x, _ = draw(sd1, tmp_path, "--lora", native, name="n.png")
    y, _ = draw(sd1, tmp_path, "--lora", kohya, name="k.png")
    z, _ = draw(sd1, tmp_path, "--lora", str(tmp_path / "alias.safetensors"), name="a.png")
    assert np.array_equal(x, y) and np.array_equal(y, z)


def one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr
    assert sum(line.startswith("error:") for line in r.stderr.splitlines()) == 1
    for w in words:
        assert w in r.stderr, r.stderr


def test_bad_adapter_files_are_one_line_errors(sd1, tmp_path):
    path = str(tmp_path / "k.safetensors")
    save_kohya(adapted(sd1), path)
    sd = load_file(path)
    cli = ["x", "--model", sd1, "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "never.png")]
    bad = dict(sd, **{"lora_unet_down_blocks_0_nowhere.lora_down.weight": torch.zeros(4, 32)})
    save_file(bad, str(tmp_path / "unknown.safetensors"))
    one_line_error(run_cli(*cli, "--lora", str(tmp_path / "unknown.safetensors")), "lora_unet_down_blocks_0_nowhere")
    data = open(path, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(run_cli(*cli, "--lora", str(tmp_path / "cut.safetensors")), "cut.safetensors")
    xl = str(tmp_path / "xl")
    save_tiny_sdxl(xl)
    xl_file = str(tmp_path / "xl_lora.safetensors")
    save_kohya(adapted(xl), xl_file)
    one_line_error(run_cli(*cli, "--lora", xl_file), "sdxl")  # the header says SDXL, the model is SD1
    no_meta = str(tmp_path / "xl_nometa.safetensors")
    save_file(load_file(xl_file), no_meta)
    one_line_error(run_cli(*cli, "--lora", no_meta), "names no module")
    mid = dict(sd, **{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_mid.weight": torch.zeros(4, 4, 3, 3)})
    save_file(mid, str(tmp_path / "mid.safetensors"))
    one_line_error(run_cli(*cli, "--lora", str(tmp_path / "mid.safetensors")), "Tucker")
    one_line_error(run_cli(*cli, "--lora", str(tmp_path / "missing.safetensors")), "no such file")
    r = run_cli(*cli, "--lora", f"{path}:strong")
    assert r.returncode == 2 and "not a number" in r.stderr


@pytest.mark.parametrize("algo,kw", [("lora", {}), ("loha", {}), ("lokr", {"factor": 4})])
def test_file_written_by_lycoris_loads_and_computes_like_lycoris(sd1, tmp_path, algo, kw):
    """A LyCORIS network built and saved by the lycoris-lora package itself (`create_lycoris` on the diffusers UNet:
    `lycoris_` + diffusers module names, every Linear / Conv2d incl. 3x3 convs), alpha 2 != rank 4: minisd's UNet
    with the file at strength 0.8 equals the diffusers UNet running LyCORIS' own modules at multiplier 0.8."""
    from lycoris import create_lycoris
    from minisd.adapters.mix import apply_adapters
    from minisd.formats.lora_read import read_adapter_file
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    torch.manual_seed(5)
    net = create_lycoris(pipe.unet, 0.8, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, algo=algo, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = str(tmp_path / f"lycoris_{algo}.safetensors")
    net.save_weights(path, torch.float32, {})
    assert all(k.startswith("lycoris_") for k in load_file(path))
    model = load_model(sd1).eval()
    f = read_adapter_file(model, path)
    apply_adapters(model, [(f.modules, f.ranks, 0.8, path)])
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        ours = model.unet(x, t, ctx)
        net.set_multiplier(0.0)
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert (base - ref).abs().max() > 1e-2
