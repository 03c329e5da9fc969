"""convert.py's LoRA tools: layout conversion, baking into a model (a baked single file read by diffusers'
`from_single_file` equals diffusers' base + `load_lora_weights` + `fuse_lora`), SVD extraction and resizing (each
layer's reported error is the Eckart-Young bound √(Σ_{i>r} s_i²)/‖D‖, checked against the merged result)."""
import math
import subprocess
import sys
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import ROOT
from minisd import adapters
from minisd.formats import load_model
from minisd.formats.export import export_diffusers
from minisd.formats.lora_files import save_kohya
from test_sample_lora import adapted, assert_same_weights, minisd_merged, sd1_pipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1c")
    sd1_pipe().save_pretrained(path)
    return str(path)


def convert(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    return r


def ok(r):
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_layout_conversion_keeps_the_update(sd1, tmp_path, kind):
    model = adapted(sd1, kind)
    native = tmp_path / "native.safetensors"
    adapters.save_adapter(model, str(native))
    expected = minisd_merged(sd1, str(native), 1.0)
    for fmt in ("lora-kohya", "lora-diffusers", "lora-minisd"):
        out = tmp_path / f"{fmt}.safetensors"
        err = ok(convert(sd1, "--lora", native, "--to", fmt, out))
        assert ("DoRA" in err) == (kind == "dora")  # the export warning
        keys = list(load_file(out))
        prefix = {"lora-kohya": "lora_", "lora-diffusers": "unet.", "lora-minisd": "unet."}[fmt]
        assert any(k.startswith(prefix) for k in keys)
        assert_same_weights(minisd_merged(sd1, str(out), 1.0), expected, 1e-6)


def test_baked_single_file_loads_in_diffusers_and_equals_base_plus_lora(sd1, tmp_path):
    path = tmp_path / "k.safetensors"
    save_kohya(adapted(sd1), str(path))
    baked = tmp_path / "baked.safetensors"
    ok(convert(sd1, "--lora", f"{path}:0.7", "--to", "single-file", baked))
    export_diffusers(load_model(sd1), str(tmp_path / "cfg"))  # the tiny configs for from_single_file
    pipe = StableDiffusionPipeline.from_single_file(str(baked), config=str(tmp_path / "cfg"), local_files_only=True,
                                                    safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(sd1)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.7)
    base = StableDiffusionPipeline.from_pretrained(sd1)
    g = torch.Generator().manual_seed(0)
    x, t, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randint(0, 49407, (2, 77))
    with torch.no_grad():
        outs = []
        for p in (pipe, ref, base):
            ctx = p.text_encoder(ids)[0]
            outs.append((ctx, p.unet(x, t, encoder_hidden_states=ctx).sample))
    for i in range(2):
        assert (outs[0][i] - outs[1][i]).abs().max() < 1e-4, i
        assert (outs[0][i] - outs[2][i]).abs().max() > 1e-2, i  # the LoRA is in


def test_bake_two_files_to_minisd_and_diffusers_folders(sd1, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_kohya(adapted(sd1, seed=1), str(a))
    save_kohya(adapted(sd1, "loha", seed=2), str(b))
    ok(convert(sd1, "--lora", f"{a}:0.6", "--lora", f"{b}:-0.3", "--out", tmp_path / "baked"))
    ok(convert(tmp_path / "baked", "--to", "diffusers", tmp_path / "baked_diffusers"))
    expected = load_model(sd1)
    from minisd.adapters.mix import apply_adapters
    from minisd.formats.lora_read import read_adapter_file
    items = [(f.modules, f.ranks, w, p) for p, w in ((str(a), 0.6), (str(b), -0.3))
             for f in [read_adapter_file(expected, p)]]
    apply_adapters(expected, items, merge=True)
    assert_same_weights(load_model(str(tmp_path / "baked")), expected, 1e-6)
    assert_same_weights(load_model(str(tmp_path / "baked_diffusers")), expected, 1e-6)


def merged_delta(folder, path, key):
    m, base = minisd_merged(folder, path, 1.0), load_model(folder)
    return m.state_dict()[key] - base.state_dict()[key]


def test_extract_and_resize_errors_match_the_svd_bound(sd1, tmp_path):
    """tuned = base + a rank-4 LoRA (UNet, text encoder, 3x3 convs): rank 4 extracts it exactly; rank 2 and
    energy 0.9 leave exactly the reported relative error, which is the Eckart-Young bound."""
    lora = tmp_path / "l.safetensors"
    save_kohya(adapted(sd1, conv=True), str(lora))
    ok(convert(sd1, "--lora", lora, "--out", tmp_path / "tuned"))
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    conv_key = "unet.input_blocks.1.0.in_layers.2.weight"
    d = merged_delta(sd1, str(lora), key)
    d_conv = merged_delta(sd1, str(lora), conv_key)
    s = torch.linalg.svdvals(d.double())
    for flags, r in ((("--rank", 4, "--conv-rank", 4), 4), (("--rank", 2, "--conv-rank", 2), 2)):
        out = tmp_path / f"x{r}.safetensors"
        err = ok(convert(sd1, "--extract-from", tmp_path / "tuned", *flags, "--to", "lora-kohya", out))
        got = merged_delta(sd1, str(out), key)
        rel = ((got - d).norm() / d.norm()).item()
        bound = math.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())
        assert abs(rel - bound) < 1e-4, (r, rel, bound)
        line = next(l for l in err.splitlines() if "input_blocks.1.1.transformer_blocks.0.attn1.to_q:" in l)
        assert f"rank {r}," in line and abs(float(line.split()[-1]) - bound) < 1e-4, line
        got_conv = merged_delta(sd1, str(out), conv_key)
        assert ((got_conv - d_conv).norm() / d_conv.norm()).item() < (1e-4 if r == 4 else 1.0)
    # energy: every layer keeps >= 90 % of Σ s², so its error is at most √0.1
    out = tmp_path / "e.safetensors"
    err = ok(convert(sd1, "--extract-from", tmp_path / "tuned", "--energy", "0.9", "--to", "lora-minisd", out))
    errs = [float(l.split()[-1]) for l in err.splitlines() if "relative error" in l and l.startswith("  ")]
    assert errs and max(errs) <= math.sqrt(0.1) + 1e-6
    # resize the original file from rank 4 to 1: the same bound against its own ΔW
    small = tmp_path / "small.safetensors"
    ok(convert(sd1, "--lora", lora, "--rank", "1", "--to", "lora-kohya", small))
    rel = ((merged_delta(sd1, str(small), key) - d).norm() / d.norm()).item()
    assert abs(rel - math.sqrt((s[1:] ** 2).sum() / (s ** 2).sum())) < 1e-4
    assert {v.shape[0] for k, v in load_file(small).items() if k.endswith("lora_down.weight")} == {1}


def test_convert_lora_errors_are_one_line(sd1, tmp_path):
    from safetensors.torch import save_file
    lora = tmp_path / "l.safetensors"
    save_kohya(adapted(sd1, "loha"), str(lora))
    for args, word in (([sd1, "--lora", lora, "--to", "lora-diffusers", tmp_path / "o.safetensors"], "loha"),
                       ([sd1, "--lora", tmp_path / "none.safetensors", "--to", "lora-kohya", tmp_path / "o"],
                        "no such file")):
        r = convert(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error:") and word in r.stderr, r.stderr
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    r = convert(sd1, "--lora", tmp_path / "bad.safetensors", "--to", "single-file", tmp_path / "b.safetensors")
    assert r.returncode == 2 and "lora_unet_nowhere" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b.safetensors").exists()
