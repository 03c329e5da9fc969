"""No flag is a silent no-op (issue 14, bug 2): adapter targets that match nothing are an error, the text encoder of
LDM-256 (LDMBert) takes adapters like CLIP does, and a train.py option that the chosen setup would ignore is refused
with one line. (sample.py's side: tests/test_sample_cli.py.)"""
import os
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from minisd import adapters, world  # noqa: E402
from minisd.config import LDM_256, TINY, LDMBertConfig, ModelConfig, UNetConfig  # noqa: E402
from minisd.model import StableDiffusion, save_model  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402

torch.set_num_threads(1)  # tiny ops; a second thread on a busy 2-core machine only waits (issue 14, bug 4)
FAST = ["--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 4, seed=0, style="striped")


@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory):
    """A tiny random LDM-256 (LDMBert text encoder, 2 layers) saved as a minisd folder."""
    cfg = ModelConfig(family="ldm", unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                                    transformer_depth=(1, 1), num_heads=4, context_dim=32,
                                                    norm_num_groups=8),
                      vae=TINY.vae, text_encoders=[LDMBertConfig(n_layer=2, d_model=32, n_heads=4, head_dim=8,
                                                                 ffn_dim=64)],
                      schedule=LDM_256.schedule, resolution=64)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ldm") / "ldm")
    save_model(StableDiffusion(cfg), path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------- inject
def test_targets_matching_nothing_are_an_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="match no plain Linear"):
        adapters.inject(m, "lora", [r".*self_attn\.q_proj"], rank=2)
    with pytest.raises(ValueError, match="need conv_rank"):  # only a 3x3 conv selected, no conv_rank: nothing adapted
        adapters.inject(m, "lora", ["1"], rank=2)
    assert not adapters.adapter_state_dict(m)       # nothing half-done
    assert adapters.inject(m, "lora", ["0"], rank=2) == ["0"]
    with pytest.raises(ValueError):                 # already adapted layers are not selected again
        adapters.inject(m, "lora", ["0"], rank=2)


# ------------------------------------------------------------------------------------------- LDMBert
def test_train_text_encoder_adapts_every_ldmbert_linear_and_trains_it(tmp_path, data_dir, tiny_ldm):
    cfg, _ = parse_config(FAST + ["--model", tiny_ldm, "--data", data_dir, "--out", str(tmp_path),
                                  "--train-text-encoder", "--te-lr", "1e-2", "--max-steps", "1"])
    t = Trainer(cfg, str(tmp_path), log=lambda s: None)
    te = t.model.text_encoders[0]
    # every Linear of the 2 layers' attention (q, k, v, out) and feed-forward (net.0.0, net.2); to_logits is unused
    want = [f"transformer.attn_layers.layers.{2 * i}.1.to_{p}" for i in range(2) for p in ("q", "k", "v", "out")]
    want += [f"transformer.attn_layers.layers.{2 * i + 1}.1.net.{p}" for i in range(2) for p in ("0.0", "2")]
    assert sorted(t.te_layers) == sorted(want)
    assert len(t.opt.param_groups) == 2 and t.opt.param_groups[1]["lr"] == 1e-2
    before = {k: v.clone() for k, v in adapters.adapter_state_dict(te).items()}
    t.train_step()
    after = adapters.adapter_state_dict(te)
    moved = [k for k in before if k.endswith("lora_up.weight") and not torch.equal(before[k], after[k])]
    assert len(moved) == len(want), moved     # every LDMBert adapter received a gradient and stepped


# ------------------------------------------------------------------------------------------- train.py options
@pytest.mark.parametrize("flags, named", [
    (["--te-lr", "1e-4"], "--te-lr"),
    (["--te2-lr", "1e-4"], "--te2-lr"),
    (["--targets", "attn", "--conv-rank", "4"], "--conv-rank"),
    (["--conv-alpha", "2"], "--conv-alpha"),                          # default targets attn-mlp: no 3x3 convs
    (["--bucket-min", "32"], "--bucket-min"),
    (["--no-ema-warmup"], "--no-ema-warmup"),
    (["--validation-steps", "3"], "--validation-steps"),
    (["--validation-prompts", "a|b"], "--validation-prompts"),
])
def test_train_refuses_options_the_setup_ignores(tmp_path, data_dir, capsys, flags, named):
    out = tmp_path / "run"   # FAST and one step: were the flag accepted, the run would end in seconds
    assert train.main(FAST + ["--model", "tiny-random", "--max-steps", "1", "--data", data_dir, "--out", str(out)]
                      + flags) == 2
    err = one_line_error(capsys)
    assert named in err and "ignored" in err
    assert not out.exists()


def test_world_run_refuses_conv_options_without_full_targets(tmp_path, capsys):
    """Without --data the world run picks --targets full itself; an explicit --targets attn makes --conv-rank moot."""
    assert train.main(["--targets", "attn", "--conv-rank", "2", "--out", str(tmp_path / "w"), "--model", "tiny-random",
                       "--max-steps", "1", "--n-images", "2"] + FAST) == 2
    assert "--conv-rank" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "w" / "data")   # refused before the world images are written
    cfg, _ = parse_config(["--conv-rank", "2"])          # world run with its default full targets: accepted
    assert cfg.conv_rank == 2


def test_the_same_options_pass_with_what_they_need(data_dir):
    for flags in (["--te-lr", "1e-4", "--train-text-encoder"], ["--targets", "full", "--conv-rank", "4"],
                  ["--buckets", "--bucket-min", "32"], ["--ema-decay", "0.9", "--no-ema-warmup"],
                  ["--validate-every", "5", "--validation-steps", "3", "--validation-prompts", "a|b"]):
        parse_config(["--data", data_dir] + flags)


# A flag given at its default value is given too: the rule is about what the user typed, not about the value.
AT_DEFAULT = [  # (the option, typed at TrainConfig's default value; other flags; what it needs; the refusal's words)
    ("fused_bucket_mb", [], ["--fused-backward", "--max-grad-norm", "0"], "--fused-bucket-mb would be ignored without --fused-backward"),
    ("ema_warmup", [], ["--ema-decay", "0.9"], "--ema-warmup would be ignored without --ema-decay"),
    ("bucket_step", [], ["--buckets"], "--bucket-step would be ignored without --buckets"),
    ("validation_steps", [], ["--validate-every", "5"], "--validation-steps would be ignored without"),
    ("val_fraction", [], [], "--val-fraction would be ignored without --val-loss-every"),
    ("num_class_images", [], [], "--num-class-images would be ignored without --class-prompt"),
    ("prior_loss_weight", [], [], "--prior-loss-weight would be ignored without --class-prompt"),
    ("distill_train", [], [], "--distill-train would be ignored without --distill"),
    ("rank", ["--method", "full"], [], "--rank: adapter option(s), ignored by --method full"),
    ("ti_vectors", ["--method", "lora"], [], "--ti-vectors applies to --method ti"),
]


@pytest.mark.parametrize("name, other, needs, words", AT_DEFAULT, ids=[a[0] for a in AT_DEFAULT])
def test_a_flag_at_its_default_value_is_refused_too(tmp_path, data_dir, capsys, name, other, needs, words):
    """`--fused-bucket-mb 128` (the default) without --fused-backward would change nothing: refused with one line
    like any other value; with what it needs it is accepted."""
    from minisd.train.config import TrainConfig
    value = getattr(TrainConfig(), name)
    flag = "--" + name.replace("_", "-")
    typed = [flag] if value is True else [flag, str(value)]            # the default itself, typed out
    out = tmp_path / "run"
    assert train.main(FAST + ["--model", "tiny-random", "--max-steps", "1", "--data", data_dir, "--out", str(out)]
                      + other + typed) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()
    if needs:
        cfg, _ = parse_config(["--data", data_dir] + other + typed + needs)
        assert getattr(cfg, name) == value
