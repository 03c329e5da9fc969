"""convert.py: official layouts in (every manifest tensor routed or ignored on purpose), numbers equal
to diffusers' own loaders, exact round trips, and bad input refused in one line."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, ROOT, randomize

from minisd.config import LDM_256, SD2_BASE, SD2_V, SD15, SDXL_BASE, TINY
from minisd.model import StableDiffusion, is_minisd_folder
from minisd.formats.single_file import (config_for, detect_family, ema_name, join_checkpoint,
                                split_checkpoint)

DTYPES = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}
MANIFESTS = {"sd15_single_file.json": ("sd1", SD15), "sd21_768v_single_file.json": ("sd2", SD2_V),
             "sd2_base_single_file.json": ("sd2", SD2_V), "sdxl_base_single_file.json": ("sdxl", SDXL_BASE),
             "ldm_txt2img_f8_large_original.json": ("ldm", LDM_256)}


def manifest_state(name):
    with open(os.path.join(REFERENCE, name)) as f:
        tensors = json.load(f)["tensors"]
    return {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta") for k, v in tensors.items()}


def assert_fills(model_part, sd, what):
    own = {k: (tuple(v.shape)) for k, v in model_part.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert set(own) == set(got), f"{what}: missing {sorted(set(own) - set(got))[:3]} " \
                                 f"extra {sorted(set(got) - set(own))[:3]}"
    bad = [k for k in own if own[k] != got[k]]
    assert not bad, f"{what}: shape mismatch {bad[:3]}"


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_every_tensor_routed(manifest):
    family, preset = MANIFESTS[manifest]
    sd = manifest_state(manifest)
    assert detect_family(sd) == family
    cfg = config_for(family, sd, None)
    assert cfg.unet == preset.unet and cfg.text_encoders == preset.text_encoders
    split = split_checkpoint(sd, family, cfg)
    traced = [k for k, _ in split.trace]
    assert sorted(set(traced)) == sorted(sd), "every source tensor is consumed or ignored on purpose"
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    assert_fills(model.unet, split.components["unet"], "unet")
    assert_fills(model.vae, split.components["vae"], "vae")
    for i, te in enumerate(model.text_encoders):
        assert_fills(te, split.components["text_encoder" if i == 0 else f"text_encoder_{i + 1}"], f"te{i}")
    # dtypes are the file's (SDXL ships fp16)
    want = {v.dtype for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert {v.dtype for v in split.components["unet"].values()} == want
    # and the exporter rebuilds exactly the same names, shapes and dtypes
    back = join_checkpoint(split.components, family, cfg, split.extras)
    assert {k: (tuple(v.shape), v.dtype) for k, v in back.items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def test_sd15_full_file_with_ema_copies():
    sd = manifest_state("sd15_single_file.json")
    unet_keys = [k[len("model.diffusion_model."):] for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:
        sd[ema_name(k)] = torch.empty(sd["model.diffusion_model." + k].shape, device="meta")
    cfg = config_for("sd1", sd, None)
    used = split_checkpoint(sd, "sd1", cfg, ema=True)
    assert used.ema_used
    k = "input_blocks.1.1.proj_in.weight"
    assert used.components["unet"][k] is sd[ema_name(k)]
    raw = split_checkpoint(sd, "sd1", cfg, ema=False)
    assert not raw.ema_used and raw.components["unet"][k] is sd["model.diffusion_model." + k]
    assert sorted({k for k, _ in raw.trace}) == sorted(sd)


def test_sd2_prediction_override():
    sd = manifest_state("sd2_base_single_file.json")
    assert config_for("sd2", sd, None).schedule.prediction_type == "v_prediction"
    cfg = config_for("sd2", sd, "eps")
    assert cfg.schedule.prediction_type == "epsilon" and cfg.resolution == SD2_BASE.resolution


# ---------------------------------------------------------------------------------------------
# Numbers: tiny random official-layout files through minisd and through diffusers' loaders.

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return randomize(StableDiffusion(TINY), seed, 0.05).eval()


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_single_file_roundtrip_and_diffusers_loader(tmp_path):
    from diffusers import StableDiffusionPipeline
    from minisd.formats.export import export_diffusers, export_single_file

    ours = tiny_model(1)
    single = tmp_path / "tiny.safetensors"
    export_single_file(ours, None, str(single))
    # the exported file converts back into an equal minisd model ...
    r = run(str(single), "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert is_minisd_folder(tmp_path / "m")
    r = run(str(tmp_path / "m"), "--to", "single-file", str(tmp_path / "again.safetensors"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(single), load_file(tmp_path / "again.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and diffusers' own single-file loader reads it to the same numbers
    export_diffusers(ours, str(tmp_path / "cfg"))       # gives from_single_file the tiny configs
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(tmp_path / "cfg"),
                                                    local_files_only=True, safety_checker=None)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, 32)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        got = ours.unet(x, t, ctx)
        assert (ref - got).abs().max() <= 0.0  # measured 0.0 (bit-exact, as the UNet test)
        img = torch.rand(1, 3, 16, 16) * 2 - 1
        assert (pipe.vae.encode(img).latent_dist.mean - ours.vae.encode(img).mean).abs().max() <= 0.0  # measured 0.0
        ids = ours.tokenizers[0](["a red circle"])
        h_ref = pipe.text_encoder(ids).last_hidden_state
        assert (h_ref - ours.text_encoders[0](ids)[0]).abs().max() <= 0.0  # measured 0.0


def test_diffusers_folder_roundtrip(tmp_path):
    from diffusers import StableDiffusionPipeline
    from minisd.formats.export import export_diffusers

    ours = tiny_model(2)
    export_diffusers(ours, str(tmp_path / "d1"))
    r = run(str(tmp_path / "d1"), "--out", str(tmp_path / "m"), "--explain")
    assert r.returncode == 0, r.stderr
    assert "unet/conv_in.weight -> unet.input_blocks.0.0.weight" in r.stdout
    r = run(str(tmp_path / "m"), "--to", "diffusers", str(tmp_path / "d2"))
    assert r.returncode == 0, r.stderr
    for sub, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")]:
        a = load_file(tmp_path / "d1" / sub / f"{name}.safetensors")
        b = load_file(tmp_path / "d2" / sub / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "d2"), local_files_only=True)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([42.0])
    with torch.no_grad():
        assert (pipe.unet(x, t, encoder_hidden_states=ctx).sample - ours.unet(x, t, ctx)).abs().max() <= 0.0  # 0.0


def test_diffusers_folder_keeps_its_scheduler_and_family_is_checked(tmp_path):
    """DDIM in, DDIM out: the scheduler a diffusers folder came with (class and keys) survives import + export; and
    --family, which a single file must match, is checked for a folder too (it was ignored)."""
    import json as _json
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from minisd.formats.export import export_diffusers

    export_diffusers(tiny_model(4), str(tmp_path / "d1"))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                          rescale_betas_zero_snr=True)
    sched.save_pretrained(str(tmp_path / "d1" / "scheduler"))
    index_path = tmp_path / "d1" / "model_index.json"
    index = _json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    index_path.write_text(_json.dumps(index))
    r = run(str(tmp_path / "d1"), "--out", str(tmp_path / "wrong"), "--family", "sdxl")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "\n" not in r.stderr.strip(), r.stderr
    assert "sd1/sd2" in r.stderr and "--family sdxl" in r.stderr and not (tmp_path / "wrong").exists()
    # the tiny CLIP (32 wide, quick_gelu) is SD1's kind: detected so; --family sd2 overrides the guess
    for family, want in (("auto", "sd1"), ("sd2", "sd2")):
        r = run(str(tmp_path / "d1"), "--out", str(tmp_path / family), "--family", family)
        assert r.returncode == 0, r.stderr
        assert _json.loads((tmp_path / family / "config.json").read_text())["family"] == want
    r = run(str(tmp_path / "d1"), "--out", str(tmp_path / "m"), "--family", "sd1")
    assert r.returncode == 0, r.stderr
    r = run(str(tmp_path / "m"), "--to", "diffusers", str(tmp_path / "d2"))
    assert r.returncode == 0, r.stderr
    assert _json.loads((tmp_path / "d2" / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                                           "DDIMScheduler"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "d2"), local_files_only=True)
    assert type(pipe.scheduler) is DDIMScheduler
    ours, ref = (_json.loads((tmp_path / d / "scheduler" / "scheduler_config.json").read_text()) for d in ("d2", "d1"))
    assert ours == ref                                  # every key, e.g. rescale_betas_zero_snr, clip_sample
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"


def test_fp16_output(tmp_path):
    single = tmp_path / "tiny.safetensors"
    from minisd.formats.export import export_single_file
    export_single_file(tiny_model(3), None, str(single))
    r = run(str(single), "--out", str(tmp_path / "h"), "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    sd = load_file(tmp_path / "h" / "unet.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float16}


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit code 2, no traceback, nothing at --out.

class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/minisd_pwned",))


def bad_inputs(tmp_path):
    from minisd.formats.export import export_single_file
    good = tmp_path / "good.safetensors"
    export_single_file(tiny_model(4), None, str(good))
    data = good.read_bytes()
    cases = {}
    cases["truncated"] = (tmp_path / "trunc.safetensors", data[: len(data) // 2], "safetensors")
    cases["garbage"] = (tmp_path / "garbage.safetensors", b"\x00" * 100, "safetensors")
    sd = load_file(good)
    lora = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32)}
    save_file(lora, tmp_path / "lora.safetensors")
    cases["lora"] = (tmp_path / "lora.safetensors", None, "LoRA")
    vae = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(vae, tmp_path / "vae.safetensors")
    cases["vae"] = (tmp_path / "vae.safetensors", None, "VAE-only")
    save_file({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    cases["unrelated"] = (tmp_path / "other.safetensors", None, "not a Stable Diffusion")
    shape = dict(sd)
    shape["model.diffusion_model.input_blocks.0.0.bias"] = torch.zeros(7)
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        save_file(shape, tmp_path / "shape.safetensors", metadata=f.metadata())
    cases["shape"] = (tmp_path / "shape.safetensors", None, "shape mismatch")
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    cases["pickle"] = (tmp_path / "evil.ckpt", None, "refused")
    folder = tmp_path / "nounet"
    from minisd.formats.export import export_diffusers
    export_diffusers(tiny_model(5), str(folder))
    import shutil
    shutil.rmtree(folder / "unet")
    cases["missing_component"] = (folder, None, "unet")
    return cases


def test_bad_inputs_are_refused_cleanly(tmp_path):
    if os.path.exists("/tmp/minisd_pwned"):
        os.remove("/tmp/minisd_pwned")
    for name, (path, data, words) in bad_inputs(tmp_path).items():
        if data is not None:
            path.write_bytes(data)
        out = tmp_path / f"out_{name}"
        r = run(str(path), "--out", str(out))
        assert r.returncode == 2, (name, r.stderr)
        err = r.stderr.strip()
        assert "Traceback" not in err and err.count("\n") == 0, (name, err)
        assert err.startswith("error:") and words.lower() in err.lower(), (name, err)
        assert not out.exists(), name
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".minisd-")], name
    assert not os.path.exists("/tmp/minisd_pwned"), "a pickle ran code"


def test_bad_flags():
    r = run("x.safetensors", "--out", "y", "--dtype", "fp8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run("x.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr
