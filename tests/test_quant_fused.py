"""The 8-bit base's dequantisation in one compiled kernel (minisd/perf/quant.py, `compile_dequant`): forced onto the
CPU (Inductor's C++ backend), it gives the eager path's bits and the by-hand value (code · scale exact in float64,
rounded to fp32 and then to the target dtype, as the eager ops round), for int8 and fp8, 2-D and 4-D codes, bf16 and
fp32; a training step through it (gradient checkpointing's recompute, `_QuantOp.backward`, DoRA's read of `weight`)
has the eager step's gradients bit for bit and compiles nothing after its first call (what a CUDA-graph capture
after the warm-up steps needs)."""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minisd import adapters  # noqa: E402
from minisd.formats import load_model  # noqa: E402
from minisd.perf import quant  # noqa: E402
from minisd.perf.checkpoint import set_gradient_checkpointing  # noqa: E402
from minisd.trainer import TARGETS  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def compiled(monkeypatch):
    """Run `dequantize_weight` through torch.compile (the CUDA default) on the CPU for one test."""
    monkeypatch.setattr(quant, "compile_dequant", True)


def graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_compiled_dequant_is_the_eager_and_the_hand_value(kind, monkeypatch):
    g = torch.Generator().manual_seed(3)
    differs = 0
    for shape in ((7, 13), (5, 3, 3, 3), (6, 4, 1, 1)):
        # rows of very different size (scales from 1e-3 to 40) so that a scale applied to the wrong row fails
        w = torch.randn(shape, generator=g) * torch.logspace(-3, 1.6, shape[0]).view(-1, *[1] * (len(shape) - 1))
        q, s = quant.quantize_weight(w, kind)
        for dtype in (torch.bfloat16, torch.float32):
            monkeypatch.setattr(quant, "compile_dequant", False)
            eager = quant.dequantize_weight(q, s, dtype)
            monkeypatch.setattr(quant, "compile_dequant", True)
            fused = quant.dequantize_weight(q, s, dtype)
            # by hand: the product of an 8-bit code (<= 4 significant bits for e4m3, 7 for int8) and an fp32 scale
            # (24) is exact in float64 (53); the eager ops round it to fp32 (the multiply) and then to dtype
            exact = q.double() * s.double().view(-1, *[1] * (q.ndim - 1))
            hand = exact.float().to(dtype)
            assert fused.dtype == dtype and fused.shape == q.shape
            assert torch.equal(fused, eager) and torch.equal(fused, hand), (shape, dtype)
            for idx in ((0,) * q.ndim, tuple(d // 2 for d in shape), tuple(d - 1 for d in shape)):
                value = float(q[idx].float()) * float(s[idx[0]])  # Python float: a double
                assert fused[idx].item() == torch.tensor(value).to(dtype).item(), (shape, dtype, idx)
            if dtype == torch.bfloat16:  # what the docstring rules out: codes and scale in bf16, product in bf16
                twice = q.to(torch.bfloat16) * s.to(torch.bfloat16).view(-1, *[1] * (q.ndim - 1))
                differs += (twice != eager).sum().item()
    assert differs > 0  # rounding twice is another number: the by-hand value above could tell them apart


def test_compiled_dequant_after_to_and_through_the_weight_property(compiled):
    layer = nn.Conv2d(3, 5, 3)
    quant.quantize_module(layer, "fp8")
    layer.to(torch.bfloat16)  # a pipeline's cast: the target dtype changes, the codes stay fp8
    assert layer.weight_q.dtype == quant.FP8 and layer.weight.dtype == torch.bfloat16
    ref = (layer.weight_q.float() * layer.weight_scale.view(-1, 1, 1, 1)).to(torch.bfloat16)
    assert torch.equal(layer.weight, ref)


def _tiny_unet(network: str):
    torch.manual_seed(0)
    m = load_model("tiny-random")
    m.requires_grad_(False)
    m.unet.to(torch.bfloat16)
    layers = adapters.inject(m.unet, network, TARGETS["full"], rank=4, conv_rank=4)
    with torch.no_grad():  # B != 0, so the adapters' gradients depend on the base's activations
        for p in adapters.adapter_parameters(m.unet):
            p.add_(0.01)
    quant.quantize_frozen(m.unet, "int8")
    set_gradient_checkpointing(m.unet, True)
    for p in adapters.adapter_parameters(m.unet):
        p.data = p.data.float()
        p.requires_grad_(True)
    return m, layers


def _step(m) -> list[torch.Tensor]:
    """Forward under bf16 autocast (checkpointed: recomputed in the backward), backward; the adapters' gradients."""
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
    ctx = torch.randn(2, 77, m.cfg.unet.context_dim, generator=g)
    x.requires_grad_(True)  # checkpointing recomputes only when some input needs a gradient
    params = adapters.adapter_parameters(m.unet)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.unet(x, t, ctx).float()
    (y * torch.linspace(-1, 2, y.numel()).view(y.shape)).sum().backward()
    return [p.grad.clone() for p in params]


def test_training_step_on_the_compiled_dequant_equals_eager_and_compiles_only_in_its_first_call(monkeypatch):
    m, _ = _tiny_unet("dora")  # DoRA reads `weight` for its norm: the property goes through the same function
    calls = []
    real = quant.dequantize_weight
    monkeypatch.setattr(quant, "dequantize_weight", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(quant, "compile_dequant", False)
    eager = _step(m)
    n_eager = len(calls)
    monkeypatch.setattr(quant, "compile_dequant", True)
    first = _step(m)
    before = graphs()
    second = _step(m)
    # forward, the checkpoint's recompute, the backward and DoRA's norm each dequantise
    layers = sum(isinstance(x, quant.QuantizedBase) for x in m.unet.modules())
    print(f"{layers} quantized layers, {n_eager} dequantisations per step, {graphs()} Dynamo graphs in this process")
    assert n_eager >= 3 * layers, (n_eager, layers)
    assert graphs() == before, "the second step compiled again: a CUDA-graph capture after warm-up would too"
    for a, b, c in zip(eager, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(gr.abs().sum() > 0 for gr in eager)


def test_inside_an_outer_compile_the_plain_ops_are_traced(monkeypatch):
    """train.py --compile compiles whole blocks: there `dequantize_weight` is traced as its three ops (fused by that
    graph), never a call of the separately compiled function; output and input gradient as eager, bit for bit."""
    torch.manual_seed(5)
    layer = nn.Linear(12, 7)
    quant.quantize_module(layer, "int8")
    x = torch.randn(3, 12, requires_grad=True)
    y0 = layer(x)
    y0.sum().backward()
    g0, x.grad = x.grad.clone(), None
    monkeypatch.setattr(quant, "compile_dequant", True)
    monkeypatch.setattr(quant, "_compiled", lambda: pytest.fail("the nested compiled function was called"))
    y1 = torch.compile(layer, fullgraph=True)(x)
    y1.sum().backward()
    assert torch.equal(y0, y1) and torch.equal(g0, x.grad)


def test_the_cpu_default_is_eager():
    """compile_dequant = None (the default): compiled on CUDA with Triton only; CPU codes take the eager ops."""
    assert quant.compile_dequant is None
    assert not quant._use_compiled(torch.zeros(2, 3, dtype=torch.int8))
    assert not quant._use_compiled(torch.zeros(2, 3, dtype=quant.FP8))
