"""Adapter files leave the machine: their metadata holds no local path of the run that trained them (issue 14, bug 7).
The training config travels as names relative to the run folder, or base names; config.json keeps the real paths."""
import json
import os
import sys

import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minisd import world  # noqa: E402
from minisd.config import TINY  # noqa: E402
from minisd.model import StableDiffusion, save_model  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402

torch.set_num_threads(1)


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_adapter_metadata_has_no_local_path(tmp_path):
    home = tmp_path / "home" / "alice"         # stands for the trainer's private directories
    data = world.write_folder(str(home / "datasets" / "dogs"), 4, seed=0, style="striped")
    torch.manual_seed(0)
    model = str(home / "models" / "my-sd")
    save_model(StableDiffusion(TINY), model)
    prompts = home / "prompts.txt"
    prompts.write_text("a red circle\n")
    run = home / "runs" / "r1"
    cfg, _ = parse_config(["--model", model, "--data", data, "--out", str(run), "--max-steps", "1", "--batch-size",
                           "1", "--no-samples", "--no-progress", "--threads", "1", "--ema-decay", "0.5",
                           "--validate-every", "1", "--validation-prompts", str(prompts), "--validation-steps", "1"])
    out = Trainer(cfg, str(run), log=lambda s: None).run()
    files = [out["lora"], out["kohya"], out["lora_raw"]]
    for f in files:
        for k, v in metadata(f).items():
            assert str(tmp_path) not in v and "alice" not in v, (os.path.basename(f), k, v)
    tc = json.loads(metadata(out["lora"])["minisd.train_config"])
    assert (tc["model"], tc["data"], tc["validation_prompts"], tc["out"], tc["resume"]) == (
        "my-sd", "dogs", "prompts.txt", None, None)
    assert tc["rank"] == cfg.rank and tc["max_steps"] == 1     # the recipe itself is all there
    assert json.loads(metadata(out["lora_raw"])["minisd.train_config"]) == tc
    assert cfg.to_dict()["data"] == data    # what train.py writes to config.json keeps the real path (--resume)


def test_public_dict_paths_inside_the_run_are_relative():
    cfg, _ = parse_config(["--out", "/srv/u/runs/r2", "--model", "tiny-random", "--validation-prompts", "a|b",
                           "--validate-every", "5", "--cache-latents", "--cache-dir", "/srv/u/runs/r2/cache"])
    cfg.data = "/srv/u/runs/r2/data"           # the world run writes its images into the run folder
    d = cfg.public_dict("/srv/u/runs/r2")
    assert (d["data"], d["cache_dir"], d["model"], d["validation_prompts"], d["out"]) == (
        "data", "cache", "tiny-random", "a|b", None)
    assert cfg.out == "/srv/u/runs/r2" and cfg.data == "/srv/u/runs/r2/data"   # the config itself is unchanged
