"""train.py and the loop: a few-step CLI run writes every output; a short overfit run lowers the loss; stop and
--resume reproduce the uninterrupted run bitwise (losses and adapter weights); config precedence (defaults <
TOML < flags); bad flags exit 2 with one line; NaN stops with a message; bf16 / fp16 / checkpointing run."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.adapters import adapter_state_dict  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer, TrainError  # noqa: E402
from minisd.trainer import lr_lambda, min_snr_weight  # noqa: E402
from conftest import save_tiny_sdxl, kill_at  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 6, seed=0, style="striped")


def _trainer(tmp_path, data_dir, *flags):
    cfg, _ = parse_config(FAST + ["--data", data_dir, "--out", str(tmp_path)] + list(flags))
    return Trainer(cfg, str(tmp_path), log=lambda s: None)


def test_cli_default_run_writes_everything(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = train.main(FAST + ["--max-steps", "3", "--n-images", "8", "--out", out, "--n-eval", "4",
                            "--sample-steps", "2"])
    assert rc == 0, capsys.readouterr().err
    for f in ("config.json", "lora.safetensors", "lora_kohya.safetensors", "loss.jsonl", "loss.png",
              "checkpoint.pt", "samples_before.png", "samples_after.png", "probe_before.json", "probe_after.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert len(os.listdir(os.path.join(out, "data"))) == 8 * 2 + 2  # png + txt, metadata + attributes
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["max_steps"] == 3 and cfg["model"] == "tiny-random"
    assert len(open(os.path.join(out, "loss.jsonl")).readlines()) == 3
    text = capsys.readouterr().out
    assert "train config:" in text and "probe after: style adoption" in text


def test_overfit_lowers_loss(tmp_path, data_dir):
    t = _trainer(tmp_path, data_dir, "--lr", "1e-2", "--max-steps", "24", "--batch-size", "2",
                 "--train-text-encoder", "--te-lr", "1e-3", "--save-every", "0")
    assert len(t.te_layers) == 12 and len(t.unet_layers) > 0
    losses = t.run()["losses"]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    print(f"overfit: first {first:.4f} last {last:.4f}")
    assert last < 0.95 * first, (first, last)


def test_resume_is_exact(tmp_path, data_dir):
    flags = ["--max-steps", "6", "--seed", "1", "--random-crop", "--flip", "0.5", "--caption-dropout", "0.3",
             "--noise-offset", "0.1", "--min-snr-gamma", "5", "--lr-scheduler", "cosine", "--warmup-steps", "2",
             "--network", "dora", "--train-text-encoder", "--no-samples"]
    full = _trainer(tmp_path / "full", data_dir, *flags)
    want = full.run()["losses"]
    part = str(tmp_path / "part")
    # a run that dies after its step-3 checkpoint (as under SIGKILL: nothing else is written)
    killed = _trainer(tmp_path / "part", data_dir, *flags, "--save-every", "3")
    json.dump(killed.cfg.to_dict(), open(os.path.join(part, "config.json"), "w"))
    kill_at(killed, 4)
    assert not os.path.exists(os.path.join(part, "lora.safetensors"))
    assert train.main(["--resume", part, "--max-steps", "6", "--threads", "1"]) == 0
    got = [json.loads(line)["loss"] for line in open(os.path.join(part, "loss.jsonl"))]
    assert got == want, (got, want)  # bitwise on the CPU
    resumed = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)["adapter"]
    ref = adapter_state_dict(full.model)
    assert resumed.keys() == ref.keys()
    for k in ref:
        assert torch.equal(resumed[k], ref[k]), k


def test_config_precedence_and_errors(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('rank = 4\nlr = 0.5\nnetwork = "loha"\nmin-snr-gamma = 5.0\n')
    cfg, _ = parse_config(["--config", str(toml), "--lr", "0.25"])
    assert (cfg.rank, cfg.lr, cfg.network, cfg.min_snr_gamma) == (4, 0.25, "loha", 5.0)
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense_option = 1\n")
    for argv in (["--network", "foo"], ["--rank", "x"], ["--config", str(bad)], ["--lr", "-1"],
                 ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                 ["--resume", str(tmp_path)]):
        capsys.readouterr()
        with pytest.raises(SystemExit) if argv[:2] in (["--network", "foo"], ["--rank", "x"]) else _no_raise():
            assert train.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_nan_loss_stops_with_message(tmp_path, data_dir, monkeypatch):
    t = _trainer(tmp_path, data_dir, "--max-steps", "2")
    monkeypatch.setattr(t, "micro_loss", lambda batch: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainError, match="loss is nan at step 1"):
        t.run()


@pytest.mark.parametrize("flags", [["--mixed-precision", "bf16", "--gradient-checkpointing"],
                                   ["--mixed-precision", "fp16", "--optimizer", "adamw8bit"],
                                   ["--optimizer", "prodigy", "--lr", "1", "--targets", "full", "--network", "lokr",
                                    "--prediction", "v_prediction"]])
def test_precision_and_options_run(tmp_path, data_dir, flags):
    t = _trainer(tmp_path, data_dir, "--max-steps", "2", "--no-samples", *flags)
    before = {k: v.clone() for k, v in adapter_state_dict(t.model).items()}
    t.run()
    assert all(p.dtype == torch.float32 for p in t.params)
    after = adapter_state_dict(t.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert t.model.unet.gradient_checkpointing == ("--gradient-checkpointing" in flags)


def test_schedule_and_weights():
    cfg, _ = parse_config(["--max-steps", "10", "--warmup-steps", "2", "--lr-scheduler", "cosine"])
    f = lr_lambda(cfg)
    assert [round(f(s), 4) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_from_scratch_dispatches_to_pretrain(monkeypatch):
    import types
    seen = {}
    fake = types.ModuleType("minisd.world.pretrain")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "minisd.world.pretrain", fake)
    assert train.main(["--from-scratch", "--max-steps", "5"]) == 0
    assert seen["argv"] == ["--max-steps", "5"]


def test_sdxl_vector_conditioning_trains(tmp_path, data_dir):
    """A tiny SDXL (two text encoders, pooled + size conditioning): one step with TE adapters, kohya te1/te2 names."""
    from safetensors.torch import load_file
    save_tiny_sdxl(tmp_path / "xl")
    out = tmp_path / "run"
    assert train.main(["--model", str(tmp_path / "xl"), "--data", data_dir, "--out", str(out), "--max-steps", "1",
                       "--batch-size", "1", "--train-text-encoder", "--threads", "1", "--no-progress"]) == 0
    keys = list(load_file(str(out / "lora_kohya.safetensors")))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k") for k in keys)  # SGM
