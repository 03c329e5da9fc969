"""train.py's adapter files: the diffusers / PEFT file written beside the kohya one (same update), and
--init-adapter FILE (any layout): training starts from the file's weights; a rank or kind mismatch is one error line."""
import os

import pytest
import torch
from safetensors.torch import load_file

import train
from minisd import adapters, world
from minisd.train.cli import parse_config
from minisd.train.loop import Trainer

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 4, seed=0, style="striped")


def trainer(tmp_path, data_dir, *flags):
    cfg, _ = parse_config(FAST + ["--data", data_dir, "--out", str(tmp_path)] + list(flags))
    return Trainer(cfg, str(tmp_path), log=lambda s: None)


def test_peft_file_beside_kohya_and_init_adapter(tmp_path, data_dir):
    t = trainer(tmp_path / "a", data_dir, "--max-steps", "2", "--rank", "4", "--alpha", "2", "--lr", "1e-2",
                "--train-text-encoder")
    out = t.run()
    assert os.path.isfile(out["diffusers"]) and os.path.isfile(out["kohya"])
    keys = load_file(out["diffusers"])
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)
    trained = adapters.adapter_state_dict(t.model)
    # a new run from each file starts exactly where the first ended (the diffusers file: alpha/r folded into B)
    for f in (out["lora"], out["kohya"], out["diffusers"]):
        t2 = trainer(tmp_path / os.path.basename(f), data_dir, "--max-steps", "1", "--rank", "4", "--alpha", "2",
                     "--train-text-encoder", "--init-adapter", f)
        got = {k: v for k, v in adapters.adapter_state_dict(t2.model).items()}
        for path, layer in adapters.adapter_layers(t2.model):
            ref = t.model.get_submodule(path)
            assert torch.allclose(layer.delta_weight(), ref.delta_weight(), atol=1e-6), (f, path)
        assert set(got) == set(trained)


def test_init_adapter_mismatch_is_one_line_error(tmp_path, data_dir, capsys):
    t = trainer(tmp_path / "a", data_dir, "--max-steps", "1", "--rank", "4")
    out = t.run()
    for flags, word in ((["--rank", "8"], "rank"), (["--network", "loha", "--rank", "4"], "network"),
                        (["--rank", "4", "--init-adapter", str(tmp_path / "none.safetensors")], "no such file")):
        if "--init-adapter" not in flags:
            flags = flags + ["--init-adapter", out["lora"]]
        rc = train.main(FAST + ["--data", data_dir, "--out", str(tmp_path / "b"), "--max-steps", "1"] + flags)
        err = capsys.readouterr().err
        assert rc == 2 and err.strip().startswith("error:") and err.count("\n") == 1 and word in err, err
