"""Hypernetworks (issue 17; A1111's modules/hypernetworks/hypernetwork.py): the MLP by hand (layer order, residual,
strength only in eval), the hook changes only the keys' and values' inputs (one attention layer by hand), A1111's
own .pt layout is read with weights_only=True, only the MLPs train, the saved file draws the in-memory model's
image through sample.py, resume is exact, bad files and flags are one line."""
import collections
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.adapters.hypernetwork import (Hypernetwork, HypernetworkModule, attach, detach,  # noqa: E402
                                          read_hypernetwork)
from minisd.attention import CrossAttention  # noqa: E402
from minisd.formats import load_model  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from conftest import killed_and_resumed  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples",
        "--method", "hypernetwork"]
PROMPT = "a small red star at the center on a blue background"


def randomize(module, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def test_mlp_by_hand():
    """[1, 2.5, 1], relu, layer norm, dropout 0.2 after the hidden layer: A1111's order Linear, act, LN, Dropout,
    Linear, LN (no act on the output), its key indices, and x + s·MLP(x) with s only in eval."""
    m = randomize(HypernetworkModule(6, (1, 2.5, 1), "relu", "Normal", layer_norm=True, dropout=[0, 0.2, 0]))
    assert [type(l).__name__ for l in m.linear] == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]
    assert list(m.state_dict()) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
                                    "linear.4.weight", "linear.4.bias", "linear.5.weight", "linear.5.bias"]
    assert m.linear[0].weight.shape == (15, 6) and m.linear[3].p == 0.2
    sd = m.state_dict()
    x = torch.randn(2, 5, 6)
    h = F.relu(x @ sd["linear.0.weight"].T + sd["linear.0.bias"])
    h = F.layer_norm(h, (15,), sd["linear.2.weight"], sd["linear.2.bias"], 1e-5)
    h = h @ sd["linear.4.weight"].T + sd["linear.4.bias"]
    h = F.layer_norm(h, (6,), sd["linear.5.weight"], sd["linear.5.bias"], 1e-5)
    m.multiplier = 0.6
    torch.testing.assert_close(m.eval()(x), x + 0.6 * h, rtol=1e-6, atol=1e-6)
    m.linear[3].p = 0.0  # training: strength 1 (A1111), here without dropout to compare
    torch.testing.assert_close(m.train()(x), x + h, rtol=1e-6, atol=1e-6)
    # activate_output puts the activation after the last Linear too; linear means none at all
    assert [type(l).__name__ for l in HypernetworkModule(4, (1, 2, 1), "tanh", activate_output=True).linear] == \
        ["Linear", "Tanh", "Linear", "Tanh"]
    assert [type(l).__name__ for l in HypernetworkModule(4, (1, 2, 2, 1), "linear").linear] == ["Linear"] * 3


def test_init_is_a1111s():
    torch.manual_seed(3)
    m = HypernetworkModule(512, (1, 2, 1), "relu", "Normal", layer_norm=True)
    w, ln = m.linear[0].weight, m.linear[2].weight
    assert abs(w.std().item() - 0.01) < 0.0005 and m.linear[0].bias.abs().max() == 0
    assert abs(ln.std().item() - 0.01) < 0.001   # A1111 also draws LayerNorm weights from N(0, 0.01²)
    k = HypernetworkModule(512, (1, 2, 1), "relu", "KaimingNormal").linear[0].weight
    assert abs(k.std().item() - (2 / 512) ** 0.5) < 0.003


def test_hook_changes_only_the_key_and_value_inputs():
    """One cross-attention layer by hand: Q from x, K and V from c + s·MLP_k(c), c + s·MLP_v(c)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.cross = randomize(CrossAttention(16, 24, heads=2, dim_head=8), 1)
    net.self_ = randomize(CrossAttention(16, None, heads=2, dim_head=8), 2)
    hn = Hypernetwork([24], (1, 2, 1), "elu")
    randomize(hn, 3, std=0.2)
    hn.set_multiplier(0.7)
    x, c = torch.randn(2, 7, 16), torch.randn(2, 5, 24)
    base_self = net.self_(x)
    assert attach(net, hn.eval()) == ["cross"]        # width 24 only: the self-attention (16) is untouched
    net.eval()
    A = net.cross

    def mlp(seq, t):
        return t + 0.7 * (F.elu(t @ seq[0].weight.T + seq[0].bias) @ seq[2].weight.T + seq[2].bias)
    q = x @ A.to_q.weight.T
    k = mlp(hn.layers["24"][0].linear, c) @ A.to_k.weight.T
    v = mlp(hn.layers["24"][1].linear, c) @ A.to_v.weight.T
    heads = lambda t: t.view(2, t.shape[1], 2, 8).transpose(1, 2)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 8 ** 0.5, dim=-1) @ heads(v)
    expected = att.transpose(1, 2).reshape(2, 7, 16) @ A.to_out[0].weight.T + A.to_out[0].bias
    torch.testing.assert_close(A(x, c), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(net.self_(x), base_self)
    # k and v MLPs differ, and q is not touched: swapping the MLPs changes the output
    hn.layers["24"][0], hn.layers["24"][1] = hn.layers["24"][1], hn.layers["24"][0]
    attach(net, hn)
    assert not torch.allclose(A(x, c), expected)
    detach(net)
    plain = A(x, c)
    q2 = x @ A.to_q.weight.T
    k2, v2 = c @ A.to_k.weight.T, c @ A.to_v.weight.T
    att = torch.softmax(heads(q2) @ heads(k2).transpose(-1, -2) / 8 ** 0.5, dim=-1) @ heads(v2)
    torch.testing.assert_close(plain, att.transpose(1, 2).reshape(2, 7, 16) @ A.to_out[0].weight.T
                               + A.to_out[0].bias, rtol=1e-5, atol=1e-6)
    # a block width enabled too: the self-attention's k/v inputs (x itself) go through it, as in A1111
    hn2 = Hypernetwork([24, 16])
    randomize(hn2, 4)
    assert sorted(attach(net, hn2.eval())) == ["cross", "self_"]
    assert not torch.allclose(net.self_(x), base_self)
    detach(net)


class A1111Module(nn.Module):
    """A1111's HypernetworkModule layout (a Sequential called `linear`), written here from its facts only."""
    def __init__(self, dim, layers):
        super().__init__()
        self.linear = nn.Sequential(*layers)


def a1111_file(path, dim=96, seed=0, old_keys=False):
    """What A1111's `Hypernetwork.save` writes: {width: (k sd, v sd), settings...}, relu, dropout structure."""
    torch.manual_seed(seed)
    k = A1111Module(dim, [nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(0.3), nn.Linear(2 * dim, dim)])
    v = A1111Module(dim, [nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(0.3), nn.Linear(2 * dim, dim)])
    sds = [m.state_dict() for m in (k, v)]
    if old_keys:  # the oldest files: linear1 (d -> 2d) / linear2 (2d -> d), no activation
        sds = [collections.OrderedDict([("linear1.weight", torch.randn(2 * dim, dim)),
                                        ("linear1.bias", torch.randn(2 * dim)),
                                        ("linear2.weight", torch.randn(dim, 2 * dim)),
                                        ("linear2.bias", torch.randn(dim))])
               for _ in range(2)]
        torch.save({dim: tuple(sds), "step": 3, "name": "old"}, path)
        return sds
    torch.save({dim: tuple(sds), "step": 1200, "name": "anime", "layer_structure": [1, 2, 1],
                "activation_func": "relu", "is_layer_norm": False, "weight_initialization": "Normal",
                "sd_checkpoint": "abc123", "sd_checkpoint_name": "model", "activate_output": False,
                "use_dropout": True, "dropout_structure": [0, 0.3, 0], "last_layer_dropout": False,
                "optional_info": None}, path)
    return k, v


def test_a1111_pt_is_read_with_weights_only(tmp_path):
    path = str(tmp_path / "anime.pt")
    k, v = a1111_file(path)
    hn = read_hypernetwork(path)
    assert hn.name == "anime" and hn.step == 1200 and hn.settings["dropout_structure"] == [0, 0.3, 0]
    c = torch.randn(2, 4, 96)
    hn.set_multiplier(0.5)
    torch.testing.assert_close(hn.layers["96"][0](c), c + 0.5 * k.eval().linear(c), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hn.layers["96"][1](c), c + 0.5 * v.eval().linear(c), rtol=1e-6, atol=1e-6)
    # minisd's safetensors of it reads back to the same tensors (the flat key layout)
    hn.save(str(tmp_path / "anime.safetensors"))
    again = read_hypernetwork(str(tmp_path / "anime.safetensors"))
    assert again.settings == hn.settings
    for (a, x), (b, y) in zip(hn.state_dict().items(), again.state_dict().items()):
        assert a == b and torch.equal(x, y)
    from safetensors.torch import load_file
    assert "96.1.linear.3.weight" in load_file(str(tmp_path / "anime.safetensors"))  # A1111's index of Linear 2
    # the oldest layout (linear1 / linear2, A1111 renames them) and its defaults (activate_output True, linear)
    sds = a1111_file(str(tmp_path / "old.pt"), dim=8, old_keys=True)
    old = read_hypernetwork(str(tmp_path / "old.pt"))
    c = torch.randn(3, 8)
    ref = c + (c @ sds[0]["linear1.weight"].T + sds[0]["linear1.bias"]) @ sds[0]["linear2.weight"].T \
        + sds[0]["linear2.bias"]
    torch.testing.assert_close(old.layers["8"][0](c), ref, rtol=1e-5, atol=1e-5)


def test_bad_hypernetwork_files_are_one_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({768: Evil()}, str(tmp_path / "evil.pt"))
    torch.save({"weight": torch.zeros(2)}, str(tmp_path / "lora.pt"))
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00")
    a1111_file(str(tmp_path / "hn.pt"))
    for name, message in (("evil.pt", "refused or unreadable"), ("lora.pt", "not an A1111 hypernetwork"),
                          ("trunc.safetensors", "not a readable safetensors"), ("none.pt", "no such file"),
                          ("hn.pt", "match no attention layer")):  # width 96 on a model of width 32
        rc = sample.main(["x", "--model", "tiny-random", "--hypernetwork", str(tmp_path / name), "--steps", "1",
                          "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and err.startswith("error:") and message in err, (name, err)
    assert not os.path.exists(tmp_path / "x.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 4, seed=0, style="striped")


def trainer(tmp_path, data_dir, *flags):
    cfg, _ = parse_config(FAST + ["--data", data_dir, "--out", str(tmp_path)] + list(flags))
    return Trainer(cfg, str(tmp_path), log=lambda s: None)


def test_only_the_mlps_train_and_the_file_draws_the_same_image(tmp_path, data_dir):
    base = load_model("tiny-random").state_dict()
    t = trainer(tmp_path / "run", data_dir, "--lr", "0.01", "--max-steps", "3", "--hn-activation", "leakyrelu",
                "--hn-layers", "1,1.5,1", "--hn-layer-norm", "--hn-dropout", "0,0.25,0", "--weight-decay", "0.3")
    assert [p for p in t.model.parameters() if p.requires_grad] == []
    assert [p for g in t.opt.param_groups for p in g["params"]] == list(t.method.hn.parameters())
    before = {k: v.clone() for k, v in t.method.hn.state_dict().items()}
    out = t.run()
    after = t.model.state_dict()
    assert set(after) == set(base) and all(torch.equal(base[k], after[k]) for k in base)  # the model: bit for bit
    assert all(not torch.equal(before[k], v) for k, v in t.method.hn.state_dict().items())  # every MLP tensor moved
    kw = dict(steps=3, cfg_scale=3.0, seed=2, width=64, height=64)
    t.method.hn.set_multiplier(0.8)
    ref = np.asarray(Pipeline(t.model.eval(), dtype=torch.float32)(PROMPT, **kw)[0])
    png = str(tmp_path / "s.png")
    assert sample.main([PROMPT, "--model", "tiny-random", "--hypernetwork", f"{out['hypernetwork']}:0.8", "--steps",
                        "3", "--cfg", "3", "--seed", "2", "--width", "64", "--height", "64", "--out", png]) == 0
    assert np.array_equal(ref, np.asarray(Image.open(png).convert("RGB")))
    # strength 0 is the base model exactly; the trained MLPs change the image
    plain = np.asarray(Pipeline(load_model("tiny-random"), dtype=torch.float32)(PROMPT, **kw)[0])
    t.method.hn.set_multiplier(0.0)
    assert np.array_equal(plain, np.asarray(Pipeline(t.model.eval(), dtype=torch.float32)(PROMPT, **kw)[0]))
    assert not np.array_equal(plain, ref)
    assert "Hypernet: hypernetwork, Hypernet strength: 0.8" in Image.open(png).text["parameters"]


def test_resume_is_exact(tmp_path, data_dir):
    flags = ("--lr", "0.01", "--max-steps", "4", "--save-every", "2", "--hn-dropout", "0,0.3,0")
    full, losses, again, resumed = killed_and_resumed(lambda name: trainer(tmp_path / name, data_dir, *flags))
    assert resumed == losses
    for (a, x), (b, y) in zip(full.method.hn.state_dict().items(), again.method.hn.state_dict().items()):
        assert torch.equal(x, y), a


def test_bad_flags_are_one_line(tmp_path, data_dir, capsys):
    base = FAST + ["--data", data_dir, "--max-steps", "1"]
    cases = [(["--hn-layers", "2,1"], "must start and end with 1"),
             (["--hn-layers", "1,x,1"], "--hn-layers must be comma-separated numbers"),
             (["--hn-dropout", "0,0.3"], "dropout structure"),
             (["--hn-sizes", "77"], "match no attention layer"),
             (["--train-text-encoder"], "--train-text-encoder applies to --method lora")]
    for i, (flags, message) in enumerate(cases):
        assert train.main(base + ["--out", str(tmp_path / str(i))] + flags) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and message in err, (flags, err)
    assert train.main([a for a in base if a not in ("--method", "hypernetwork")] + ["--hn-layer-norm"]) == 2
    assert "--hn-layer-norm applies to --method hypernetwork" in capsys.readouterr().err


def test_cli_world_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(FAST + ["--max-steps", "2", "--n-images", "4", "--out", out, "--hn-activation", "swish"]) == 0
    text = capsys.readouterr().out
    assert "hypernetwork.safetensors" in text and "swish" in text
    hn = read_hypernetwork(os.path.join(out, "hypernetwork.safetensors"))
    assert hn.step == 2 and isinstance(hn.layers["32"][0].linear[1], nn.Hardswish)  # A1111's "swish"
    assert not os.path.exists(os.path.join(out, "lora.safetensors"))
