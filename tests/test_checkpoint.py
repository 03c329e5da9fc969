"""Gradient checkpointing (minisd/checkpoint.py): identical gradients with and without it — with dropout (RNG replay),
for a frozen base with LoRA-only trainable weights and inputs that do not require grad (the "trains nothing" bug),
with keyword tensors, tuples and autocast — and fewer saved activations, counted with saved_tensors_hooks."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from minisd import adapters
from minisd.perf.checkpoint import checkpoint


class Block(nn.Module):
    """A transformer-ish MLP block with dropout and an optional context input."""

    def __init__(self, dim=32, p=0.3):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.to_k = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        h = self.fc2(self.drop(torch.nn.functional.gelu(self.fc1(x))))
        if context is not None:
            h = h + self.to_k(context).mean(1, keepdim=True)
        return x + self.drop(h)


def grads(model, *tensors):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None] + [t.grad.clone() for t in tensors]


def test_dropout_block_identical_grads():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(4, 7, 32)
    results = []
    for use_ckpt in (False, True):
        m = copy.deepcopy(block)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(42)
        y = checkpoint(m, xi) if use_ckpt else m(xi)
        y.square().sum().backward()
        after = torch.rand(3)  # the global RNG continues as if no recompute had happened
        results.append((y.detach(), grads(m, xi), after))
    (y0, g0, r0), (y1, g1, r1) = results
    assert torch.equal(y0, y1) and torch.equal(r0, r1)
    assert len(g0) == len(g1) == 5  # fc1, fc2 weights and biases + the input (to_k unused without context)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b), (a - b).abs().max().item()
    # without replaying the RNG the recompute draws other masks and the gradients are wrong: the test can tell
    m = copy.deepcopy(block)
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(42)
    checkpoint(m, xi, preserve_rng_state=False).square().sum().backward()
    assert not all(torch.equal(a, b) for a, b in zip(grads(m, xi), g0))


def lora_block():
    torch.manual_seed(0)
    block = Block(p=0.0).requires_grad_(False)  # frozen base
    adapters.inject(block, "lora", ["fc1", "fc2", "to_k"], rank=4)
    with torch.no_grad():
        for p in adapters.adapter_parameters(block):
            p.normal_(0, 0.1)
    return block


def test_frozen_base_lora_only_inputs_without_grad():
    block = lora_block()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 32)  # neither requires grad: latents and frozen-TE output
    out = {}
    for mode in ("plain", "ours", "torch_reentrant"):
        m = copy.deepcopy(block)
        if mode == "plain":
            y = m(x, context=ctx)
        elif mode == "ours":
            y = checkpoint(m, x, context=ctx)
        else:
            with pytest.warns(UserWarning, match="requires_grad"):
                y = torch_checkpoint.checkpoint(m, x, ctx, use_reentrant=True)
        if y.requires_grad:
            y.square().sum().backward()
        out[mode] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert len(out["plain"]) == 6
    for n, g in out["plain"].items():
        assert g is not None and g.abs().sum() > 0, n
        assert torch.equal(out["ours"][n], g), (n, (out["ours"][n] - g).abs().max().item())
    # the classic bug this guards against: a reentrant checkpoint with frozen inputs leaves LoRA without gradients
    assert all(g is None for g in out["torch_reentrant"].values())


def test_keyword_tensor_and_input_gradients():
    block = lora_block()
    x = torch.randn(2, 5, 32, requires_grad=True)
    ctx = torch.randn(2, 3, 32, requires_grad=True)  # e.g. text-encoder output while training the TE
    ref_block = copy.deepcopy(block)
    ref_block(x, context=ctx).square().sum().backward()
    ref = grads(ref_block, x, ctx)
    x.grad = ctx.grad = None
    checkpoint(block, x, context=ctx).square().sum().backward()
    for a, b in zip(ref, grads(block, x, ctx)):
        assert torch.equal(a, b), (a - b).abs().max().item()


def test_tuple_outputs_non_tensor_args_and_nesting():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def two(x, scale, flag):
        h = torch.tanh(lin1(x)) * scale
        return (h, lin2(h)) if flag else (h,)

    def nested(x):
        a, b = checkpoint(two, x, 0.5, True)
        return checkpoint(lambda t: torch.sin(t), a + b)
    x = torch.randn(3, 8, requires_grad=True)
    a, b = two(x, 0.5, True)
    torch.sin(a + b).sum().backward()
    ref = grads(lin1, x) + grads(lin2)
    for m in (lin1, lin2):
        m.zero_grad()
    x.grad = None
    nested(x).sum().backward()
    for r, g in zip(ref, grads(lin1, x) + grads(lin2)):
        assert torch.allclose(r, g, atol=1e-7)
    with torch.no_grad():  # outside grad mode: a plain call
        assert checkpoint(two, x, 0.5, False)[0].grad_fn is None


def test_autocast_is_replayed():
    """Backward runs outside the autocast region; the recompute must still run in bf16 like the forward did."""
    block = lora_block()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    res = []
    for use_ckpt in (False, True):
        m = copy.deepcopy(block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint(m, x, context=ctx) if use_ckpt else m(x, context=ctx)
        y.float().square().sum().backward()
        res.append([p.grad for p in adapters.adapter_parameters(m)])
    m = copy.deepcopy(block)
    m(x, context=ctx).square().sum().backward()
    fp32 = [p.grad for p in adapters.adapter_parameters(m)]
    assert not all(torch.equal(a, b) for a, b in zip(res[0], fp32))  # autocast did change the numbers
    for a, b in zip(*res):
        assert torch.equal(a, b), (a - b).abs().max().item()


def saved_activation_bytes(fn, model, x):
    """Bytes of tensors autograd keeps for backward, parameters excluded (each storage counted once)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return sum(seen.values()), y


def test_fewer_saved_activations():
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(p=0.1) for _ in range(4)])
    x = torch.randn(8, 16, 32, requires_grad=True)
    plain, y0 = saved_activation_bytes(model, model, x)
    ckpt, y1 = saved_activation_bytes(lambda t: [t := checkpoint(b, t) for b in model][-1], model, x)
    x_bytes = x.numel() * 4
    # checkpointed: each block keeps only its input (4 inputs of x's size); plain keeps fc1 outputs, masks, GELU, ...
    assert ckpt <= 4 * x_bytes, (ckpt, x_bytes)
    assert plain > 8 * ckpt, (plain, ckpt)
    y1.sum().backward()  # and the checkpointed graph still works
    assert x.grad is not None and x.grad.abs().sum() > 0
