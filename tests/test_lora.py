"""LoRA / DoRA layers (minisd/lora.py) against PEFT: outputs and gradients within 3e-6 to 1e-5 (each bound ~3x the
difference measured on a 2-core x86 VM), B = 0 is the base bit for bit, merge == unmerged forward, unmerge restores
the base, multiplier and dropout semantics, dtype handling."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from conftest import randomize
from minisd import adapters
from minisd.lora import LoRAConv2d, LoRALinear

TARGETS = ["conv_in", "proj", "to_q", "to_out.0"]


class Toy(nn.Module):
    """3x3 stride-2 conv, 1x1 conv (SD1 proj_in), two Linears over tokens, one inside a Sequential (SD's to_out.0)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.to_q = nn.Linear(8, 12)
        self.to_out = nn.Sequential(nn.Linear(12, 8, bias=False))

    def forward(self, x):
        h = self.proj(F.silu(self.conv_in(x)))
        t = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        return self.to_out(F.gelu(self.to_q(t)))


def peft_pair(rank, alpha, dora=False, dropout=0.0, seed=0):
    """(peft model, our model) with identical base weights and identical, non-zero adapter weights."""
    base = randomize(Toy(), seed=seed, std=0.3)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                                        use_dora=dora, lora_dropout=dropout))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # B = 0 would hide every bug
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "magnitude" in n:  # move the magnitude away from ‖W‖ so g ≠ 1
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    ours = copy.deepcopy(base)
    adapters.inject(ours, "dora" if dora else "lora", TARGETS, rank=rank, alpha=alpha, conv_rank=rank,
                    conv_alpha=alpha, dropout=dropout)
    adapters.load_adapter_state_dict(ours, peft_to_ours(pm, alpha))
    return pm, ours


# PEFT suffix (adapter name ".default" removed) -> ours
RENAME = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
          "lora_magnitude_vector.weight": "dora_scale"}


def peft_named(pm, tensors):
    """{our key: tensor} from PEFT's (name, tensor) pairs; skips the base layers."""
    out = {}
    for k, v in tensors:
        k = k.replace("base_model.model.", "").replace(".default", "")
        for theirs, mine in RENAME.items():
            if k.endswith("." + theirs):
                out[k[: -len(theirs)] + mine] = v
    return out


def peft_to_ours(pm, alpha):
    """PEFT's adapter tensors under our names, plus the alpha buffers PEFT keeps in its config."""
    out = {k: v.clone() for k, v in peft_named(pm, pm.state_dict().items()).items()}
    for path in adapters.group_by_module(out):
        out[path + ".alpha"] = torch.tensor(float(alpha))
    return out


def adapter_grads_peft(pm):
    return {k: p.grad for k, p in peft_named(pm, pm.named_parameters()).items() if p.grad is not None}


def adapter_grads_ours(model):
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def run(model, x, g):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad


def maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 8.0), (8, 3.0)])
def test_peft_parity_outputs_and_grads(rank, alpha, dora):
    pm, ours = peft_pair(rank, alpha, dora)
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 9, 8)
    y_ref, gx_ref = run(pm, x, g)
    y, gx = run(ours, x, g)
    assert maxdiff(y, y_ref) < 3e-6, f"output max diff {maxdiff(y, y_ref)}"  # measured 7.2e-7 (2-core x86 VM)
    assert maxdiff(gx, gx_ref) < 4e-6, f"input grad max diff {maxdiff(gx, gx_ref)}"  # measured 1.3e-6
    ref = adapter_grads_peft(pm)
    got = adapter_grads_ours(ours)
    assert set(got) == set(ref) and len(ref) == len(TARGETS) * (3 if dora else 2), sorted(set(got) ^ set(ref))
    for k in ref:
        d = maxdiff(got[k].flatten(), ref[k].flatten())
        assert d < 1e-5, f"{k}: grad max diff {d}"  # measured 2.9e-6


@pytest.mark.parametrize("dora", [False, True])
def test_peft_parity_with_dropout_in_training(dora):
    """Same seed, same dropout masks: PEFT and we draw one input-dropout mask per layer in the same order."""
    pm, ours = peft_pair(4, 4.0, dora, dropout=0.3)
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 9, 8)
    torch.manual_seed(123)
    y_ref, gx_ref = run(pm, x, g)
    torch.manual_seed(123)
    y, gx = run(ours, x, g)
    assert maxdiff(y, y_ref) < 3e-6 and maxdiff(gx, gx_ref) < 3e-6, (maxdiff(y, y_ref), maxdiff(gx, gx_ref))  # 8.3e-7
    ref, got = adapter_grads_peft(pm), adapter_grads_ours(ours)
    for k in ref:
        assert maxdiff(got[k].flatten(), ref[k].flatten()) < 1e-5, k  # measured 4.0e-6
    ours.eval()  # dropout off in eval: equal to the no-dropout forward
    assert torch.equal(ours(x), ours(x))


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_up_is_exactly_base(kind, init):
    base = randomize(Toy(), std=0.3)
    ours = copy.deepcopy(base)
    adapters.inject(ours, kind, TARGETS, rank=4, alpha=2, conv_rank=4, init=init)
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(ours(x), base(x))
    downs = [layer.lora_down.weight for _, layer in adapters.adapter_layers(ours)]
    assert all(d.abs().sum() > 0 for d in downs)  # down is initialised, up is zero


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_merge_equals_unmerged_and_unmerge_restores(dora, multiplier):
    pm, ours = peft_pair(4, 8.0, dora)
    ours.eval()
    adapters.set_scale(ours, multiplier)
    x = torch.randn(2, 4, 6, 6)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y = ours(x)
    adapters.merge(ours)
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(p + ".weight" for p in TARGETS)
    assert maxdiff(ours(x), y) < 6e-6, maxdiff(ours(x), y)  # measured 1.9e-6
    adapters.unmerge(ours)
    for k, v in ours.state_dict().items():
        assert maxdiff(v, before[k]) < 4e-7, f"{k}: {maxdiff(v, before[k])}"  # measured 1.2e-7
    assert maxdiff(ours(x), y) < 3e-6  # measured 9.5e-7


@pytest.mark.parametrize("dora", [False, True])
def test_multiplier(dora):
    base = randomize(Toy(), std=0.3)
    pm, ours = peft_pair(4, 8.0, dora)
    ours.eval()
    x = torch.randn(2, 4, 6, 6)
    full = ours(x)
    adapters.set_scale(ours, 0.0)
    if not dora:
        assert torch.equal(ours(x), base(x))  # strength 0 is the base
    else:  # DoRA at strength 0 keeps its magnitude, dora_scale ⊙ W / ‖W‖ (PEFT's; test_dora_strength_is_peft)
        assert maxdiff(ours(x), base(x)) > 1e-2
    if not dora:  # LoRA: strength m scales the delta of every layer; one layer alone makes this exact
        layer = ours.to_out[0]
        t = torch.randn(3, 12)
        layer.set_scale(1.0)
        d1 = layer(t) - F.linear(t, layer.weight)
        layer.set_scale(2.5)
        assert maxdiff(layer(t) - F.linear(t, layer.weight), 2.5 * d1) < 1e-6  # measured 3.6e-7
    adapters.set_scale(ours, 1.0)
    adapters.merge(ours)
    adapters.set_scale(ours, 1.0)  # re-merge path
    assert maxdiff(ours(x), full) < 8e-6  # measured 2.6e-6


def _peft_scale(pm, m):
    """PEFT's strength m on every LoRA layer (`scale_layer`, what diffusers' fuse_lora(lora_scale=m) calls)."""
    from peft.tuners.lora import LoraLayer
    for mod in pm.modules():
        if isinstance(mod, LoraLayer):
            mod.scale_layer(m)


@pytest.mark.parametrize("m", [0.3, 1.7, -0.6, 0.0])
def test_dora_strength_is_peft(m):
    """DoRA at strength m equals PEFT's DoRA with its scaling multiplied by m - W' = g ⊙ (W + m ΔW),
    g = magnitude / ‖W + m ΔW‖ - in the forward (adapter beside W) and merged, Linear and conv layers alike.
    The blend
    ComfyUI and A1111 use, W + m (W'(1) − W), is measurably another thing (printed; README "DoRA at strength λ")."""
    pm, ours = peft_pair(4, 8.0, dora=True)
    pm.eval()
    ours.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        base = pm.get_base_model()
        _peft_scale(pm, m)
        ref = pm(x)
        adapters.set_scale(ours, m)
        got = ours(x)
        assert maxdiff(got, ref) < 4e-6, maxdiff(got, ref)  # measured 4.5e-7 - 1.3e-6
        print(f"m={m}: output vs PEFT {maxdiff(got, ref):.1e}")
        layers = dict(adapters.adapter_layers(ours))
        w_ours = {p: layers[p].weight.detach().clone() + layers[p].weight_delta() for p in TARGETS}
        w_blend = {p: layers[p].weight + m * (layers[p].dora_scale * (layers[p].weight + layers[p].delta_weight())
                                              / (layers[p].weight + layers[p].delta_weight()).flatten(1).norm(dim=1)
                                              .reshape(layers[p].dora_scale.shape) - layers[p].weight)
                   for p in TARGETS}
        pm.merge_adapter()
        for p in TARGETS:
            w_ref = base.get_submodule(p).get_base_layer().weight if hasattr(base.get_submodule(p), "get_base_layer") \
                else base.get_submodule(p).weight
            d = maxdiff(w_ours[p], w_ref)
            assert d < 1e-6, (p, d)  # measured <= 3.6e-7
            rel = ((w_blend[p] - w_ref).norm() / (w_ref - layers[p].weight).norm()).item()
            print(f"  {p}: merged weight vs PEFT {d:.1e}; blend's update off PEFT's by {rel:.1%}")
            if m not in (0.0, 1.0):
                assert rel > 1e-3, (p, rel)


def test_rank_and_module_dropout():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = LoRALinear(lin, rank=1, alpha=1, rank_dropout=0.5)
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(64, 5, 16)
    base = lin(x)
    layer.eval()
    d_eval = layer(x) - base
    layer.train()
    d = layer(x) - base
    # rank 1, p = 0.5: per sample the delta is either dropped (0) or kept and rescaled by 1/(1-p) = 2
    dropped = d.abs().amax((1, 2)) == 0
    assert 0 < dropped.sum() < 64
    assert maxdiff(d[~dropped], 2 * d_eval[~dropped]) < 1e-6  # measured 2.4e-7
    layer = LoRALinear(lin, rank=2, module_dropout=1.0)
    nn.init.normal_(layer.lora_up.weight)
    assert torch.equal(layer(x), base)  # training: the whole adapter skipped
    layer.eval()
    assert not torch.equal(layer(x), base)  # eval: never skipped


def test_lora_forward_does_not_build_delta_weight():
    """x -> down -> up: the FLOPs are the base matmul plus the two thin ones, never B @ A ([out, r] x [r, in])."""
    from torch.utils.flop_counter import FlopCounterMode
    layer = LoRALinear(nn.Linear(64, 64, bias=False), rank=4)
    x = torch.randn(2, 64)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    assert fc.get_total_flops() == 2 * 2 * 64 * 64 + 2 * 2 * 4 * (64 + 64)


def test_low_precision_base_keeps_fp32_adapter():
    """Trainable adapter params stay fp32 on a bf16 base (AMP can unscale their grads), output stays bf16."""
    lin = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(lin, rank=2)
    nn.init.normal_(layer.lora_up.weight)
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.lora_up.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_up.weight.grad.dtype == torch.float32 and layer.weight.grad is None


def test_adapted_layer_keeps_base_names_and_parameters():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = LoRAConv2d(conv, rank=2, dora=True)
    assert layer.weight is conv.weight and layer.bias is conv.bias  # shared, not copied
    assert set(layer.state_dict()) == {"weight", "bias", "lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    assert layer.lora_down.weight.shape == (2, 3, 3, 3) and layer.lora_up.weight.shape == (5, 2, 1, 1)
    assert layer.dora_scale.shape == (5, 1, 1, 1) and layer.alpha.shape == ()
    assert isinstance(layer, nn.Conv2d) and isinstance(layer.to_base(), nn.Conv2d)
    assert type(layer.to_base()) is nn.Conv2d and layer.to_base().weight is conv.weight


def test_dora_eval_norm_cache_follows_updates():
    layer = LoRALinear(nn.Linear(16, 8), rank=2, dora=True).eval()
    x = torch.randn(3, 16)
    layer(x)
    with torch.no_grad():
        layer.lora_up.weight.normal_()  # an in-place update (optimizer step, load_state_dict) invalidates the cache
    fresh = torch.linalg.vector_norm(layer.weight + layer.delta_weight(), dim=1)
    assert maxdiff(layer.weight_norm(), fresh) < 2e-7  # measured 6.0e-8
    y = layer(x)
    ref = F.linear(x, layer.dora_scale * (layer.weight + layer.delta_weight()) / fresh[:, None], layer.bias)
    assert maxdiff(y, ref) < 1e-6  # measured 2.4e-7
