"""Knowledge distillation by block removal (minisd/train/distill.py, distill_loop.py, train.py --distill):

  * the SD1.5 recipes give Segmind's configs and parameter counts (meta tensors), and every tensor name and shape of
    diffusers' SD-Small / SD-Tiny UNets;
  * construction keeps exactly the teacher tensors it should (names and values, against a block map written out by
    hand), and a diffusers UNet of the tiny-ified Segmind config loads the student strictly, with equal outputs;
  * the loss terms equal their formulas computed by hand on one batch, and the hooks read the block outputs the
    recipe names (checked against a forward written out block by block);
  * a train.py run writes the student three ways; diffusers loads the folder with equal outputs, sample.py draws with
    it; stop + --resume repeats the uninterrupted run bitwise (8-bit AdamW, EMA, cached text states on);
  * --distill-train adapters: only the adapter tensors change (student base, teacher, text encoder bitwise equal),
    the loss equals the formula on a student merged by hand, the written student equals base + (α/r)·up@down of
    lora.safetensors by hand (DoRA / LoHa / LoKr: equals the adapted student's output), resume is exact;
  * bad flags: one error line.
"""
import json
import os
import sys

import pytest
import torch

from conftest import REFERENCE, ROOT, kill_at, randomize

sys.path.insert(0, ROOT)
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.config import SD15, TINY, ModelConfig, UNetConfig  # noqa: E402
from minisd.formats.keys_unet import unet_config_from_diffusers, unet_to_diffusers  # noqa: E402
from minisd.model import StableDiffusion, empty_weights, save_model  # noqa: E402
from minisd.schedule import NoiseSchedule  # noqa: E402
from minisd.train.distill import (DistillWeights, FeatureHooks, build_student, distill_loss, explain,  # noqa: E402
                                  plan_student)
from minisd.trainer import Draws, MicroBatch  # noqa: E402
from minisd.unet import UNetModel, timestep_embedding  # noqa: E402

torch.set_num_threads(1)
SEGMIND = os.path.join(REFERENCE, "configs", "segmind")
# a teacher shaped like SD1.5 (4 levels, the last as wide as the third and without attention), tiny widths
SD15_LIKE = UNetConfig(model_channels=16, channel_mult=(1, 2, 3, 3), num_res_blocks=(2, 2, 2, 2),
                       transformer_depth=(1, 1, 1, 0), num_heads=2, context_dim=24, norm_num_groups=8)
# minisd-tiny's shape (2 levels, the second wider), tiny widths
MINISD_LIKE = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=(2, 2), transformer_depth=(1, 1),
                         num_head_channels=8, context_dim=32, norm_num_groups=8)


def segmind(name: str) -> dict:
    return json.load(open(os.path.join(SEGMIND, f"{name}_unet_config.json")))


# ------------------------------------------------------------------------------------------- SD1.5 recipes
@pytest.mark.parametrize("recipe,name,count", [("small", "small-sd", 579_384_964), ("tiny", "tiny-sd", 323_384_964)])
def test_sd15_recipes_are_segmind_models(recipe, name, count):
    from diffusers import UNet2DConditionModel
    plan = plan_student(SD15.unet, recipe)
    assert plan.cfg == unet_config_from_diffusers(segmind(name))
    with empty_weights():
        ours = UNetModel(plan.cfg)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in segmind(name).items() if not k.startswith("_")})
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == count
    mapped = {k: tuple(v.shape) for k, v in unet_to_diffusers(ours.state_dict(), plan.cfg).items()}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_sd15_block_maps_are_bk_sdm():
    """BK-SDM's copy_weight_from_teacher in official names: up levels keep their first and last block."""
    small, tiny = plan_student(SD15.unet, "small"), plan_student(SD15.unet, "tiny")
    assert dict(small.blocks) == {
        "input_blocks.0": "input_blocks.0", "input_blocks.1": "input_blocks.1", "input_blocks.2": "input_blocks.3",
        "input_blocks.3": "input_blocks.4", "input_blocks.4": "input_blocks.6", "input_blocks.5": "input_blocks.7",
        "input_blocks.6": "input_blocks.9", "input_blocks.7": "input_blocks.10", "middle_block": "middle_block",
        "output_blocks.0": "output_blocks.0", "output_blocks.1": "output_blocks.2", "output_blocks.2": "output_blocks.3",
        "output_blocks.3": "output_blocks.5", "output_blocks.4": "output_blocks.6", "output_blocks.5": "output_blocks.8",
        "output_blocks.6": "output_blocks.9", "output_blocks.7": "output_blocks.11"}
    assert dict(tiny.blocks) == {
        "input_blocks.0": "input_blocks.0", "input_blocks.1": "input_blocks.1", "input_blocks.2": "input_blocks.3",
        "input_blocks.3": "input_blocks.4", "input_blocks.4": "input_blocks.6", "input_blocks.5": "input_blocks.7",
        "output_blocks.0": "output_blocks.3", "output_blocks.1": "output_blocks.5", "output_blocks.2": "output_blocks.6",
        "output_blocks.3": "output_blocks.8", "output_blocks.4": "output_blocks.9", "output_blocks.5": "output_blocks.11"}
    # BK-SDM's hooks: down_blocks.i / up_blocks.i outputs; tiny: down_blocks.2.attentions.{1,0}.proj_out
    assert tiny.features[2] == ("input_blocks.8.1.proj_out", "input_blocks.5.1.proj_out")
    assert [t for t, _ in small.features] == ["input_blocks.3", "input_blocks.6", "input_blocks.9", "input_blocks.11",
                                              "output_blocks.2", "output_blocks.5", "output_blocks.8",
                                              "output_blocks.11"]


# ------------------------------------------------------------------------------------------- construction
def teacher_of(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return randomize(UNetModel(cfg), seed=seed)


@pytest.mark.parametrize("cfg,recipe,by_hand,dropped", [
    # minisd-tiny's shape: tiny keeps both levels (the second is wider) and drops the middle block
    (MINISD_LIKE, "small", {"input_blocks.1": "input_blocks.1", "input_blocks.2": "input_blocks.3",
                            "input_blocks.3": "input_blocks.4", "middle_block": "middle_block",
                            "output_blocks.0": "output_blocks.0", "output_blocks.1": "output_blocks.2",
                            "output_blocks.2": "output_blocks.3", "output_blocks.3": "output_blocks.5"},
     ["input_blocks.2", "input_blocks.5", "output_blocks.1", "output_blocks.4"]),
    (MINISD_LIKE, "tiny", {"input_blocks.1": "input_blocks.1", "input_blocks.2": "input_blocks.3",
                           "input_blocks.3": "input_blocks.4", "output_blocks.0": "output_blocks.0",
                           "output_blocks.1": "output_blocks.2", "output_blocks.2": "output_blocks.3",
                           "output_blocks.3": "output_blocks.5"},
     ["input_blocks.2", "input_blocks.5", "middle_block", "output_blocks.1", "output_blocks.4"]),
    (SD15_LIKE, "tiny", {"input_blocks.1": "input_blocks.1", "input_blocks.2": "input_blocks.3",
                         "input_blocks.3": "input_blocks.4", "input_blocks.4": "input_blocks.6",
                         "input_blocks.5": "input_blocks.7", "output_blocks.0": "output_blocks.3",
                         "output_blocks.1": "output_blocks.5", "output_blocks.2": "output_blocks.6",
                         "output_blocks.3": "output_blocks.8", "output_blocks.4": "output_blocks.9",
                         "output_blocks.5": "output_blocks.11"},
     ["input_blocks.2", "input_blocks.5", "input_blocks.8", "input_blocks.9", "input_blocks.10", "input_blocks.11",
      "middle_block", "output_blocks.0", "output_blocks.1", "output_blocks.2", "output_blocks.4", "output_blocks.7",
      "output_blocks.10"]),
])
def test_construction_keeps_exactly_the_teacher_tensors(cfg, recipe, by_hand, dropped):
    teacher = teacher_of(cfg)
    student, plan = build_student(teacher, recipe)
    assert sorted(plan.dropped) == sorted(dropped)
    by_hand = {"input_blocks.0": "input_blocks.0", "time_embed": "time_embed", "out": "out", **by_hand}
    t_sd, used = teacher.state_dict(), set()
    for key, value in student.state_dict().items():
        block = next(b for b in by_hand if key.startswith(b + "."))
        source = by_hand[block] + key[len(block):]
        assert torch.equal(value, t_sd[source]), (key, source)
        used.add(source)
    # every teacher tensor not taken belongs to a dropped block, and every tensor of a dropped block is left out
    left = set(t_sd) - used
    assert left == {k for k in t_sd if any(k.startswith(d + ".") for d in dropped)}
    assert "<- teacher" in explain(teacher, plan) and "dropped" in explain(teacher, plan)


@pytest.mark.parametrize("recipe,name", [("small", "small-sd"), ("tiny", "tiny-sd")])
def test_diffusers_loads_the_student_strictly(recipe, name):
    """Segmind's config with tiny widths (SD15_LIKE's) builds a diffusers UNet that takes the student strictly and
    computes the same output."""
    from diffusers import UNet2DConditionModel
    teacher = teacher_of(SD15_LIKE, seed=3)
    student, plan = build_student(teacher, recipe)
    config = {k: v for k, v in segmind(name).items() if not k.startswith("_")}
    config.update(block_out_channels=[16 * m for m in plan.cfg.channel_mult], attention_head_dim=2,
                  cross_attention_dim=24, norm_num_groups=8)
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(unet_to_diffusers(student.state_dict(), plan.cfg), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor([999., 31.])
    with torch.no_grad():
        a, b = student.eval()(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample
    diff = (a - b).abs().max().item()
    print(f"{recipe}: max |minisd - diffusers| = {diff:.2e}")
    assert diff == 0  # measured: bit-exact (the same operations in the same order)


def test_recipe_errors():
    with pytest.raises(ValueError, match="unknown distillation recipe"):
        plan_student(SD15.unet, "base")
    no_mid = plan_student(SD15.unet, "tiny").cfg
    with pytest.raises(ValueError, match="no middle block"):
        plan_student(no_mid, "small")


# ------------------------------------------------------------------------------------------- loss and hooks

def noised_by_hand(model, noise, mb, seed: int):
    """The trainer's draws in its order from a generator seeded `seed` (VAE sample, t, ε), then
    z_t = √ᾱ_t · z0 + √(1 − ᾱ_t) · ε with z0 = (μ + σ·n) · scale_factor; returns (z_t, t, ε)."""
    d = torch.Generator().manual_seed(seed)
    mean, logvar = mb.moments[:, :4], mb.moments[:, 4:].clamp(-30, 20)
    z0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=d)) * model.cfg.vae.scale_factor
    t = torch.randint(0, 1000, (mb.moments.shape[0],), generator=d)
    eps = torch.randn(z0.shape, generator=d)
    ab = noise.alphas_cumprod[t].float()[:, None, None, None]
    return ab.sqrt() * z0 + (1 - ab).sqrt() * eps, t, eps

def manual_forward(unet: UNetModel, x, t, ctx) -> tuple[torch.Tensor, dict]:
    """UNetModel.forward written out again, recording every block's output by its official name."""
    emb = unet.time_embed(timestep_embedding(t, unet.cfg.model_channels))
    outs, hs, h = {}, [], x
    for i, block in enumerate(unet.input_blocks):
        h = block(h, emb, ctx)
        outs[f"input_blocks.{i}"] = h
        hs.append(h)
    if unet.middle_block is not None:
        h = unet.middle_block(h, emb, ctx)
    for j, block in enumerate(unet.output_blocks):
        h = torch.cat([h, hs.pop()], 1)
        h = block(h, emb, ctx, hs[-1].shape[-2:] if hs else None)
        outs[f"output_blocks.{j}"] = h
    return unet.out(h), outs


@pytest.mark.parametrize("cfg,recipe", [(MINISD_LIKE, "small"), (MINISD_LIKE, "tiny"), (SD15_LIKE, "tiny")])
def test_loss_terms_by_hand(cfg, recipe):
    teacher = teacher_of(cfg, seed=5).requires_grad_(False)
    student, plan = build_student(teacher, recipe)
    randomize(student, seed=6)  # a student that differs from its teacher everywhere
    model = StableDiffusion(ModelConfig(unet=cfg, vae=TINY.vae, text_encoders=TINY.text_encoders))
    model.unet = student
    noise = NoiseSchedule(model.cfg.schedule)
    g = torch.Generator().manual_seed(2)
    B, h, w = 3, 8, 12
    mb = MicroBatch(moments=torch.randn(B, 8, h, w, generator=g), context=torch.randn(B, 7, cfg.context_dim, generator=g))
    weights = DistillWeights(output_weight=0.3, feature_weight=0.7)
    hooks = FeatureHooks(teacher, student, plan.features)
    loss, terms = distill_loss(model, teacher, noise, mb, Draws(torch.Generator().manual_seed(9)), hooks, weights)

    # by hand: the draws in the trainer's order, then the equations of the module docstring
    zt, t, eps = noised_by_hand(model, noise, mb, seed=9)
    with torch.no_grad():
        pred_t, feats_t = manual_forward(teacher, zt, t, mb.context)
        pred_s, feats_s = manual_forward(student, zt, t, mb.context)
    # the hooks hold the blocks the recipe names (proj_out: read inside the block, compared to a direct call)
    for tn, sn in plan.features:
        for name, store, feats in ((tn, hooks.teacher, feats_t), (sn, hooks.student, feats_s)):
            if name in feats:
                torch.testing.assert_close(store[name], feats[name], rtol=0, atol=1e-6)
            else:
                assert name.endswith(".1.proj_out") and store[name].shape[1] == feats[name[:-len(".1.proj_out")]].shape[1]
    feature = sum(((hooks.student[sn] - hooks.teacher[tn]) ** 2).mean() for tn, sn in plan.features)
    task = ((pred_s - eps) ** 2).mean()
    output = ((pred_s - pred_t) ** 2).mean()
    for name, want in (("task", task), ("output", output), ("feature", feature)):
        assert abs(terms[name].item() - want.item()) <= 1e-6 * want.item(), (name, terms[name].item(), want.item())
    total = task + 0.3 * output + 0.7 * feature
    assert abs(loss.item() - total.item()) <= 1e-6 * total.item()
    assert loss.requires_grad and feature.item() > 0 and output.item() > 0


def test_weights_zero_skip_the_teacher():
    teacher = teacher_of(MINISD_LIKE, seed=5)
    student, plan = build_student(teacher, "tiny")
    model = StableDiffusion(ModelConfig(unet=MINISD_LIKE, vae=TINY.vae, text_encoders=TINY.text_encoders))
    model.unet = student
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    mb = MicroBatch(moments=torch.randn(2, 8, 8, 8), context=torch.randn(2, 7, 32))
    loss, terms = distill_loss(model, teacher, NoiseSchedule(model.cfg.schedule), mb,
                               Draws(torch.Generator().manual_seed(0)), None, DistillWeights(0.0, 0.0))
    assert not calls and terms["output"].item() == terms["feature"].item() == 0 and loss.item() == terms["task"].item()


# ------------------------------------------------------------------------------------------- train.py end to end
FAST = ["--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random SD1 model shaped like minisd-tiny (2 ResBlocks a level) as a minisd folder."""
    cfg = ModelConfig(unet=MINISD_LIKE, vae=TINY.vae, text_encoders=TINY.text_encoders, resolution=32)
    torch.manual_seed(0)
    m = StableDiffusion(cfg)
    randomize(m.unet, seed=1, std=0.05)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher")
    save_model(m, path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 6, seed=0)


@pytest.fixture(scope="module")
def run(teacher_dir, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "run")
    assert train.main(FAST + ["--distill", "tiny", "--model", teacher_dir, "--data", data_dir, "--out", out,
                              "--max-steps", "2"]) == 0
    return out


def test_outputs_load_in_diffusers_with_equal_outputs(run):
    from diffusers import StableDiffusionPipeline
    from minisd.formats import load_model
    ours = load_model(os.path.join(run, "student"))
    assert ours.cfg.unet.mid_block is False and ours.cfg.unet.num_res_blocks == (1, 1)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(run, "student-diffusers"), safety_checker=None)
    single = load_model(os.path.join(run, "student.safetensors"))
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([900., 7.])
    with torch.no_grad():
        a = ours.unet.float()(x, t, ctx)
        b = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        c = single.unet.float()(x, t, ctx)
    diff = (a - b).abs().max().item()
    print(f"student: max |minisd - diffusers| = {diff:.2e}")
    assert diff == 0  # measured: bit-exact
    assert torch.equal(a, c)  # the single file holds the same tensors
    rows = [json.loads(line) for line in open(os.path.join(run, "loss.jsonl"))]
    assert all(r["loss"] == pytest.approx(r["task"] + r["output"] + r["feature"], rel=1e-6) for r in rows)


def test_sample_py_draws_with_the_student(run, tmp_path):
    import sample
    png = str(tmp_path / "s.png")
    assert sample.main(["a red circle", "--model", os.path.join(run, "student"), "--steps", "2", "--width", "32",
                        "--height", "32", "--out", png, "--threads", "1"]) == 0
    assert os.path.isfile(png)


def test_resume_is_exact(teacher_dir, data_dir, tmp_path):
    from minisd.train.cli import parse_config
    from minisd.train.distill_loop import DistillTrainer
    flags = FAST + ["--distill", "small", "--model", teacher_dir, "--data", data_dir, "--max-steps", "5",
                    "--optimizer", "adamw8bit", "--ema-decay", "0.9", "--cache-text", "--caption-dropout", "0.3",
                    "--output-weight", "0.5", "--feature-weight", "0.25", "--seed", "3"]
    cfg, _ = parse_config(flags + ["--out", str(tmp_path / "full")])
    full = DistillTrainer(cfg, str(tmp_path / "full"), log=lambda s: None)
    want = full.run()["losses"]
    part = str(tmp_path / "part")
    cfg, _ = parse_config(flags + ["--out", part, "--save-every", "2"])
    killed = DistillTrainer(cfg, part, log=lambda s: None)
    json.dump(cfg.to_dict(), open(os.path.join(part, "config.json"), "w"))
    kill_at(killed, 3)
    assert train.main(["--resume", part, "--threads", "1"]) == 0
    got = [json.loads(line)["loss"] for line in open(os.path.join(part, "loss.jsonl"))]
    assert got == want  # bitwise on the CPU
    a = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(tmp_path / "full", "checkpoint.pt"), weights_only=True)
    for k in b["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("flags,message", [
    (["--output-weight", "0.5"], "would be ignored without --distill"),
    (["--distill", "base"], "invalid choice"),
    (["--distill", "small", "--rank", "4"], "--rank is an adapter option"),
    (["--distill", "small", "--feature-weight", "-1"], "must be >= 0"),
    (["--distill", "small", "--compile"], "not supported with --distill"),
])
def test_bad_flags_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) if "invalid choice" in message else _nothing():
        rc = train.main(flags + ["--threads", "1"])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_mixed_precision_and_checkpointing(teacher_dir, data_dir, tmp_path):
    """bf16 autocast: the teacher runs in bf16, the student starts from the stored fp32 weights (not a bf16 copy)
    and trains in fp32. Gradient checkpointing of the student: the same losses up to rounding order."""
    from minisd.formats import load_model
    from minisd.train.cli import parse_config
    from minisd.train.distill_loop import DistillTrainer
    flags = FAST + ["--distill", "small", "--model", teacher_dir, "--data", data_dir, "--max-steps", "2",
                    "--save-every", "0"]
    cfg, _ = parse_config(flags + ["--mixed-precision", "bf16", "--out", str(tmp_path / "bf16")])
    t = DistillTrainer(cfg, str(tmp_path / "bf16"), log=lambda s: None)
    stored = load_model(teacher_dir).unet.state_dict()
    assert next(t.teacher.parameters()).dtype == torch.bfloat16
    for s_name, t_name in t.plan.blocks:
        for k, v in t.model.unet.state_dict().items():
            if k.startswith(s_name + "."):
                assert v.dtype == torch.float32 and torch.equal(v, stored[t_name + k[len(s_name):]].float()), k
    assert all(torch.isfinite(torch.tensor(x)) for x in t.run()["losses"])
    losses = []
    for ckpt in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        cfg, _ = parse_config(flags + [ckpt, "--out", str(tmp_path / ckpt)])
        losses.append(DistillTrainer(cfg, str(tmp_path / ckpt), log=lambda s: None).run()["losses"])
    assert losses[0][0] == losses[1][0]                       # the forward is the same
    assert losses[1][1] == pytest.approx(losses[0][1], rel=1e-5)  # gradients differ in summation order only


# ------------------------------------------------------------------------------------------- --distill-train adapters
ADAPT = ["--distill-train", "adapters", "--network", "lora", "--rank", "3", "--alpha", "5", "--targets", "attn-mlp"]


def lora_student(cfg: UNetConfig, recipe: str, rank=3, alpha=5.0):
    """A teacher, its student with LoRA layers (attn-mlp) whose up and down matrices are random (a nonzero delta)."""
    from minisd import adapters
    from minisd.trainer import TARGETS
    teacher = teacher_of(cfg, seed=5).requires_grad_(False)
    student, plan = build_student(teacher, recipe)
    randomize(student, seed=6)
    student.requires_grad_(False)
    layers = adapters.inject(student, "lora", TARGETS["attn-mlp"], rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapters.adapter_parameters(student):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return teacher, student, plan, layers


def merged_by_hand(student, layers, scale: float) -> dict:
    """The student's plain state dict with W + scale · up @ down in each LoRA layer (1x1 convs flattened)."""
    sd = {k: v.clone() for k, v in student.state_dict().items() if "lora_" not in k and not k.endswith(".alpha")}
    for name in layers:
        layer = student.get_submodule(name)
        up, down = layer.lora_up.weight, layer.lora_down.weight
        sd[name + ".weight"] = sd[name + ".weight"] + scale * (up.flatten(1) @ down.flatten(1)).view(layer.weight.shape)
    return sd


def test_adapter_student_loss_by_hand():
    """distill_loss with a LoRA student equals the docstring's formula computed on a plain copy of the student whose
    weights are W + (α/r)·up@down by hand (so the adapter's forward is checked too)."""
    teacher, student, plan, layers = lora_student(MINISD_LIKE, "small")
    model = StableDiffusion(ModelConfig(unet=MINISD_LIKE, vae=TINY.vae, text_encoders=TINY.text_encoders))
    model.unet = student
    noise = NoiseSchedule(model.cfg.schedule)
    g = torch.Generator().manual_seed(2)
    B, h, w = 3, 8, 12
    mb = MicroBatch(moments=torch.randn(B, 8, h, w, generator=g), context=torch.randn(B, 7, 32, generator=g))
    hooks = FeatureHooks(teacher, student, plan.features)
    loss, terms = distill_loss(model, teacher, noise, mb, Draws(torch.Generator().manual_seed(9)), hooks,
                               DistillWeights(output_weight=0.3, feature_weight=0.7))

    plain = UNetModel(plan.cfg)
    plain.load_state_dict(merged_by_hand(student, layers, 5 / 3), strict=True)
    zt, t, eps = noised_by_hand(model, noise, mb, seed=9)
    with torch.no_grad():
        pred_t, feats_t = manual_forward(teacher, zt, t, mb.context)
        pred_s, feats_s = manual_forward(plain, zt, t, mb.context)
    task = ((pred_s - eps) ** 2).mean()
    output = ((pred_s - pred_t) ** 2).mean()
    feature = sum(((feats_s[sn] - feats_t[tn]) ** 2).mean() for tn, sn in plan.features)
    total = task + 0.3 * output + 0.7 * feature
    for name, got, want in (("task", terms["task"], task), ("output", terms["output"], output),
                            ("feature", terms["feature"], feature), ("loss", loss, total)):
        rel = abs(got.item() - want.item()) / want.item()
        print(f"{name}: relative difference {rel:.1e}")
        # measured 0; a 1e-4 error in α/r gives 2.5e-4 (feature term). Allowed: fp32 summation order (merged vs not)
        assert rel <= 1e-6, (name, got.item(), want.item())
    # the loss reaches the adapters only
    from minisd import adapters
    loss.backward()
    trainable = [q for q in student.parameters() if q.requires_grad]
    assert {id(q) for q in trainable} == {id(q) for q in adapters.adapter_parameters(student)} and trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in list(teacher.parameters()) + [student.get_submodule(n).weight for n in layers])


def trainer_for(flags, out):
    from minisd.train.cli import parse_config
    from minisd.train.distill_loop import DistillTrainer
    cfg, _ = parse_config(flags + ["--out", out])
    return DistillTrainer(cfg, out, log=lambda s: None)


def test_adapters_only_the_adapters_change(teacher_dir, data_dir, tmp_path):
    from minisd import adapters
    t = trainer_for(FAST + ADAPT + ["--distill", "small", "--model", teacher_dir, "--data", data_dir,
                                    "--max-steps", "3", "--save-every", "0"], str(tmp_path / "run"))
    own = set(adapters.adapter_state_dict(t.model.unet))
    assert own and {id(p) for p in t.params} == {id(p) for p in adapters.adapter_parameters(t.model.unet)}
    before_s = {k: v.clone() for k, v in t.model.unet.state_dict().items()}
    before_t = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    before_te = {k: v.clone() for k, v in t.model.text_encoders[0].state_dict().items()}
    t.run()
    after = t.model.unet.state_dict()
    for k, v in before_s.items():
        if k in own:
            assert k.endswith(".alpha") or not torch.equal(v, after[k]), f"{k} did not train"
        else:
            assert torch.equal(v, after[k]), f"student base {k} changed"
    assert all(torch.equal(v, t.teacher.state_dict()[k]) for k, v in before_t.items())
    assert all(torch.equal(v, t.model.text_encoders[0].state_dict()[k]) for k, v in before_te.items())


@pytest.fixture(scope="module")
def adapter_run(teacher_dir, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arun") / "run")
    assert train.main(FAST + ADAPT + ["--distill", "small", "--model", teacher_dir, "--data", data_dir, "--out", out,
                                      "--max-steps", "2"]) == 0
    return out


def test_adapters_merged_student_equals_base_plus_delta(adapter_run, teacher_dir):
    """student/ = the recipe's student of the teacher + (α/r)·up@down of lora.safetensors, computed by hand; the
    single file and the diffusers folder hold the same UNet."""
    from safetensors import safe_open
    from minisd.formats import load_model
    base, _ = build_student(load_model(teacher_dir).unet.float(), "small")
    base_sd = base.state_dict()
    with safe_open(os.path.join(adapter_run, "lora.safetensors"), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["minisd.distill"] == "small"
    paths = sorted({k[len("unet."):k.index(".lora_")] for k in lora if ".lora_" in k})
    assert paths and all(k.startswith("unet.") for k in lora)
    want = dict(base_sd)
    for p in paths:
        up, down = lora[f"unet.{p}.lora_up.weight"], lora[f"unet.{p}.lora_down.weight"]
        assert lora[f"unet.{p}.alpha"].item() == 5.0 and up.abs().sum() > 0
        want[p + ".weight"] = base_sd[p + ".weight"] + (5 / 3) * (up.flatten(1) @ down.flatten(1)).view(
            base_sd[p + ".weight"].shape)
    got = load_model(os.path.join(adapter_run, "student")).unet.float().state_dict()
    assert set(got) == set(want)
    worst = 0.0
    for k, v in want.items():
        if k[:-len(".weight")] in paths:
            worst = max(worst, (got[k] - v).abs().max().item())
        else:
            assert torch.equal(got[k], v), k  # not adapted: the teacher's tensor, bit for bit
    print(f"merged student: max |file - (W + (α/r)·up@down by hand)| = {worst:.1e}")
    assert worst <= 1e-6  # measured 0 or an fp32 rounding (matmul summation order)
    single = load_model(os.path.join(adapter_run, "student.safetensors")).unet.float().state_dict()
    assert all(torch.equal(single[k], got[k]) for k in got)
    from diffusers import UNet2DConditionModel
    theirs = UNet2DConditionModel.from_pretrained(os.path.join(adapter_run, "student-diffusers"), subfolder="unet")
    ours = unet_to_diffusers(got, load_model(os.path.join(adapter_run, "student")).cfg.unet)
    assert all(torch.equal(theirs.state_dict()[k].float(), v) for k, v in ours.items())


def test_adapters_resume_is_exact(teacher_dir, data_dir, tmp_path):
    flags = FAST + ADAPT + ["--distill", "tiny", "--model", teacher_dir, "--data", data_dir, "--max-steps", "5",
                            "--optimizer", "adamw8bit", "--ema-decay", "0.9", "--cache-text", "--caption-dropout",
                            "0.3", "--rank-dropout", "0.2", "--seed", "3"]
    want = trainer_for(flags, str(tmp_path / "full")).run()["losses"]
    part = str(tmp_path / "part")
    killed = trainer_for(flags + ["--save-every", "2"], part)
    json.dump(killed.cfg.to_dict(), open(os.path.join(part, "config.json"), "w"))
    kill_at(killed, 3)
    assert train.main(["--resume", part, "--threads", "1"]) == 0
    got = [json.loads(line)["loss"] for line in open(os.path.join(part, "loss.jsonl"))]
    assert got == want  # bitwise on the CPU
    a = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(tmp_path / "full", "checkpoint.pt"), weights_only=True)
    assert "student" not in a and set(a["adapter"]) == set(b["adapter"])
    assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in b["adapter"])
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("flags,message", [
    (["--distill-train", "adapters"], "--distill-train would be ignored without --distill"),
    (["--distill", "small", "--distill-train", "lora"], "invalid choice"),
    (["--distill", "small", "--exclude", "attn1"], "--exclude is an adapter option"),
    (["--distill", "small", "--network", "loha"], "add --distill-train adapters"),
    (["--distill", "small", "--distill-train", "adapters", "--train-text-encoder"], "student UNet only"),
    (["--distill", "small", "--base-dtype", "int8"], "--base-dtype is not supported with --distill"),
])
def test_distill_train_bad_flags_one_line(flags, message, capsys):
    test_bad_flags_one_line(flags, message, capsys)


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_merged_student_computes_the_adapted_one(network):
    """The other networks (3x3 convs too): the plain UNet the files are written from (`merged_student`) computes what
    the student with its adapters computes (their merge formulas are tested in the adapter tests)."""
    from minisd import adapters
    from minisd.train.distill_loop import merged_student
    from minisd.trainer import TARGETS
    teacher = teacher_of(MINISD_LIKE, seed=5)
    student, plan = build_student(teacher, "tiny")
    student.requires_grad_(False)
    adapters.inject(student, network, TARGETS["full"], rank=2, alpha=3.0, conv_rank=2, conv_alpha=1.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.adapter_parameters(student):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x, c, t = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 32, generator=g), torch.tensor([3., 700.])
    plain = merged_student(student, plan.cfg)
    assert not list(adapters.adapter_layers(plain))
    with torch.no_grad():
        a, b = student.eval()(x, t, c), plain(x, t, c)
        base = UNetModel(plan.cfg)
        base.load_state_dict(build_student(teacher, "tiny")[0].state_dict())
        z = base.eval()(x, t, c)
    diff = (a - b).abs().max().item()
    print(f"{network}: max |adapted - merged| = {diff:.1e}, the adapters move the output by {(a - z).abs().max():.1e}")
    assert diff <= 1e-6 and (a - z).abs().max() > 1e-3  # measured ~1e-8 (fp32 rounding), against ~1e-2
