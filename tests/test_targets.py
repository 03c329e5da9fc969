"""--targets attn1 / attn2 / re:REGEX and --exclude select exactly the module paths listed here by hand (tiny-random
UNet: transformer blocks at input_blocks.1.1, input_blocks.3.1, middle_block.1, output_blocks.0-3.1); an expression
that selects nothing, or a bad one, is one `error:` line."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.formats import load_model  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from minisd.train.targets import selected  # noqa: E402

torch.set_num_threads(1)
BLOCKS = ["input_blocks.1.1", "input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1",
          "output_blocks.2.1", "output_blocks.3.1"]
LAYERS = ["to_q", "to_k", "to_v", "to_out.0"]


def by_hand(attn, blocks=BLOCKS, layers=LAYERS):
    return {f"{b}.transformer_blocks.0.{attn}.{x}" for b in blocks for x in layers}


@pytest.fixture(scope="module")
def unet():
    return load_model("tiny-random").unet


def _sel(unet, *flags):
    cfg, _ = parse_config(["--model", "tiny-random", *flags])
    return set(selected(cfg, unet))


def test_attn1_attn2_regex_exclude(unet):
    assert _sel(unet, "--targets", "attn1") == by_hand("attn1")
    assert _sel(unet, "--targets", "attn2") == by_hand("attn2")
    assert _sel(unet, "--targets", "attn") == by_hand("attn1") | by_hand("attn2")
    rx = r"re:^output_blocks\.[23]\..*attn2\.to_(k|v)$"
    want = by_hand("attn2", ["output_blocks.2.1", "output_blocks.3.1"], ["to_k", "to_v"])
    assert _sel(unet, "--targets", rx) == want and len(want) == 4
    assert _sel(unet, "--targets", rx, "--exclude", r"output_blocks\.3\.") == by_hand(
        "attn2", ["output_blocks.2.1"], ["to_k", "to_v"])
    # re.search semantics: "attn1" anywhere, including to_out.0, nothing else
    assert _sel(unet, "--targets", "re:attn1") == by_hand("attn1")
    # exclude on a preset: self-attention of the middle block left out
    assert _sel(unet, "--targets", "attn1", "--exclude", "middle_block") == by_hand(
        "attn1", [b for b in BLOCKS if b != "middle_block.1"])
    # a regex may reach 3x3 convs: the out conv of the UNet
    assert _sel(unet, "--targets", r"re:^out\.2$") == {"out.2"}


def test_trainer_adapts_exactly_the_selection(tmp_path):
    data = world.write_folder(str(tmp_path / "w"), 2, seed=0)
    cfg, _ = parse_config(["--model", "tiny-random", "--data", data, "--out", str(tmp_path / "r"), "--targets",
                           "attn2", "--exclude", "input_blocks", "--no-progress"])
    t = Trainer(cfg, str(tmp_path / "r"), log=lambda s: None)
    assert set(t.unet_layers) == by_hand("attn2", BLOCKS[2:])


@pytest.mark.parametrize("flags, message", [
    (["--targets", "re:attn3"], "matches no Linear / Conv2d layer"),
    (["--targets", "attn", "--exclude", "attn"], "leaves none of the --targets"),
    (["--targets", "re:("], "not a regular expression"),
    (["--targets", "mlp"], "--targets must be one of"),
    (["--exclude", "[a"], "--exclude '[a': not a regular expression"),
])
def test_bad_targets_are_one_line(tmp_path, capsys, flags, message):
    data = world.write_folder(str(tmp_path / "w"), 2, seed=0)
    rc = train.main(["--model", "tiny-random", "--data", data, "--out", str(tmp_path / "r"), "--threads", "1",
                     "--no-progress", "--max-steps", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err and message in err, err
