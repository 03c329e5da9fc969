"""Prodigy (minisd/prodigy.py): converges on convex problems from a tiny d0 with lr = 1, its d estimate rises to the
problem's scale, and it follows the authors' prodigyopt package step for step."""
import copy

import torch
import torch.nn as nn
from prodigyopt import Prodigy as ReferenceProdigy

from minisd.train.prodigy import Prodigy


def least_squares(seed=0, n=256, dim=20):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g)
    x_star = torch.randn(dim, 1, generator=g) * 3.0  # the solution is ~3 away per coordinate: d must grow from 1e-6
    b = a @ x_star + 0.01 * torch.randn(n, 1, generator=g)
    return a, b


def run(opt_cls, steps, **kw):
    a, b = least_squares()
    model = nn.Linear(a.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = opt_cls(model.parameters(), **kw)
    losses = []
    for _ in range(steps):
        loss = ((model(a) - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def test_converges_on_least_squares():
    a, b = least_squares()
    best = ((a @ torch.linalg.lstsq(a, b).solution - b) ** 2).mean().item()
    model, opt, losses = run(Prodigy, 500, lr=1.0)
    assert losses[-1] < 1.01 * best, (losses[0], losses[-1], best)  # from 215 down to the least-squares optimum
    d = opt.param_groups[0]["d"]
    assert 1e-2 < d < 1e2, d  # from d0 = 1e-6 up to the scale of the solution
    # Adam with the same untuned lr 1e-6 (Prodigy's d0) does not move
    adam_losses = run(torch.optim.Adam, 500, lr=1e-6)[2]
    assert adam_losses[-1] > 0.99 * adam_losses[0]


def test_converges_on_logistic_regression():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 10, generator=g)
    w_true = torch.randn(10, 1, generator=g) * 2
    y = (x @ w_true + 0.5 * torch.randn(512, 1, generator=g) > 0).float()
    model = nn.Linear(10, 1)
    opt = Prodigy(model.parameters(), lr=1.0, weight_decay=0.0)
    loss_fn = nn.BCEWithLogitsLoss()
    first = loss_fn(model(x), y).item()
    for _ in range(300):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = ((model(x) > 0).float() == y).float().mean().item()
    assert loss.item() < 0.5 * first and acc > 0.85, (first, loss.item(), acc)


def test_matches_reference_prodigyopt():
    for kw in (dict(lr=1.0), dict(lr=1.0, weight_decay=0.01, use_bias_correction=True, d_coef=0.5),
               dict(lr=1.0, safeguard_warmup=True, growth_rate=1.05)):
        ours, opt, _ = run(Prodigy, 100, **kw)
        ref, ref_opt, _ = run(ReferenceProdigy, 100, **kw)
        diff = (ours.weight - ref.weight).abs().max().item() / ref.weight.abs().max().item()
        assert diff < 1e-5, (kw, diff)
        d, d_ref = opt.param_groups[0]["d"], ref_opt.param_groups[0]["d"]
        assert abs(d - d_ref) <= 1e-5 * d_ref, (kw, d, d_ref)


def test_state_dict_resume():
    model, opt, _ = run(Prodigy, 20, lr=1.0)
    a, b = least_squares()
    clone = copy.deepcopy(model)
    opt2 = Prodigy(clone.parameters(), lr=1.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (clone, opt2)):
        for _ in range(10):
            loss = ((m(a) - b) ** 2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
    assert torch.equal(model.weight, clone.weight)
