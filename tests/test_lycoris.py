"""LoHa / LoKr layers (minisd/lycoris.py) against PEFT's LoHaConfig / LoKrConfig: outputs and gradients within 3e-6
(each bound ~3x the difference measured on a 2-core x86 VM), zero-init equals the base bit for bit, merge/unmerge,
factorization rule, the memory-saving paths."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization

from conftest import randomize
from minisd import adapters
from minisd.adapters.lycoris import HadamardProduct, LoHaLinear, LoKrConv2d, LoKrLinear, factorization

TARGETS = ["conv_in", "proj", "to_q", "to_out.0"]


class Toy(nn.Module):
    """3x3 stride-2 conv, 1x1 conv, two Linears over tokens (one inside a Sequential); widths with several factors."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 12, 1)
        self.to_q = nn.Linear(12, 16)
        self.to_out = nn.Sequential(nn.Linear(16, 12, bias=False))

    def forward(self, x):
        h = self.proj(F.silu(self.conv_in(x)))
        t = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        return self.to_out(F.gelu(self.to_q(t)))


CONFIGS = {  # name -> (peft config kwargs, our inject kwargs)
    "loha_r2": ("loha", dict(r=2, alpha=3.0), dict(rank=2, alpha=3.0)),
    "loha_r4": ("loha", dict(r=4, alpha=4.0), dict(rank=4, alpha=4.0)),
    "lokr_full": ("lokr", dict(r=8, alpha=4.0), dict(rank=8, alpha=4.0)),
    "lokr_low": ("lokr", dict(r=1, alpha=2.0), dict(rank=1, alpha=2.0)),
    "lokr_both": ("lokr", dict(r=1, alpha=2.0, decompose_both=True, decompose_factor=8),
                  dict(rank=1, alpha=2.0, decompose_both=True, factor=8)),
    "lokr_f2": ("lokr", dict(r=2, alpha=5.0, decompose_factor=2), dict(rank=2, alpha=5.0, factor=2)),
}


def pair(name, seed=0):
    kind, peft_kw, our_kw = CONFIGS[name]
    base = randomize(Toy(), seed=seed, std=0.3)
    cfg = (LoHaConfig if kind == "loha" else LoKrConfig)(target_modules=TARGETS, init_weights=False, **peft_kw)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    ours = copy.deepcopy(base)
    adapters.inject(ours, kind, TARGETS, conv_rank=our_kw["rank"], conv_alpha=our_kw["alpha"], **our_kw)
    sd = {}
    for k, v in pm.state_dict().items():  # names are the same up to PEFT's prefix and adapter name
        if ".default" in k:
            k = k.replace("base_model.model.", "").replace(".default", "")
            sd[k] = v.clone()
    for path in adapters.group_by_module(sd):
        sd[path + ".alpha"] = torch.tensor(our_kw["alpha"])
    if name != "lokr_both":  # 16 = 8 x 2 (PEFT) vs 2 x 8 (LyCORIS, minisd): another factor pair gets decomposed
        assert set(sd) == set(adapters.adapter_state_dict(ours)), sorted(set(sd) ^ set(adapters.adapter_state_dict(ours)))
    # built from PEFT's tensors: PEFT orders a factor pair (factor, dim/factor) as given, minisd as LyCORIS does
    # (small first), so "lokr_both" (16 = 8 x 2) has other shapes in the two; the layer follows the tensors
    ours = copy.deepcopy(base)
    adapters.load_adapter_state_dict(ours, sd, ranks={p: our_kw["rank"] for p in adapters.group_by_module(sd)})
    adapters.freeze_base(ours)
    return pm, ours


def maxdiff(a, b):
    return (a - b).abs().max().item()


def run(model, x, g):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_parity_outputs_and_grads(name):
    pm, ours = pair(name)
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 9, 12)
    y_ref, gx_ref = run(pm, x, g)
    y, gx = run(ours, x, g)
    assert maxdiff(y, y_ref) < 3e-6, f"output max diff {maxdiff(y, y_ref)}"  # measured 9.5e-7
    assert maxdiff(gx, gx_ref) < 3e-6, f"input grad max diff {maxdiff(gx, gx_ref)}"  # measured 9.5e-7
    ref = {k.replace("base_model.model.", "").replace(".default", ""): p.grad
           for k, p in pm.named_parameters() if p.grad is not None}
    got = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and len(ref) >= 2 * len(TARGETS), sorted(set(got) ^ set(ref))
    for k in ref:  # some factor grads reach ~10: relative to the reference's max magnitude
        rel = maxdiff(got[k], ref[k]) / max(1.0, ref[k].abs().max().item())
        assert rel < 2e-6, f"{k}: grad max diff {maxdiff(got[k], ref[k])} (relative {rel})"  # measured 5.9e-7


@pytest.mark.parametrize("kind,kw", [("loha", {}), ("lokr", {}), ("lokr", {"init": "lycoris"}),
                                     ("lokr", {"decompose_both": True, "rank": 1})])
def test_default_init_is_exactly_base(kind, kw):
    base = randomize(Toy(), std=0.3)
    ours = copy.deepcopy(base)
    adapters.inject(ours, kind, TARGETS, **{"rank": 2, "conv_rank": 2, **kw})
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(ours(x), base(x))


@pytest.mark.parametrize("name", ["loha_r2", "lokr_low", "lokr_full"])
def test_merge_equals_unmerged_and_unmerge_restores(name):
    _, ours = pair(name)
    ours.eval()
    adapters.set_scale(ours, 0.6)
    x = torch.randn(2, 4, 6, 6)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y = ours(x)
    adapters.merge(ours)
    assert maxdiff(ours(x), y) < 4e-6, maxdiff(ours(x), y)  # measured 1.2e-6
    adapters.unmerge(ours)
    for k, v in ours.state_dict().items():
        assert maxdiff(v, before[k]) < 1e-7, k  # measured 3.0e-8


def test_factorization_matches_lycoris():
    """The LyCORIS rule (its loader rebuilds the shapes from it): 768 with factor 32 is (24, 32), where PEFT gives
    (32, 24); elsewhere the two agree."""
    from lycoris.functional import factorization as lycoris_factorization
    assert factorization(768, 32) == (24, 32) and peft_factorization(768, 32) == (32, 24)
    for dim in range(1, 1300):
        for factor in (-1, 2, 3, 4, 8, 16, 32, 64):
            assert factorization(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)
            a, b = peft_factorization(dim, factor)
            assert factorization(dim, factor) == (min(a, b), max(a, b)), (dim, factor)


def test_hadamard_product_gradient():
    a1, b1, a2, b2 = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(5, 2), (2, 7), (5, 2), (2, 7)])
    assert torch.autograd.gradcheck(HadamardProduct.apply, (a1, b1, a2, b2))


def test_loha_backward_keeps_no_full_size_products():
    """Autograd saves only the four thin factors for ΔW (the [out, in] products are recomputed in backward)."""
    layer = LoHaLinear(nn.Linear(64, 48).requires_grad_(False), rank=2, init=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer.delta_weight()
    assert sorted(saved) == sorted([(48, 2), (2, 64), (48, 2), (2, 64), ()]), saved  # 4 factors + the scale


def test_lokr_linear_never_builds_kron(monkeypatch):
    """(W1 ⊗ W2) x is computed as W1 X W2ᵀ: equal to F.linear with the materialised ΔW, which is never formed."""
    layer = LoKrLinear(nn.Linear(64, 64, bias=False), rank=16, init=False).eval()
    x = torch.randn(3, 5, 64)
    ref = F.linear(x, layer.weight + layer.delta_weight())

    def boom(*args, **kwargs):
        raise AssertionError("the Kronecker product was materialised")
    monkeypatch.setattr(torch, "kron", boom)
    monkeypatch.setattr(layer, "delta_weight", boom)
    assert maxdiff(layer(x), ref) < 3e-6  # measured 9.5e-7


def test_lokr_conv_full_kernel_factor():
    """Full W2 keeps the kernel: [k, n, kh, kw]; W1 ⊗ W2 reshaped equals kron with W1 as [l, m, 1, 1]."""
    layer = LoKrConv2d(nn.Conv2d(8, 12, 3), rank=8, init=False)
    assert layer.lokr_w2.ndim == 4
    ref = torch.kron(layer.lokr_w1[:, :, None, None], layer.lokr_w2) * layer.scale
    assert maxdiff(layer.delta_weight(), ref) <= 0.0  # measured 0.0: the same products, bit-exact
