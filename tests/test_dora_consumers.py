"""How other tools apply a minisd DoRA file, each written out from its documented / audited formula (test-only), against
what was trained (minisd = PEFT: W' = m ⊙ (W + sBA) / ‖W + sBA‖ per output row, pinned to PEFT in test_lora.py).
The relative errors of the update W' − W printed here are the README's table ("DoRA in other tools").

    diffusers load_lora_weights, kohya file   drops dora_scale:          W + sBA
    ComfyUI (weight_decompose, output axis)   norm of the base weight:    m ⊙ (W + sBA) / ‖W‖_row
    A1111 1.10.1 (network.py)                 norm per input column:      m ⊙ (W + sBA) / ‖W + sBA‖_col

Layers of SD1.5 shapes (320x320 self-attention, 320x768 cross-attention key, 1280x5120 feed-forward) with a base of
row norm ~1 (like the pretrained weights' spread), a rank-16 update of 5 % of ‖W‖ and magnitudes moved by ±3 %,
the regime of a trained style LoRA. These are formulas on random tensors, not runs of those programs."""
import torch

torch.set_num_threads(1)
SHAPES = [(320, 320), (320, 768), (1280, 5120)]


def trained(w, delta, m):
    return m * (w + delta) / (w + delta).norm(dim=1, keepdim=True)


CONSUMERS = {
    "diffusers (kohya file)": lambda w, d, m: w + d,
    "ComfyUI": lambda w, d, m: m * (w + d) / w.norm(dim=1, keepdim=True),
    "A1111 1.10.1": lambda w, d, m: m * (w + d) / (w + d).norm(dim=0, keepdim=True),
}


def layers(seed=0):
    """(W, ΔW = sBA, magnitude) for each SD1.5 shape, in the regime the module docstring describes."""
    g = torch.Generator().manual_seed(seed)
    for o, i in SHAPES:
        w = torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5
        b, a = torch.randn(o, 16, generator=g, dtype=torch.float64), torch.randn(16, i, generator=g, dtype=torch.float64)
        delta = b @ a
        delta *= 0.05 * w.norm() / delta.norm()
        m = (w + delta).norm(dim=1, keepdim=True) * (1 + 0.03 * torch.randn(o, 1, generator=g, dtype=torch.float64))
        yield w, delta, m


def measure(seed=0):
    out = {k: [] for k in CONSUMERS}
    for w, delta, m in layers(seed):
        ref = trained(w, delta, m) - w
        for name, f in CONSUMERS.items():
            out[name].append(((f(w, delta, m) - w - ref).norm() / ref.norm()).item())
    return out


def strength(w, delta, m, s, how):
    """DoRA at strength s: PEFT / diffusers / minisd put s inside the norm; ComfyUI and A1111 blend with W."""
    if how == "peft":
        return trained(w, s * delta, m)
    return w + s * (trained(w, delta, m) - w)


def test_strength_definitions_differ():
    """The README's numbers for "DoRA at strength λ": relative difference of the updates (blend vs PEFT) per layer."""
    for s in (0.3, 1.7):
        errs = []
        for w, delta, m in layers():
            peft = strength(w, delta, m, s, "peft") - w
            blend = strength(w, delta, m, s, "blend") - w
            errs.append(((blend - peft).norm() / peft.norm()).item())
        print(f"strength {s}: blend vs PEFT, relative difference of the update {min(errs):.1%} - {max(errs):.1%}")
        assert min(errs) > 0.005


def test_consumer_formulas_differ_from_the_trained_dora():
    res = measure()
    for name, errs in res.items():
        print(f"{name}: relative error of the update {min(errs):.1%} - {max(errs):.1%}")
        assert min(errs) > 0.01, name  # each reader is measurably off; the exact numbers are in the README
