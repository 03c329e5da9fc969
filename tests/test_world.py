"""The procedural world (minisd/world.py): determinism, captions that parse back, the held-out split, folder layout."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from minisd import world
from minisd.world import Attributes

torch.set_num_threads(1)


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_same_seed_same_bytes(tmp_path):
    a = world.write_folder(str(tmp_path / "a"), 8, seed=3, style="striped")
    b = world.write_folder(str(tmp_path / "b"), 8, seed=3, style="striped")
    c = world.write_folder(str(tmp_path / "c"), 8, seed=4, style="striped")
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb, [k for k in fa if fa[k] != fb.get(k)]
    assert fa["attributes.jsonl"] != fc["attributes.jsonl"]
    # render is a pure function of the attributes
    attrs = world.sample(1, seed=9, split="all")[0][0]
    assert np.array_equal(np.asarray(world.render(attrs)), np.asarray(world.render(attrs)))


def test_folder_layout(tmp_path):
    out = world.write_folder(str(tmp_path / "d"), 6, seed=1, split="heldout", template=None)
    names = sorted(os.listdir(out))
    assert names == sorted([f"{i:05d}.{e}" for i in range(6) for e in ("png", "txt")]
                           + ["metadata.jsonl", "attributes.jsonl"])
    meta = [json.loads(l) for l in open(os.path.join(out, "metadata.jsonl"))]
    truth = world.read_attributes(out)
    expected = world.sample(6, seed=1, split="heldout")
    assert [m["file_name"] for m in meta] == [f"{i:05d}.png" for i in range(6)]
    for i, (m, (name, attrs), (exp_attrs, exp_text)) in enumerate(zip(meta, truth, expected)):
        txt = open(os.path.join(out, f"{i:05d}.txt")).read()
        assert txt == m["text"] + "\n" == exp_text + "\n"
        assert name == m["file_name"] and attrs == exp_attrs
        img = world.Image.open(os.path.join(out, name))
        assert img.size == (64, 64) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(world.render(attrs)))


def test_captions_parse_back():
    rng = np.random.default_rng(0)
    seen_templates = set()
    for i in range(400):
        style = world.STYLES[i % 4]
        subject = i % 7 == 0 and style == "plain"
        a = world.sample_attributes(rng, "all", style, subject)
        k = i % len(world.TEMPLATES)
        text = world.caption(a, k)
        got = world.parse_caption(text)
        want = {f: getattr(a, f) for f in ("shape", "colour", "size", "position", "background", "style", "subject")}
        assert got == want, (text, got, want)
        assert (" a o" not in text) and (" a e" not in text), text  # "an orange", never "a orange"
        seen_templates.add(k)
        if style != "plain":
            assert text.endswith(f", {style} style")
        if subject:
            assert "sks emblem" in text
    assert seen_templates == set(range(len(world.TEMPLATES)))
    a = Attributes("star", "orange", "small", "top left", "purple")
    assert world.caption(a) == "a small orange star at the top left on a purple background"
    assert world.parse_caption(world.caption(a, 2, token="zwx"))["shape"] == "star"
    with pytest.raises(ValueError):
        world.parse_caption("a photo of a cat")


def test_heldout_split():
    heldout = {t for t in itertools.product(world.SHAPES, world.COLOURS, world.POSITIONS) if world.is_heldout(*t)}
    # one held-out position per (shape, colour) pair; 1/9 of all triples
    assert len(heldout) == len(world.SHAPES) * len(world.COLOURS)
    assert {(s, c) for s, c, _ in heldout} == set(itertools.product(world.SHAPES, world.COLOURS))
    # every attribute pair still occurs in train, so held-out prompts are new compositions of known words
    train = set(itertools.product(world.SHAPES, world.COLOURS, world.POSITIONS)) - heldout
    for i, j in ((0, 1), (0, 2), (1, 2)):
        pairs = {(t[i], t[j]) for t in train}
        assert len(pairs) == len({t[i] for t in train}) * len({t[j] for t in train})
    tr = [a for a, _ in world.sample(600, seed=0, split="train")]
    ho = [a for a, _ in world.sample(200, seed=0, split="heldout")]
    assert not any((a.shape, a.colour, a.position) in heldout for a in tr)
    assert all((a.shape, a.colour, a.position) in heldout for a in ho)
    assert all(a.background != a.colour for a in tr + ho)
    assert {a.shape for a in ho} == set(world.SHAPES) and {a.colour for a in ho} == set(world.COLOURS)


def test_styles_and_subject_render():
    base = Attributes("circle", "red", "large", "center", "blue")
    plain = np.asarray(world.render(base)).astype(int)
    centre = lambda img: img[32, 32]
    assert tuple(centre(plain)) == world.PALETTE["red"]
    outlined = np.asarray(world.render(Attributes(**{**base.__dict__, "style": "outlined"}))).astype(int)
    assert tuple(centre(outlined)) == world.PALETTE["blue"]  # hollow: the background shows inside
    assert tuple(outlined[32, 32 - 11]) == world.PALETTE["red"]  # inside the stroke, 11 px left of the centre
    for style in ("striped", "dotted"):
        img = np.asarray(world.render(Attributes(**{**base.__dict__, "style": style}))).astype(int)
        inside = img[24:40, 24:40].reshape(-1, 3)
        # the pattern's contrast colour (white on red) covers a fair share of the shape, red the rest
        white = np.abs(inside - 245).sum(1) / 3  # mean distance to white, per pixel
        assert 0.15 < np.mean(white < 120) < 0.6 and np.mean(white > 120) > 0.4, (style, np.mean(white < 120))
        assert np.array_equal(img[:10, :10], plain[:10, :10])  # background untouched
    subj = world.sample(1, seed=0, subject=True)[0][0]
    assert subj.subject and subj.shape == "emblem" and subj.colour == ""
    px = np.asarray(world.render(subj)).reshape(-1, 3).astype(int)
    for rgb in world.SUBJECT_COLOURS:  # both emblem colours appear exactly (solid interior pixels)
        assert np.any(np.all(px == rgb, axis=1)), rgb
    with pytest.raises(ValueError):
        world.sample_attributes(np.random.default_rng(0), "train", "striped", subject=True)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        world.main(["--help"])
    assert e.value.code == 0 and "--split" in capsys.readouterr().out
    world.main([str(tmp_path / "w"), "--n", "3", "--seed", "5", "--style", "dotted", "--template", "1"])
    texts = [json.loads(l)["text"] for l in open(tmp_path / "w" / "metadata.jsonl")]
    assert len(texts) == 3 and all(t.endswith(", dotted style") and ", " in t[:-15] for t in texts)
    world.main([str(tmp_path / "s"), "--n", "2", "--subject", "--token", "zwx"])
    assert all("zwx emblem" in json.loads(l)["text"] for l in open(tmp_path / "s" / "metadata.jsonl"))


def test_partial_captions_by_hand():
    a = Attributes("circle", "red", "small", "top left", "blue")
    assert world.partial_caption(a, ("shape", "colour", "background")) == "a red circle on a blue background"
    assert world.partial_caption(a, ("colour", "background"), 3) == "a blue background with a red shape"
    assert world.partial_caption(a, ("position",), 1) == "a shape, top left"
    assert world.partial_caption(a, ("shape", "colour", "background"), 4) == "red circle on blue"
    assert world.partial_caption(a, ("background", "position"), 6) == "blue background, shape, top left"
    assert world.partial_caption(a, ("size", "colour", "shape", "background", "position"), 7) == \
        "a small red circle on a blue background at the top left"
    o = Attributes("heart", "orange", "large", "center", "orange")
    assert world.partial_caption(o, ("colour", "background"), 0) == "an orange shape on an orange background"
    assert world.parse_named("a red circle on a blue background") == \
        {"shape": "circle", "colour": "red", "background": "blue"}
    assert world.parse_named("Red circle on blue") == {"shape": "circle", "colour": "red", "background": "blue"}
    assert world.parse_named("a blue background with a shape at the top middle") == \
        {"background": "blue", "position": "top middle"}
    assert world.parse_named("a photo of a cat") == {}
    with pytest.raises(ValueError):  # two shape colours
        world.parse_named("a red circle and a green circle")
    for bad in ((), ("shape", "texture")):
        with pytest.raises(ValueError):
            world.partial_caption(a, bad)
    with pytest.raises(ValueError):
        world.partial_caption(Attributes("circle", "red", "small", "center", "blue", style="striped"), ("shape",))


def test_partial_captions_every_subset_and_phrasing():
    assert len(world.SUBSETS) == 2 ** 5 - 1 == len(set(world.SUBSETS)) and all(world.SUBSETS)
    rng = np.random.default_rng(1)
    for subset in world.SUBSETS:
        for k in range(len(world.PHRASINGS)):
            a = world.sample_attributes(rng, "all")
            text = world.partial_caption(a, subset, k)
            # the keyword parser reads back exactly what is named, in every wording
            assert world.parse_named(text) == {f: getattr(a, f) for f in subset}, (subset, k, text)
            assert (" a o" not in text) and not text.startswith("a o"), text
            if len(subset) == 5 and k < len(world.TEMPLATES):  # full + template wording = the world's caption
                assert text == world.caption(a, k)
    # the sampler: every kind and wording turns up; held-out triples never named in train captions
    rows = world.sample_partial(3000, seed=0, split="train")
    assert {s for _, _, s in rows} == set(world.SUBSETS)
    for k in range(len(world.PHRASINGS)):  # every wording is drawn (some coincide for small subsets)
        assert any(t == world.partial_caption(a, s, k) for a, t, s in rows[:500]), k
    for attrs, text, subset in rows:
        named = world.parse_named(text)
        assert set(named) == set(subset)
        assert not world.is_heldout(attrs.shape, attrs.colour, attrs.position)
        if {"shape", "colour", "position"} <= set(named):
            assert not world.is_heldout(named["shape"], named["colour"], named["position"]), text
    held = world.sample_partial(50, seed=0, split="heldout", named=("shape", "colour", "position"))
    assert all(world.is_heldout(*(world.parse_named(t)[k] for k in ("shape", "colour", "position")))
               for _, t, _ in held)
    assert world.sample_partial(5, seed=3) == world.sample_partial(5, seed=3)
