"""Injection by name patterns, base state dict after injection, adapter state dict names, safetensors save/load with
metadata, weighted mixing (= sum of deltas), remove/merge, and SVD extraction (exact at full rank, Eckart-Young below)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from conftest import randomize
from minisd import adapters


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.proj_in = nn.Conv2d(8, 8, 1)
        self.attn1 = nn.ModuleDict({"to_q": nn.Linear(8, 8, bias=False), "to_k": nn.Linear(8, 8, bias=False)})
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))  # ff.0 / ff.2

    def forward(self, x):
        h = self.proj_in(F.silu(self.conv1(x)))
        t = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = t + self.attn1["to_q"](t) * torch.sigmoid(self.attn1["to_k"](t))
        return t + self.ff(t)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.blocks:
            t = b(h)
            h = t.transpose(1, 2).reshape(h.shape)
        return h


def net(seed=0):
    # frozen, as a base model is: matmul picks a different (bitwise) kernel path when the weight requires grad
    return randomize(Net(), seed=seed, std=0.2).requires_grad_(False)


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def maxdiff(a, b):
    return (a - b).abs().max().item()


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11))  # seeded: not the import order's RNG state


def test_target_patterns():
    m = net()
    assert adapters.find_modules(m, ["to_q"]) == ["blocks.0.attn1.to_q", "blocks.1.attn1.to_q"]
    assert adapters.find_modules(m, ["attn1.to_k", "ff.2"]) == ["blocks.0.attn1.to_k", "blocks.0.ff.2",
                                                                 "blocks.1.attn1.to_k", "blocks.1.ff.2"]
    assert adapters.find_modules(m, [r"blocks\.1\.attn1\.to_(q|k)"]) == ["blocks.1.attn1.to_q", "blocks.1.attn1.to_k"]
    assert adapters.find_modules(m, [r".*\.ff\.\d"], exclude=["blocks.0.ff.0"]) == ["blocks.0.ff.2", "blocks.1.ff.0",
                                                                                    "blocks.1.ff.2"]
    assert len(adapters.find_modules(m)) == 2 * 6 + 1
    # 3x3 convs need conv_rank (kohya's conv_dim); 1x1 convs are treated like Linear
    names = adapters.inject(m, "lora", ["conv1", "proj_in", "to_q"], rank=2)
    assert names == ["blocks.0.proj_in", "blocks.0.attn1.to_q", "blocks.1.proj_in", "blocks.1.attn1.to_q"]
    assert adapters.inject(m, "lora", ["conv1"], rank=2, conv_rank=3) == ["blocks.0.conv1", "blocks.1.conv1"]
    assert m.blocks[0].conv1.rank == 3 and adapters.find_modules(m, ["to_q"]) == []  # adapted layers not re-selected


def test_base_state_dict_loads_after_injection():
    base = net()
    sd = base.state_dict()
    m = net(seed=5)
    adapters.inject(m, "dora", ["to_q", "ff.0"], rank=2)
    adapters.inject(m, "loha", ["proj_in"], rank=2)
    adapters.inject(m, "lokr", ["conv1"], rank=2, conv_rank=2)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert unexpected == [] and adapters.split_missing(m, missing) == []
    assert missing and all(k in adapters.adapter_state_dict(m) for k in missing)
    # DoRA's magnitude was initialised from the old weight: reset it by re-injecting on the loaded weights
    adapters.remove(m)
    adapters.inject(m, "dora", ["to_q", "ff.0"], rank=2)
    assert torch.equal(m(X), base(X))


def test_adapter_state_dict_names():
    m = net()
    adapters.inject(m, "lora", ["to_q"], rank=2, alpha=1)
    adapters.inject(m, "dora", ["ff.2"], rank=3)
    adapters.inject(m, "loha", ["proj_in"], rank=2)
    adapters.inject(m, "lokr", ["conv_in"], conv_rank=2)
    keys = set(adapters.adapter_state_dict(m))
    assert {"blocks.0.attn1.to_q.lora_down.weight", "blocks.0.attn1.to_q.lora_up.weight", "blocks.0.attn1.to_q.alpha",
            "blocks.1.ff.2.dora_scale", "blocks.1.ff.2.lora_up.weight", "blocks.0.proj_in.hada_w1_a",
            "blocks.0.proj_in.hada_w2_b", "conv_in.lokr_w1", "conv_in.alpha"} <= keys
    assert not any(k.endswith((".weight", ".bias")) and "lora_" not in k for k in keys)
    assert adapters.adapter_state_dict(m)["blocks.0.attn1.to_q.alpha"].item() == 1.0
    assert adapters.adapter_state_dict(m)["blocks.1.ff.2.alpha"].item() == 3.0  # alpha None -> rank
    assert set(adapters.group_by_module(adapters.adapter_state_dict(m))) == {
        "blocks.0.attn1.to_q", "blocks.1.attn1.to_q", "blocks.0.ff.2", "blocks.1.ff.2", "blocks.0.proj_in",
        "blocks.1.proj_in", "conv_in"}


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_save_load_roundtrip(kind, tmp_path):
    m = net()
    adapters.inject(m, kind, ["to_q", "ff.0", "proj_in"], rank=2, alpha=3.0, conv_rank=2)
    randomize_adapters(m)
    y = m(X)
    path = str(tmp_path / "a.safetensors")
    # LoKr rank 2 on 8 = 2 x 4 channels gives two full factors: the file folds alpha/rank = 1.5 into lokr_w1 (same ΔW
    # up to rounding, see test_lycoris.test_full_lokr_file_scale_is_folded)
    same = (lambda a, b: maxdiff(a, b) < 1e-6) if kind == "lokr" else torch.equal
    def save(p, **kw):
        adapters.save_adapter(m, p, **kw)
    save(path, metadata={"ss_network_dim": "2", "steps": 100, "targets": ["to_q"]})
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(adapters.adapter_state_dict(m))
    # into a fresh base model: the layers are created from the tensors
    fresh = net()
    meta = adapters.load_adapter(fresh, path)
    assert meta["ss_network_dim"] == "2" and json.loads(meta["steps"]) == 100
    assert {k for k, r in json.loads(meta["minisd.adapter"]).values()} == {kind}
    assert same(fresh(X), y)
    # into a model already injected with the same layout
    other = net()
    adapters.inject(other, kind, ["to_q", "ff.0", "proj_in"], rank=2, alpha=3.0, conv_rank=2)
    adapters.load_adapter(other, path, inject=False)
    assert same(other(X), y)
    # half-precision file
    path = str(tmp_path / "half.safetensors")
    save(path, dtype=torch.float16)
    half = net()
    adapters.load_adapter(half, path)
    # the file's tensors are the trained ones rounded to fp16, bit for bit; the layers keep the file's dtype and compute
    # in it, so the output moves by fp16 rounding of the adapter path (measured 2.9e-4..1.0e-3 with this seeded X)
    want = {k: v.half() if v.is_floating_point() and not k.endswith("alpha") else v
            for k, v in adapters.adapter_state_dict(m, portable=True).items()}
    got = adapters.adapter_state_dict(half, portable=True)
    assert set(got) == set(want) and all(torch.equal(got[k].to(want[k].dtype), want[k]) for k in want)
    assert maxdiff(half(X), y) < 2e-3


def test_load_errors_and_alpha_conventions():
    m = net()
    with pytest.raises(KeyError):
        adapters.load_adapter_state_dict(m, {"blocks.0.nothing.lora_down.weight": torch.zeros(2, 8)})
    with pytest.raises(KeyError):
        adapters.load_adapter_state_dict(m, {"blocks.0.attn1.to_q.weird": torch.zeros(2, 8)})
    with pytest.raises(ValueError):  # LoHa tensors into a LoRA layer
        adapters.inject(m, "lora", ["to_q"], rank=2)
        adapters.load_adapter_state_dict(m, {"blocks.0.attn1.to_q.hada_w1_a": torch.zeros(8, 2)})
    # no alpha (diffusers files) and alpha 0 (kohya) both mean alpha = rank
    sd = {"blocks.0.ff.0.lora_down.weight": torch.randn(4, 8), "blocks.0.ff.0.lora_up.weight": torch.randn(16, 4),
          "blocks.0.ff.2.lora_down.weight": torch.randn(4, 16), "blocks.0.ff.2.lora_up.weight": torch.randn(8, 4),
          "blocks.0.ff.2.alpha": torch.tensor(0)}
    fresh = net()
    adapters.load_adapter_state_dict(fresh, sd)
    assert fresh.blocks[0].ff[0].scale.item() == 1.0 and fresh.blocks[0].ff[2].scale.item() == 1.0


def deltas_of(model_fn, sd, weight):
    """{path: weight delta} of one adapter alone, through inject + load + set_scale + merge."""
    m = model_fn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    adapters.load_adapter_state_dict(m, sd)
    adapters.set_scale(m, weight)
    adapters.merge(m)
    return {k[: -len(".weight")]: v - before[k] for k, v in m.state_dict().items() if k in before
            and k.endswith("weight") and not torch.equal(v, before[k])}


def test_mixed_adapters_equal_sum_of_deltas():
    sds = []
    # (LoKr rank 1 gives factored W2, whose rank the tensors show; see test_save_load_roundtrip for full factors)
    for i, (kind, targets, rank) in enumerate([("lora", ["to_q", "ff.0"], 2), ("dora", ["to_q", "proj_in"], 2),
                                               ("loha", ["ff.0"], 2), ("lokr", ["ff.2", "conv1"], 1)]):
        m = net()
        adapters.inject(m, kind, targets, rank=rank, alpha=1.5, conv_rank=rank)
        randomize_adapters(m, seed=10 + i)
        sds.append(adapters.adapter_state_dict(m))
    weights = [0.8, -0.5, 1.3, 0.4]
    expected = {}
    for sd, w in zip(sds, weights):
        for path, d in deltas_of(net, sd, w).items():
            expected[path] = expected.get(path, 0) + d
    mixed = net()
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    changed = adapters.merge_adapters(mixed, list(zip(sds, weights)))
    assert sorted(changed) == sorted(expected)
    for path, d in expected.items():
        got = mixed.state_dict()[path + ".weight"] - before[path + ".weight"]
        assert maxdiff(got, d) < 2e-7, f"{path}: {maxdiff(got, d)}"  # measured 6.0e-8
    assert all(type(mod) in (nn.Linear, nn.Conv2d) for mod in mixed.modules() if isinstance(mod, (nn.Linear, nn.Conv2d)))


def test_remove_and_freeze():
    m = net()
    base_y = m(X)
    adapters.inject(m, "lora", ["to_q", "ff.2"], rank=2)
    adapters.freeze_base(m)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 8 and {id(p) for p in trainable} == {id(p) for p in adapters.adapter_parameters(m)}
    randomize_adapters(m)
    y = m(X)
    adapters.remove(m, merge=True)
    assert not list(adapters.adapter_layers(m)) and maxdiff(m(X), y) < 1e-5
    m2 = net()
    adapters.inject(m2, "lora", ["to_q"], rank=2)
    randomize_adapters(m2)
    adapters.remove(m2)  # dropped, not merged
    assert torch.equal(m2(X), base_y)


def low_rank(out, inn, r, g):
    return (torch.randn(out, r, generator=g) @ torch.randn(r, inn, generator=g)) * 0.3


def test_svd_extraction_full_rank_recovers_delta():
    g = torch.Generator().manual_seed(3)
    base = net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.blocks[0].ff[0].weight += low_rank(16, 8, 3, g)
        tuned.blocks[1].attn1["to_q"].weight += low_rank(8, 8, 3, g)
        tuned.blocks[0].conv1.weight += low_rank(8, 72, 3, g).reshape(8, 8, 3, 3)
        tuned.blocks[1].ff[2].weight += torch.randn(8, 16, generator=g) * 0.1  # full rank 8
    sd = adapters.extract_lora(base, tuned, rank=8, conv_rank=3)
    assert set(adapters.group_by_module(sd)) == {"blocks.0.ff.0", "blocks.1.attn1.to_q", "blocks.0.conv1",
                                                 "blocks.1.ff.2"}  # unchanged layers left out
    assert sd["blocks.0.conv1.lora_down.weight"].shape == (3, 8, 3, 3)
    assert sd["blocks.0.conv1.lora_up.weight"].shape == (8, 3, 1, 1)
    assert sd["blocks.1.ff.2.lora_down.weight"].shape == (8, 16) and sd["blocks.1.ff.2.alpha"].item() == 8
    for path in adapters.group_by_module(sd):
        want = tuned.get_submodule(path).weight - base.get_submodule(path).weight
        up, down = sd[path + ".lora_up.weight"].flatten(1), sd[path + ".lora_down.weight"].flatten(1)
        assert maxdiff((up @ down).reshape(want.shape), want) < 4e-6, path  # measured 1.2e-6
    m = copy.deepcopy(base)
    adapters.load_adapter_state_dict(m, sd)  # base + extracted LoRA behaves like the tuned model
    ref = tuned(X)  # outputs reach ~10: relative to the reference's max magnitude
    assert maxdiff(m(X), ref) / ref.abs().max().item() < 2e-6, maxdiff(m(X), ref)  # measured 4.8e-7


def test_svd_extraction_lower_rank_is_best_approximation():
    g = torch.Generator().manual_seed(4)
    base = net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.blocks[0].ff[0].weight += torch.randn(16, 8, generator=g) * 0.2
    d = (tuned.blocks[0].ff[0].weight - base.blocks[0].ff[0].weight).detach()
    s = torch.linalg.svdvals(d)
    for r in (1, 3, 5):
        sd = adapters.extract_lora(base, tuned, rank=r, targets=["ff.0"])
        approx = sd["blocks.0.ff.0.lora_up.weight"] @ sd["blocks.0.ff.0.lora_down.weight"]
        # Eckart-Young: the error of the best rank-r approximation is the tail of the singular values
        err = torch.linalg.matrix_norm(d - approx).item()
        assert abs(err - s[r:].square().sum().sqrt().item()) < 3e-7, (r, err)  # measured 6.0e-8
        assert abs(torch.linalg.matrix_norm(d - approx, ord=2).item() - s[r].item()) < 4e-7  # 1.2e-7
        # and no other rank-r matrix tried here does better (random rank-r perturbations of the answer)
        for _ in range(5):
            other = approx + low_rank(16, 8, 1, g) * 0.01
            other = torch.linalg.svd(other)[0][:, :r] @ torch.diag(torch.linalg.svdvals(other)[:r]) @ \
                torch.linalg.svd(other)[2][:r]
            assert torch.linalg.matrix_norm(d - other).item() >= err - 1e-6
