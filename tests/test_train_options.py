"""train.py options of the LoRA-family loop: adapter options reach the layers (dropouts only in train mode), EMA
(update equation by hand, resume exact), input perturbation (the input moves by exactly √(1−ᾱ_t)·γ·ξ, the target
not), validation grids (files at the right steps, losses unchanged), VAE options (slicing, external VAE in diffusers
and single-file form, shape errors), per-encoder learning rates on a tiny SDXL, loss.jsonl written every step."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.train.ema import EMA  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from minisd.train.validation import parse_prompts  # noqa: E402
from minisd.world.validation import validation_prompts  # noqa: E402
from conftest import save_tiny_sdxl, kill_at  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 6, seed=0, style="striped")


def _trainer(tmp_path, data_dir, *flags, log=None):
    cfg, _ = parse_config(FAST + ["--data", data_dir, "--out", str(tmp_path)] + list(flags))
    return Trainer(cfg, str(tmp_path), log=log or (lambda s: None), prompts=validation_prompts)


def _is_big_conv(layer) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)


# ------------------------------------------------------------------------------------------- adapter options
def test_adapter_options_reach_the_layers(tmp_path, data_dir):
    t = _trainer(tmp_path / "a", data_dir, "--targets", "full", "--rank", "4", "--alpha", "2", "--conv-rank", "2",
                 "--conv-alpha", "1", "--init", "gaussian", "--dropout", "0.3", "--rank-dropout", "0.2",
                 "--module-dropout", "0.1", "--train-text-encoder")
    layers = [t.model.unet.get_submodule(n) for n in t.unet_layers]
    layers += [m for te in t.model.text_encoders for m in te.modules() if hasattr(m, "lora_down")]
    convs = [lay for lay in layers if _is_big_conv(lay)]
    assert convs and len(convs) < len(layers)
    for lay in layers:
        want = (2, 1.0) if _is_big_conv(lay) else (4, 2.0)
        assert (lay.rank, float(lay.alpha)) == want
        assert (lay.dropout.p, lay.rank_dropout, lay.module_dropout) == (0.3, 0.2, 0.1)
    # gaussian init: N(0, 1/r) = std 0.25 here; kaiming_uniform(a=√5) would give std 1/√(3·fan_in) ≈ 0.1
    down = torch.cat([lay.lora_down.weight.flatten() for lay in layers if not _is_big_conv(lay)])
    assert abs(down.std().item() - 0.25) < 0.02, down.std()
    # defaults: conv adapters take --rank / --alpha; --conv-rank 0 leaves the 3x3 convs alone
    t = _trainer(tmp_path / "b", data_dir, "--targets", "full", "--rank", "4", "--alpha", "2")
    big = [t.model.unet.get_submodule(n) for n in t.unet_layers if _is_big_conv(t.model.unet.get_submodule(n))]
    assert big and all((lay.rank, float(lay.alpha)) == (4, 2.0) for lay in big)
    t = _trainer(tmp_path / "c", data_dir, "--targets", "full", "--conv-rank", "0")
    assert not any(_is_big_conv(t.model.unet.get_submodule(n)) for n in t.unet_layers)


def test_adapter_dropout_only_in_train_mode(tmp_path, data_dir):
    t = _trainer(tmp_path, data_dir, "--dropout", "0.5", "--rank-dropout", "0.5")
    lay = next(t.model.unet.get_submodule(n) for n in t.unet_layers
               if isinstance(t.model.unet.get_submodule(n), nn.Linear))
    with torch.no_grad():
        lay.lora_up.weight.normal_()  # B = 0 would hide the adapter path
    x = torch.randn(3, 5, lay.in_features)
    with torch.no_grad():
        exact = F.linear(x, lay.weight, lay.bias) + lay.lora_up(lay.lora_down(x)) * (lay.alpha / lay.rank)
        lay.eval()
        assert torch.allclose(lay(x), exact, atol=1e-6) and torch.equal(lay(x), lay(x))
        lay.train()
        a, b = lay(x), lay(x)
    assert not torch.equal(a, b) and not torch.allclose(a, exact, atol=1e-3)
    # module dropout: in train mode nearly always the base layer alone, in eval mode never
    t = _trainer(tmp_path / "m", data_dir, "--module-dropout", "0.9")
    lay = next(t.model.unet.get_submodule(n) for n in t.unet_layers
               if isinstance(t.model.unet.get_submodule(n), nn.Linear))
    with torch.no_grad():
        lay.lora_up.weight.normal_()
        base = F.linear(x, lay.weight, lay.bias)
        lay.eval()
        assert not torch.allclose(lay(x), base, atol=1e-3)
        lay.train()
        skipped = sum(torch.equal(lay(x), base) for _ in range(40))
    assert 25 <= skipped < 40, skipped  # ~36 expected; P(outside) < 1e-4


def test_dropout_and_init_rejected_for_lycoris(capsys):
    for flags in (["--network", "loha", "--dropout", "0.1"], ["--network", "lokr", "--init", "gaussian"],
                  ["--rank-dropout", "1.0"], ["--ema-decay", "1"], ["--conv-rank", "-1"]):
        assert train.main(flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err


# ------------------------------------------------------------------------------------------- EMA
def test_ema_update_equation_by_hand():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    ema = EMA([p], decay=0.9, warmup=False)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0, 1.0]))
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * -2 + 0.1 * 0, 0.9 * 4 + 0.1 * 1]))
    # with warmup: d_0 = min(0.9, 1/10) = 0.1, d_1 = min(0.9, 2/11), ..., d_s = 0.9 from s = 80 on
    q = nn.Parameter(torch.tensor([2.0]))
    ema = EMA([q], decay=0.9)
    shadow, values = 2.0, [6.0, -1.0, 0.5]
    for s, v in enumerate(values):
        with torch.no_grad():
            q.fill_(v)
        ema.update()
        d = min(0.9, (1 + s) / (10 + s))
        shadow = d * shadow + (1 - d) * v
        assert abs(ema.shadow[0].item() - shadow) < 1e-6, (s, ema.shadow[0].item(), shadow)
    assert ema.decay_at(100) == 0.9 and ema.num_updates == 3
    # applied(): EMA values inside, the exact raw values after
    with ema.applied():
        assert torch.equal(q.detach(), ema.shadow[0])
    assert q.item() == 0.5


def test_resume_exact_with_ema_validation_and_per_step_loss_log(tmp_path, data_dir):
    flags = ["--max-steps", "5", "--seed", "2", "--ema-decay", "0.8", "--input-perturbation", "0.1",
             "--dropout", "0.1", "--rank-dropout", "0.1", "--module-dropout", "0.1", "--validate-every", "2",
             "--validation-prompts", "a red circle|a blue square", "--validation-steps", "1", "--resolution", "32"]
    full = _trainer(tmp_path / "full", data_dir, *flags)
    full.run()
    part = str(tmp_path / "part")
    killed = _trainer(tmp_path / "part", data_dir, *flags, "--save-every", "3")
    json.dump(killed.cfg.to_dict(), open(os.path.join(part, "config.json"), "w"))
    kill_at(killed, 4)
    log = os.path.join(part, "loss.jsonl")
    assert [json.loads(x)["step"] for x in open(log)] == [1, 2, 3, 4]  # written every step, not at checkpoints
    assert train.main(["--resume", part, "--max-steps", "5", "--threads", "1"]) == 0
    assert open(log).read() == open(tmp_path / "full" / "loss.jsonl").read()  # cut back to 3, then 4, 5 again
    for name in ("lora.safetensors", "lora_raw.safetensors"):
        got, want = load_file(os.path.join(part, name)), load_file(str(tmp_path / "full" / name))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    ema, raw = load_file(str(tmp_path / "full" / "lora.safetensors")), load_file(str(tmp_path / "full" /
                                                                                    "lora_raw.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if k.endswith("lora_up.weight"))
    assert sorted(os.listdir(os.path.join(part, "validation"))) == [f"step_00000{s}.png" for s in (2, 4)]


# ------------------------------------------------------------------------------------------- input perturbation
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_input_perturbation_moves_only_the_input(tmp_path, data_dir, prediction):
    gamma, offset = 0.1, 0.05
    t = _trainer(tmp_path, data_dir, "--input-perturbation", str(gamma), "--noise-offset", str(offset),
                 "--prediction", prediction)
    z0 = torch.randn(3, 4, 8, 8)
    state = t.gen.get_state()
    zt, ts, target = t.noised(z0)
    g = torch.Generator().manual_seed(0)
    g.set_state(state)  # replay the draws by hand, in the documented order
    ts_ref = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(z0.shape, generator=g) + offset * torch.randn((3, 4, 1, 1), generator=g)
    xi = torch.randn(z0.shape, generator=g)
    assert torch.equal(ts, ts_ref)
    a = t.noise.alphas_cumprod[ts].float().view(-1, 1, 1, 1)
    clean = a.sqrt() * z0 + (1 - a).sqrt() * eps  # q_sample(z0, ε)
    assert torch.allclose(zt - clean, (1 - a).sqrt() * gamma * xi, atol=1e-6)
    assert torch.equal(target, t.noise.training_target(z0, eps, ts))  # from the unperturbed ε
    want = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
    assert torch.allclose(target, want, atol=1e-6)


# ------------------------------------------------------------------------------------------- validation
def test_validation_grids_do_not_change_training(tmp_path, data_dir):
    flags = ["--max-steps", "4", "--dropout", "0.2", "--module-dropout", "0.2", "--ema-decay", "0.9",
             "--mixed-precision", "bf16", "--save-every", "0", "--resolution", "32"]
    want = _trainer(tmp_path / "plain", data_dir, *flags).run()["losses"]
    t = _trainer(tmp_path / "val", data_dir, *flags, "--validate-every", "2", "--validation-steps", "1")
    assert len(t.val_prompts) == 4  # world run: held-out prompts by default
    got = t.run()["losses"]
    assert got == want
    assert sorted(os.listdir(tmp_path / "val" / "validation")) == ["step_000002.png", "step_000004.png"]
    assert t.model.training and all(m.training for m in t.model.modules())
    assert all(p.dtype == torch.float32 for p in t.params)
    assert next(t.model.unet.parameters()).dtype == torch.bfloat16


def test_validation_prompts_sources(tmp_path, data_dir, capsys):
    assert parse_prompts("a red circle| a blue square |") == ["a red circle", "a blue square"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \n")
    assert parse_prompts(str(txt)) == ["one", "two"]
    cfg, _ = parse_config(["--data", data_dir])
    assert len(validation_prompts(cfg)) == 4
    plain = tmp_path / "plain"  # a data folder that is not the world: prompts must be given
    plain.mkdir()
    from PIL import Image
    Image.new("RGB", (64, 64), "red").save(plain / "0.png")
    (plain / "0.txt").write_text("a red square")
    for extra in ([], ["--validation-prompts", str(tmp_path / "missing.txt")]):
        rc = train.main(FAST + ["--data", str(plain), "--out", str(tmp_path / "o"), "--validate-every", "1"] + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "o" / "loss.jsonl")


# ------------------------------------------------------------------------------------------- VAE options
def _diffusers_vae(channels=(32, 64), seed=1, **kw):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=channels, layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, **kw).eval()


def test_vae_slicing_same_latents(tmp_path, data_dir):
    t = _trainer(tmp_path, data_dir, "--vae-slicing", "--vae-tiling")
    vae = t.model.vae
    assert vae.slicing and vae.tiling
    x = t.loader.next_batch()["pixels"]
    with torch.no_grad():
        sliced = vae.encode(x).moments
        vae.slicing = vae.tiling = False
        whole = vae.encode(x).moments
    assert torch.allclose(sliced, whole, rtol=0, atol=8e-6), (sliced - whole).abs().max()  # measured 2.5e-6


def test_external_vae_replaces_the_weights(tmp_path, data_dir):
    ref = _diffusers_vae()
    ref.save_pretrained(str(tmp_path / "vae"))
    logs = []
    t = _trainer(tmp_path / "r1", data_dir, "--vae", str(tmp_path / "vae"), "--vae-dtype", "fp16",
                 log=logs.append)
    assert any(s.startswith("warning: --vae-dtype fp16") for s in logs)  # diffusers' default force_upcast: true
    assert next(t.model.vae.parameters()).dtype == torch.float16
    t = _trainer(tmp_path / "r2", data_dir, "--vae", str(tmp_path / "vae"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours, theirs = t.model.vae.encode(x).mean, ref.encode(x).latent_dist.mean
        z = torch.randn(2, 4, 16, 16)
        ours_img, theirs_img = t.model.vae.decode(z), ref.decode(z).sample
    assert torch.allclose(ours, theirs, rtol=0, atol=3e-6), (ours - theirs).abs().max()  # measured 8.5e-7
    assert torch.allclose(ours_img, theirs_img, rtol=0, atol=8e-6), (ours_img - theirs_img).abs().max()  # 2.7e-6
    # a single file in CompVis names (as sdxl_vae.safetensors), marked fp16-safe by its config-less name
    sd = {k: v.contiguous() for k, v in t.model.vae.state_dict().items()}
    save_file(sd, str(tmp_path / "my-vae-fp16-fix.safetensors"))
    logs.clear()
    t2 = _trainer(tmp_path / "r3", data_dir, "--vae", str(tmp_path / "my-vae-fp16-fix.safetensors"),
                  "--vae-dtype", "bf16", log=logs.append)
    assert not any(s.startswith("warning") for s in logs)
    got = t2.model.vae.state_dict()
    assert all(torch.equal(got[k], sd[k].bfloat16()) for k in sd)
    # an fp16-safe diffusers VAE (force_upcast false, as sdxl-vae-fp16-fix): no warning
    _diffusers_vae(force_upcast=False).save_pretrained(str(tmp_path / "vae16"))
    logs.clear()
    _trainer(tmp_path / "r4", data_dir, "--vae", str(tmp_path / "vae16"), "--vae-dtype", "fp16", log=logs.append)
    assert not any(s.startswith("warning") for s in logs)


def test_external_vae_wrong_shapes_one_line_error(tmp_path, data_dir, capsys):
    _diffusers_vae(channels=(16, 32)).save_pretrained(str(tmp_path / "small"))
    for vae in (str(tmp_path / "small"), str(tmp_path / "nowhere")):
        rc = train.main(FAST + ["--data", data_dir, "--out", str(tmp_path / "o"), "--vae", vae])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: --vae") and "\n" not in err, err
    assert "shape mismatch" in err or "no such" in err


# ------------------------------------------------------------------------------------------- per-encoder LRs


def test_per_encoder_learning_rates_sdxl(tmp_path, data_dir):
    from minisd.adapters import adapter_parameters
    xl = save_tiny_sdxl(tmp_path / "xl")
    base = ["--model", xl, "--train-text-encoder", "--lr", "1e-3", "--batch-size", "1"]
    for extra, want in (([], [1e-3, 1e-3, 1e-3]), (["--te-lr", "5e-4"], [1e-3, 5e-4, 5e-4]),
                        (["--te-lr", "5e-4", "--te2-lr", "2e-4"], [1e-3, 5e-4, 2e-4]),
                        (["--te1-lr", "3e-4", "--te2-lr", "2e-4"], [1e-3, 3e-4, 2e-4])):
        t = _trainer(tmp_path / "run", data_dir, *base, *extra)
        m = t.model
        assert [g["lr"] for g in t.opt.param_groups] == want, extra
        parts = [m.unet, *m.text_encoders]
        for g, part in zip(t.opt.param_groups, parts):
            assert {id(p) for p in g["params"]} == {id(p) for p in adapter_parameters(part)}
    t.train_step()  # constant schedule: the groups keep their own LRs through a step
    assert [g["lr"] for g in t.opt.param_groups] == [1e-3, 3e-4, 2e-4]
