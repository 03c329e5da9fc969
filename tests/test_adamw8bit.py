"""8-bit AdamW (minisd/adamw8bit.py): tracks torch.optim.AdamW, ≤ 2.1 bytes/parameter of state for large tensors,
exact fp32 path for small ones, quantizer accuracy, and an exact state_dict round trip (resume bit for bit)."""
import copy

import torch
import torch.nn as nn

from minisd.adamw8bit import AdamW8bit, dequantize, quantize

# Relative tracking tolerance: ‖θ_8bit - θ_fp32‖ / ‖θ_fp32 - θ_0‖ per large tensor after 200 steps (measured ≈ 0.02).
REL_TOL = 0.05


def problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    x = torch.randn(512, 32)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.1 * torch.randn(512, 1)
    return net, x, y


def train(net, x, y, opt, steps, seed=1, start=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for i in range(start + steps):
        idx = torch.randint(0, 512, (64,), generator=g)  # same batches for every optimizer
        if i < start:
            continue
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def test_tracks_torch_adamw():
    net, x, y = problem()
    ref, ours = copy.deepcopy(net), copy.deepcopy(net)
    l_ref = train(ref, x, y, torch.optim.AdamW(ref.parameters(), **HP), 200)
    l_8 = train(ours, x, y, AdamW8bit(ours.parameters(), **HP), 200)
    for (name, p0), p_ref, p8 in zip(net.named_parameters(), ref.parameters(), ours.parameters()):
        rel = ((p8 - p_ref).norm() / (p_ref - p0).norm()).item()
        assert rel < REL_TOL, f"{name}: relative parameter error {rel:.4f} (tolerance {REL_TOL})"
    # the loss goes down as much: halves over the run, last-20-step mean within 2 % of AdamW's, final full batch too
    assert sum(l_8[-20:]) < 0.5 * sum(l_8[:20])
    assert abs(sum(l_8[-20:]) - sum(l_ref[-20:])) < 0.02 * sum(l_ref[-20:])
    full_ref, full_8 = ((ref(x) - y) ** 2).mean().item(), ((ours(x) - y) ** 2).mean().item()
    assert abs(full_8 - full_ref) / full_ref < 0.02, (full_8, full_ref)


def test_small_tensors_are_exact_fp32_adamw():
    """Below min_8bit_size the state is fp32 and the update is torch's, op for op: bitwise equal parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))  # 544 and 33 values: all fp32 state
    x, y = torch.randn(512, 16), torch.randn(512, 1)
    ref, ours = copy.deepcopy(net), copy.deepcopy(net)
    train(ref, x, y, torch.optim.AdamW(ref.parameters(), **HP), 50)
    train(ours, x, y, AdamW8bit(ours.parameters(), **HP), 50)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b), (a - b).abs().max().item()


def test_state_bytes_per_parameter():
    p = nn.Parameter(torch.randn(1000, 1000))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))
    assert nbytes == opt.state_bytes()
    assert nbytes / p.numel() <= 2.1, nbytes / p.numel()  # 2 codes + 2 scales per 256 values = 2.03
    assert opt.state[p]["m_code"].dtype == torch.int8 and opt.state[p]["v_code"].dtype == torch.uint8


def test_quantizer_grid():
    torch.manual_seed(0)
    # values over many decades inside one block, as moments are
    x = torch.randn(4096) * torch.logspace(-6, 0, 4096)[torch.randperm(4096)]
    for signed in (True, False):
        v = x if signed else x.abs()
        code, absmax = quantize(v, signed)
        back = dequantize(code, absmax, v.shape, signed)
        assert absmax.numel() == 16 and code.numel() == 4096
        blk = absmax.repeat_interleave(256)
        unit_err = ((back - v).abs() / blk).max().item()
        assert unit_err < (1.0 / 127 if signed else 2.0 / 255), unit_err  # at most one code step at the top
        # no large value collapses to zero; small ones keep their sign or vanish, never flip
        assert (back[v.abs() > 1e-3 * blk] != 0).all()
        assert ((back * v) >= 0).all()
    # zero blocks and a ragged tail round-trip
    z = torch.zeros(300)
    code, absmax = quantize(z, True)
    assert torch.equal(dequantize(code, absmax, z.shape, True), z)


def test_state_dict_roundtrip_resumes_exactly():
    net, x, y = problem()
    a = copy.deepcopy(net)
    opt_a = AdamW8bit(a.parameters(), **HP)
    train(a, x, y, opt_a, 30)
    sd = copy.deepcopy(opt_a.state_dict())
    b = copy.deepcopy(a)
    opt_b = AdamW8bit(b.parameters(), **HP)
    opt_b.load_state_dict(sd)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 30
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    train(a, x, y, opt_a, 20, start=30)
    train(b, x, y, opt_b, 20, start=30)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bf16_parameters():
    p = nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    opt = AdamW8bit([p], lr=1e-2)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = AdamW8bit([p], lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[p]["m_absmax"].dtype == torch.float32  # torch would have cast it to bf16
