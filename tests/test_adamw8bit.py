"""8-bit AdamW (minisd/adamw8bit.py): tracks torch.optim.AdamW, ≤ 2.1 bytes/parameter of state for large tensors,
exact fp32 path for small ones, quantizer accuracy, and an exact state_dict round trip (resume bit for bit). The fused
path (tensors packed into flat chunks): run without torch.compile it equals the eager path bit for bit, over chunks of
several tensors, ragged, channels-last, bf16 and fp32-state tensors; its per-parameter state views save, load, re-pack
and move between the paths exactly; compiled (Inductor's C++ backend on the CPU, Triton on a GPU) it agrees to
rounding, compiles one graph for all chunk sizes and none when lr changes."""
import copy
import io
import time

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from minisd.train.adamw8bit import AdamW8bit, dequantize, quantize

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


@pytest.mark.parametrize("fused", [False, True])
def test_small_tensors_are_exact_fp32_adamw(fused):
    """Below min_8bit_size the state is fp32 and the update is torch's, op for op: bitwise equal parameters (fused:
    the same ops as torch._foreach_* over all small tensors, which on the CPU loop over the same kernels)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))  # 544 and 33 values: all fp32 state
    x, y = torch.randn(512, 16), torch.randn(512, 1)
    ref, ours = copy.deepcopy(net), copy.deepcopy(net)
    train(ref, x, y, torch.optim.AdamW(ref.parameters(), **HP), 50)
    train(ours, x, y, AdamW8bit(ours.parameters(), **HP, fused=fused), 50)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b), (a - b).abs().max().item()


def test_state_bytes_per_parameter():
    p = nn.Parameter(torch.randn(1000, 1000))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))
    # state_bytes counts the storages, which may hold the last block's padding (< 256 bytes per code tensor)
    assert nbytes <= opt.state_bytes() <= nbytes + 2 * 256
    assert opt.state_bytes() / p.numel() <= 2.1, opt.state_bytes() / p.numel()  # 2 codes + 2 scales per 256 values = 2.03
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


def assert_same_state(opt_a, opt_b, params_a, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_fused_function_equals_eager_path():
    """The fused path's function (update_8bit, run without torch.compile) and the foreach path of the small tensors
    do the eager path's ops in the same order with the same fp32 scalars: 100 training steps bit for bit, states
    included (so a state_dict moves between the paths)."""
    net, x, y = problem()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = AdamW8bit(a.parameters(), **HP, fused=False)
    opt_b = AdamW8bit(b.parameters(), **HP, fused=True)
    opt_b.compile_fused = False
    train(a, x, y, opt_a, 100)
    train(b, x, y, opt_b, 100)
    assert_same_state(opt_a, opt_b, list(a.parameters()), list(b.parameters()))


def mixed_params():
    """Parameters of every kind the fused path sorts: 8-bit fp32 tensors with ragged last blocks (7623 and 5000
    values), a multiple of the block, a channels-last 4D tensor, fp32-state tensors (300, and 4095 < min_8bit_size) and
    a bf16 tensor (12900 values, ragged). With chunk_size 16384 the fp32 8-bit tensors form three chunks: the two
    ragged ones together (7680 + 5120 padded values), 64x128 alone (adding it would pass 16384), and the
    channels-last one (18432 values, larger than a chunk) on its own; the bf16 one is a chunk of its own dtype."""
    torch.manual_seed(0)
    return [torch.randn(77, 99), torch.randn(5000), torch.randn(64, 128),
            torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last), torch.randn(300), torch.randn(4095),
            torch.randn(129, 100).bfloat16()]


def set_grads(params, i, skip=()):
    """Seeded gradients of step i, in each parameter's dtype and memory format; parameters at `skip` get none."""
    g = torch.Generator().manual_seed(1000 + i)
    for k, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g) * (1 + i % 3)
        p.grad = None if k in skip else torch.empty_like(p.detach()).copy_(grad)


def run_steps(params, opt, start, stop, skip_odd=()):
    """Steps start..stop-1 with set_grads and lr decaying linearly over 100 steps; on odd steps the parameters at
    `skip_odd` have no gradient (the bucket of 8-bit parameters, hence the chunk layout, changes every step)."""
    for i in range(start, stop):
        set_grads(params, i, skip_odd if i % 2 else ())
        opt.param_groups[0]["lr"] = 1e-2 * (1 - i / 100)
        opt.step()


def fused_opt(params, chunk_size=16384):
    opt = AdamW8bit(params, lr=1e-2, fused=True)
    opt.compile_fused = False
    opt.chunk_size = chunk_size
    return opt


def code_storages(opt):
    """Distinct storages of the m_code entries: the number of chunks on the fused path."""
    return {s["m_code"].untyped_storage().data_ptr() for s in opt.state.values() if "m_code" in s}


def test_chunked_fused_path_equals_eager_path():
    """The chunked fused path (update_8bit over flat chunks, not compiled) equals the eager per-tensor path bit for
    bit on mixed_params over 20 steps with a changing lr: the padding keeps each tensor's blocks its own."""
    p0 = mixed_params()
    eager = [nn.Parameter(q.clone()) for q in p0]
    fused = [nn.Parameter(q.clone()) for q in p0]
    opt_e = AdamW8bit(eager, lr=1e-2, fused=False)
    opt_f = fused_opt(fused)
    run_steps(eager, opt_e, 0, 20)
    run_steps(fused, opt_f, 0, 20)
    assert len(code_storages(opt_f)) == 4  # three fp32 chunks, one bf16
    assert "exp_avg" in opt_f.state[fused[5]] and "m_code" in opt_f.state[fused[1]]
    assert fused[3].is_contiguous(memory_format=torch.channels_last) and fused[6].dtype == torch.bfloat16
    assert_same_state(opt_e, opt_f, eager, fused)


def test_chunked_state_dict_views_save_and_repack():
    """Per-parameter state entries are views of the chunk buffers with one tensor's shapes; torch.save writes each
    buffer once; a loaded state (cloned per parameter) is re-packed at the next step and resumes bit for bit."""
    p0 = mixed_params()
    a = [nn.Parameter(q.clone()) for q in p0]
    opt_a = fused_opt(a)
    run_steps(a, opt_a, 0, 10)
    for p in a:
        s = opt_a.state[p]
        if "m_code" in s:
            blocks = -(-p.numel() // 256)
            assert s["m_code"].shape == s["v_code"].shape == (p.numel(),)
            assert s["m_absmax"].shape == s["v_absmax"].shape == (blocks,)
            assert (s["m_code"].dtype, s["v_code"].dtype, s["m_absmax"].dtype) == (torch.int8, torch.uint8,
                                                                                    torch.float32)
    large = sum(p.numel() for p in a if "m_code" in opt_a.state[p])
    small = sum(p.numel() for p in a if "m_code" not in opt_a.state[p])
    assert (opt_a.state_bytes() - 8 * small) / large <= 2.1
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    assert buf.tell() < opt_a.state_bytes() + 64 * 1024  # each buffer once (plus pickle overhead), not per view
    buf.seek(0)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_b = fused_opt(b)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert len(code_storages(opt_b)) == 5  # after loading: one clone per 8-bit parameter
    assert_same_state(opt_a, opt_b, a, b)
    run_steps(a, opt_a, 10, 20)
    run_steps(b, opt_b, 10, 20)
    assert len(code_storages(opt_b)) == 4  # re-packed into chunks
    assert_same_state(opt_a, opt_b, a, b)


@pytest.mark.parametrize("first", ["fused", "eager"])
def test_state_moves_between_fused_and_eager_paths(first):
    """10 steps on one path, the state_dict loaded into an optimizer of the other path, 10 more steps: equal to 20
    eager steps bit for bit. Then one optimizer switching path every step, with two 8-bit parameters (one in the
    multi-tensor chunk) and one fp32-state parameter lacking a gradient every other step: still equal."""
    p0 = mixed_params()
    ref = [nn.Parameter(q.clone()) for q in p0]
    opt_ref = AdamW8bit(ref, lr=1e-2, fused=False)
    run_steps(ref, opt_ref, 0, 20)

    x = [nn.Parameter(q.clone()) for q in p0]
    opt_1 = fused_opt(x) if first == "fused" else AdamW8bit(x, lr=1e-2, fused=False)
    run_steps(x, opt_1, 0, 10)
    opt_2 = AdamW8bit(x, lr=1e-2, fused=False) if first == "fused" else fused_opt(x)
    opt_2.load_state_dict(copy.deepcopy(opt_1.state_dict()))
    run_steps(x, opt_2, 10, 20)
    assert_same_state(opt_ref, opt_2, ref, x)

    skip = (1, 2, 5)
    ref = [nn.Parameter(q.clone()) for q in p0]
    opt_ref = AdamW8bit(ref, lr=1e-2, fused=False)
    y = [nn.Parameter(q.clone()) for q in p0]
    opt_y = fused_opt(y)
    for i in range(12):
        opt_y.fused = (i % 3 != 0) == (first == "fused")
        run_steps(ref, opt_ref, i, i + 1, skip)
        run_steps(y, opt_y, i, i + 1, skip)
    assert_same_state(opt_ref, opt_y, ref, y)


def fixed_gradient_run(params, opt, steps, seed=1):
    """`steps` steps with gradients drawn from a seeded generator (not from the parameters, so rounding differences
    do not feed back into the gradients) and lr decaying linearly each step (as a scheduler would set it)."""
    g = torch.Generator().manual_seed(seed)
    lr0 = opt.param_groups[0]["lr"]
    graphs = []
    for i in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * (1 + i % 3)).to(p.device, p.dtype)
        opt.param_groups[0]["lr"] = lr0 * (1 - i / steps)
        opt.step()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


def assert_fused_close(eager_params, fused_params, opt_e, opt_f, p0, code_tol: float = 5e-3, absmax_rtol: float = 1e-5):
    """Compiled kernels round like the eager ops up to an ulp (Inductor may reassociate, contract a*b+c into an FMA,
    use its own pow/sqrt), so now and then a value at a rounding boundary of the 8-bit grid lands on the neighbouring
    code: that element's moment then differs by one code step and its update by a fraction of lr; the difference
    fades as the moment decays (m within ~1/(1 - β1) = 10 steps, v within ~1000). Measured on the CPU with fixed
    gradients: parameters ~1e-4 of the total update apart in norm after 30 and after 300 steps, ≤ 0.04 % of the v
    codes and ≤ 0.002 % of the m codes different after 300. Tolerances: 1e-3 of the update, 0.5 % of the codes,
    absmax within 1e-5 (relative). On CUDA (code_tol 2 %): Triton's libdevice pow / sqrt and ATen's CUDA ones
    differ by an ulp more often than the CPU kernels do; measured on an H100 after 300 steps: 0.74 % of one
    tensor's v codes one step apart, parameters still within the 1e-3 bound. A v code one step off at the top of
    its block moves that block's next absmax by up to one step of the v grid there, 1 - (254/255)⁴ = 1.6 % (seen on
    the H100: one block of 256x320's v_absmax beyond 1e-5), hence absmax_rtol 1.6e-2 on CUDA; the blocks whose
    absmax differs at all (beyond 1e-5) must still be under code_tol of them."""
    for pe, pf, q in zip(eager_params, fused_params, p0):
        rel = ((pf.float() - pe.float()).norm() / (pe.float() - q.float()).norm()).item()
        assert rel < 1e-3, f"{tuple(q.shape)}: fused vs eager relative parameter difference {rel:.2e}"
        se, sf = opt_e.state[pe], opt_f.state[pf]
        for k in se:
            if not torch.is_tensor(se[k]):
                assert se[k] == sf[k]
            elif k.endswith("_code"):
                assert se[k].dtype == sf[k].dtype
                frac = (se[k] != sf[k]).float().mean().item()
                assert frac < code_tol, f"{tuple(q.shape)} {k}: {frac:.2%} of the codes differ"
            else:
                torch.testing.assert_close(sf[k], se[k], rtol=absmax_rtol, atol=1e-7, msg=f"{tuple(q.shape)} {k}")
                off = ((sf[k] - se[k]).abs() > 1e-5 * se[k].abs() + 1e-7).float().mean().item()
                assert off < code_tol, f"{tuple(q.shape)} {k}: {off:.2%} of the scales differ beyond 1e-5"


def test_compiled_fused_path_on_cpu():
    """torch.compile'd for real (Inductor's C++ backend on this CPU): one graph for chunks of different sizes (with
    chunk_size 16384: 64x128 and the ragged 77x99 in one chunk of 15872 values, the channels-last tensor alone in one
    of 18432), none when lr changes; close to the eager path (see assert_fused_close). Compiling takes ~20 s on the
    2-core CI machine with a cold Inductor cache."""
    torch._dynamo.reset()  # no graph of an earlier test is reused; count this test's graphs from here
    base = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    p0 = [torch.randn(64, 128),                                              # 32 full blocks
          torch.randn(77, 99),                                               # 7623 values: a ragged last block
          torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last),   # not contiguous: goes through a copy
          torch.randn(300)]                                                  # small: fp32 state, foreach path
    eager = [nn.Parameter(q.clone()) for q in p0]
    fused = [nn.Parameter(q.clone()) for q in p0]
    opt_e = AdamW8bit(eager, lr=1e-2, fused=False)
    opt_f = AdamW8bit(fused, lr=1e-2, fused=True)
    opt_f.chunk_size = 16384
    fixed_gradient_run(eager, opt_e, 30)
    t0 = time.perf_counter()
    graphs = fixed_gradient_run(fused, opt_f, 30)
    print(f"30 fused steps incl. compile: {time.perf_counter() - t0:.1f} s")
    graphs = [n - base for n in graphs]
    assert graphs == [1] * 30, graphs  # compiled once at the first step, never again (lr changed every step)
    assert len(code_storages(opt_f)) == 2
    assert fused[2].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fused[3], eager[3])  # the foreach path is exact
    assert_fused_close(eager, fused, opt_e, opt_f, p0)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_fused_matches_eager_on_cuda():
    """On CUDA, fused=None picks the compiled path. (1) 300 steps with fixed gradients (no feedback) and a decaying
    lr, chunk_size 2¹⁵ (fp32 chunks: 256x320 alone, 77x99 + channels-last together; bf16: one): close to the eager
    CUDA path (assert_fused_close), one graph per parameter dtype, no recompilation. (2) 300
    training steps of the MLP, where rounding differences feed back through the gradients and grow (compiled on the
    CPU: 1.1 % apart after 300 steps, about half the 8-bit error against fp32 AdamW): fused within 3 % of eager, and
    tracking torch's AdamW by test_tracks_torch_adamw's criteria."""
    torch._dynamo.reset()
    base = counters["stats"]["unique_graphs"]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    p0 = [torch.randn(256, 320, device=dev), torch.randn(77, 99, device=dev),
          torch.randn(64, 32, 3, 3, device=dev).to(memory_format=torch.channels_last),
          torch.randn(300, device=dev), torch.randn(128, 128, device=dev).bfloat16()]
    eager = [nn.Parameter(q.clone()) for q in p0]
    fused = [nn.Parameter(q.clone()) for q in p0]
    opt_e = AdamW8bit(eager, lr=1e-2, fused=False)
    opt_f = AdamW8bit(fused, lr=1e-2)
    opt_f.chunk_size = 2 ** 15
    assert all(opt_f._use_fused(p) for p in fused)
    fixed_gradient_run(eager, opt_e, 300)
    graphs = [n - base for n in fixed_gradient_run(fused, opt_f, 300)]
    assert graphs == [2] * 300, graphs[:3]  # fp32 and bf16 parameters: two graphs, both at the first step
    assert len(code_storages(opt_f)) == 3
    assert fused[4].dtype == torch.bfloat16
    assert_fused_close(eager[:4], fused[:4], opt_e, opt_f, p0[:4], code_tol=2e-2, absmax_rtol=1.6e-2)
    # bf16: θ itself is rounded to bf16 (2⁻⁸ relative) every step, so an fp32 difference of an ulp at a bf16 rounding
    # boundary becomes one bf16 ulp that stays: compare in norm against the total update, at bf16 resolution
    rel = ((fused[4].float() - eager[4].float()).norm() / (eager[4].float() - p0[4].float()).norm()).item()
    assert rel < 1e-2, f"bf16 parameter: fused vs eager relative difference {rel:.2e}"

    net, x, y = problem()
    net, x, y = net.to(dev), x.to(dev), y.to(dev)
    ref, ours, eager8 = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    l_ref = train(ref, x, y, torch.optim.AdamW(ref.parameters(), **HP), 300)
    l_8 = train(ours, x, y, AdamW8bit(ours.parameters(), **HP), 300)
    train(eager8, x, y, AdamW8bit(eager8.parameters(), **HP, fused=False), 300)
    for (name, q), p_ref, p8, pe in zip(net.named_parameters(), ref.parameters(), ours.parameters(),
                                        eager8.parameters()):
        rel = ((p8 - p_ref).norm() / (p_ref - q).norm()).item()
        assert rel < REL_TOL, f"{name}: relative parameter error {rel:.4f} (tolerance {REL_TOL})"
        rel = ((p8 - pe).norm() / (pe - q).norm()).item()
        assert rel < 0.03, f"{name}: fused vs eager relative parameter difference {rel:.4f}"
    assert abs(sum(l_8[-20:]) - sum(l_ref[-20:])) < 0.02 * sum(l_ref[-20:])


@pytest.mark.gpu
def test_fused_state_bytes_per_parameter_on_cuda():
    p = nn.Parameter(torch.randn(1000, 1000, device="cuda"))
    opt = AdamW8bit([p])
    for lr in (1e-3, 5e-4):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[p]
    assert state["m_code"].dtype == torch.int8 and state["v_code"].dtype == torch.uint8 and state["step"] == 2
    assert opt.state_bytes() / p.numel() <= 2.1, opt.state_bytes() / p.numel()


@pytest.mark.gpu
def test_fused_sd15_parameter_set_on_cuda():
    """The SD1.5 UNet's parameter set (686 fp32 tensors, 860M values; bench/optim.py): one compiled graph for all of
    its chunks at the default chunk_size (31 chunks), none added over the later steps, and the chunk buffers still
    ≤ 2.1 bytes per 8-bit parameter. Prints ms/step (the benchmark proper is bench optim-sd15)."""
    from bench.optim import parameter_shapes
    torch._dynamo.reset()
    base = counters["stats"]["unique_graphs"]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    params = []
    for shape in parameter_shapes(tiny=False):
        p = torch.randn(shape, device=dev, generator=g).requires_grad_(True)
        p.grad = torch.randn(shape, device=dev, generator=g) * 1e-3
        params.append(p)
    opt = AdamW8bit(params, lr=1e-4)
    opt.step()  # compiles
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        opt.step()
    torch.cuda.synchronize()
    print(f"SD1.5 parameter set: {(time.perf_counter() - t0) / 10 * 1e3:.1f} ms/step, "
          f"{len(code_storages(opt))} chunks")
    assert counters["stats"]["unique_graphs"] - base == 1
    large = [p for p in params if "m_code" in opt.state[p]]
    assert 20 <= len(code_storages(opt)) <= 40
    chunk_bytes = sum(b.nbytes for layout in opt._layouts.values() for c in layout for b in c.buffers)
    assert chunk_bytes / sum(p.numel() for p in large) <= 2.1
