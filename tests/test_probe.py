"""The attribute probe (minisd/probe.py): the shipped weights read fresh held-out images of the world, clean and
degraded; styles and the subject are detected; train/save/load, augmentation and the CLI behave.

Thresholds sit well below the accuracies recorded in docs/WORLD.md, so the test is stable but still fails for a
broken probe (chance is 14 % for shape, 12.5 % for colour, 11 % for position, 25 % for style)."""
import os

import numpy as np
import pytest
import torch

from minisd.world import probe as P
from minisd import world
from minisd.world import Attributes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def probe():
    assert os.path.exists(P.DEFAULT_WEIGHTS), "weights/probe.safetensors must ship with the repository"
    assert os.path.getsize(P.DEFAULT_WEIGHTS) < 1_100_000
    return P.load_probe()


def _images(attrs):
    return P.render_batch(attrs).float() / 255.0


def test_reads_heldout_images(probe):
    attrs = [a for a, _ in world.sample(200, seed=2024, split="heldout")]
    res = P.score(_images(attrs), attrs, probe)
    print(P.format_table(res, "clean held-out"))
    for k, floor in (("shape", 0.9), ("colour", 0.95), ("size", 0.9), ("position", 0.95), ("background", 0.95)):
        assert res[k] >= floor, (k, res[k])
    assert res["style_leak"] <= 0.05 and res["subject_leak"] <= 0.03, res
    # degraded like a small diffusion model's output: still far above chance
    aug = P.score(P.augment(_images(attrs), torch.Generator().manual_seed(0)), attrs, probe)
    print(P.format_table(aug, "augmented held-out"))
    for k, floor in (("shape", 0.8), ("colour", 0.9), ("position", 0.9), ("background", 0.9)):
        assert aug[k] >= floor, (k, aug[k])


def test_detects_styles_and_subject(probe):
    attrs = []
    for i, style in enumerate(("outlined", "striped", "dotted")):
        attrs += [a for a, _ in world.sample(40, seed=100 + i, split="all", style=style)]
    attrs += [a for a, _ in world.sample(40, seed=200, subject=True)]
    res = P.score(_images(attrs), attrs, probe)
    print(P.format_table(res, "styles and subject"))
    assert res["style_adoption"] >= 0.85, res
    assert res["subject"] >= 0.95, res
    pred = probe.predict(_images(attrs[:120]))
    for style in ("outlined", "striped", "dotted"):  # each style on its own, not only on average
        hits = [p.style == a.style for p, a in zip(pred, attrs) if a.style == style]
        assert np.mean(hits) >= 0.75, (style, np.mean(hits))


def test_score_semantics():
    """score() compares prompt and prediction field by field; checked with a stub probe that always says one thing."""
    said = Attributes("star", "red", "small", "center", "blue", "striped", False)

    class Stub:
        def predict(self, x):
            return [said] * len(x)

    prompts = [said, Attributes("circle", "red", "small", "center", "blue"),
               Attributes("emblem", "", "large", "center", "blue", subject=True)]
    res = P.score(torch.zeros(3, 3, 64, 64), prompts, Stub())
    assert res["n"] == 3 and res["shape"] == 0.5 and res["colour"] == 1.0 and res["size"] == 2 / 3
    assert res["all"] == 0.5 and res["style_adoption"] == 1.0 and res["style_leak"] == 1.0
    assert res["subject"] == 0.0 and res["subject_leak"] == 0.0
    with pytest.raises(ValueError):
        P.score(torch.zeros(2, 3, 64, 64), prompts, Stub())


def test_score_named_semantics():
    """score_named() counts only the named attributes, and the swap rate catches a colour given to the wrong
    object; a stub probe that always reads a blue circle on red."""
    said = Attributes("circle", "blue", "small", "center", "red")

    class Stub:
        def predict(self, x):
            return [said] * len(x)

    prompts = [Attributes("circle", "red", "large", "top left", "blue"),   # colour and background swapped
               Attributes("circle", "blue", "large", "top left", "green"),
               Attributes("star", "green", "small", "center", "white")]
    named = [("shape", "colour", "background"), ("shape", "colour", "size"), ("shape", "size", "position")]
    res = P.score_named(torch.zeros(3, 3, 64, 64), prompts, named, Stub())
    assert res["n"] == 3 and res["shape"] == 2 / 3 and res["colour"] == 0.5 and res["background"] == 0.0
    assert res["size"] == 0.5 and res["position"] == 1.0     # unnamed: the third prompt's size/position only
    assert res["all"] == 0.0 and res["swap"] == 0.5           # prompt 1 swapped; prompt 3 names no colour
    res = P.score_named(torch.zeros(1, 3, 64, 64), prompts[2:], [("shape",)], Stub())
    assert res["shape"] == 0.0 and res["colour"] is None and res["swap"] is None
    with pytest.raises(ValueError):
        P.score_named(torch.zeros(2, 3, 64, 64), prompts, named, Stub())


def test_score_named_reads_rendered_partial_prompts(probe):
    """The real probe on ground-truth renders of partial prompts: named attributes read right, no swaps; with
    colour and background exchanged in the picture, every colour-naming prompt counts as a swap."""
    rows = world.sample_partial(120, seed=5, split="heldout")
    attrs, named = [a for a, _, _ in rows], [s for _, _, s in rows]
    res = P.score_named(_images(attrs), attrs, named, probe)
    assert res["all"] >= 0.95 and res["swap"] <= 0.02, res
    swapped = [Attributes(a.shape, a.background, a.size, a.position, a.colour) for a in attrs]
    res = P.score_named(_images(swapped), attrs, named, probe)
    assert res["swap"] >= 0.97 and res["colour"] <= 0.03, res


def test_augment():
    x = _images([a for a, _ in world.sample(8, seed=1, split="all")])
    a1 = P.augment(x, torch.Generator().manual_seed(5))
    a2 = P.augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2) and a1.shape == x.shape
    assert a1.min() >= 0 and a1.max() <= 1 and (a1 - x).abs().mean() > 0.005
    assert torch.allclose(P.augment(x, torch.Generator().manual_seed(5), strength=0.0), x, atol=1e-6)


def test_train_save_load(tmp_path):
    out = str(tmp_path / "p.safetensors")
    model = P.train_probe(out, n=64, epochs=1, batch_size=32, log=lambda *a: None)
    loaded = P.load_probe(out)
    x = _images([a for a, _ in world.sample(4, seed=0)])
    with torch.no_grad():
        want, got = model.eval()(x), loaded(x)
    for k in P.HEADS:
        assert torch.equal(want[k], got[k]), k
    assert [a.shape for a in loaded.predict(x)] == [a.shape for a in model.predict(x)]
    pil = [world.render(a).resize((128, 128)) for a, _ in world.sample(2, seed=0)]
    assert len(loaded.predict(P.to_tensor(pil))) == 2  # other sizes are resized to 64×64


def test_cli(tmp_path, capsys):
    for argv in (["--help"], ["train", "--help"], ["score", "--help"]):
        with pytest.raises(SystemExit) as e:
            P.main(argv)
        assert e.value.code == 0
    folder = world.write_folder(str(tmp_path / "f"), 12, seed=7, split="heldout")
    capsys.readouterr()
    P.main(["score", folder])
    out = capsys.readouterr().out
    assert "shape" in out and "position" in out and "%" in out
