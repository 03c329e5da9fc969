"""Latent and text caches: a cached run reproduces the uncached run's losses with the same seed (flip, caption
dropout, buckets, SDXL included); the disk cache is written once, reused, and recomputed when its fingerprint
changes; dropped captions read the empty caption's embedding; the refused combinations end with one error line."""
import os
import sys

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import trainer as trainer_mod  # noqa: E402
from minisd import world  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from test_buckets import write_shapes  # noqa: E402
from conftest import save_tiny_sdxl  # noqa: E402

torch.set_num_threads(1)
FAST = ["--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples", "--save-every", "0"]
RECIPE = ["--seed", "3", "--flip", "0.5", "--caption-dropout", "0.5", "--noise-offset", "0.1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 6, seed=0, style="striped")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A tiny SDXL (two text encoders, pooled + size conditioning), saved as a minisd folder."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("xl") / "xl")


def _trainer(out, *flags, logs=None):
    cfg, _ = parse_config(FAST + ["--out", str(out)] + list(flags))
    return Trainer(cfg, str(out), log=(logs.append if logs is not None else lambda s: None))


@pytest.mark.parametrize("extra", [[], ["--buckets", "--repeats", "2"]])
def test_cached_run_matches_uncached(tmp_path, data_dir, extra):
    data = data_dir if not extra else write_shapes(str(tmp_path / "shapes"))
    flags = ["--model", "tiny-random", "--data", data, *RECIPE, *extra]
    want = _trainer(tmp_path / "plain", *flags).run()["losses"]
    t = _trainer(tmp_path / "cached", *flags, "--cache-latents", "--cache-text")
    n = len(t.data.examples)
    assert len(t.latent_cache.moments) == 2 * n                   # --flip: both orientations cached
    assert t.text_cache.context.shape[0] == n + 1                 # + the empty caption
    assert not t.data.load_pixels
    got = t.run()["losses"]
    print("uncached", want, "\ncached  ", got)
    # same draws in the same order (z = mean + std·ε, t, noise): equal up to the VAE's batch grouping (bitwise here)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0), (got, want)
    other = _trainer(tmp_path / "seed", *flags, "--seed", "4", "--cache-latents", "--max-steps", "1").run()["losses"]
    assert abs(other[0] - want[0]) > 1e-3 * want[0]  # another draw moves the loss: the comparison can fail


def test_dropped_captions_read_the_empty_embedding(tmp_path, data_dir):
    t = _trainer(tmp_path, "--model", "tiny-random", "--data", data_dir, "--cache-text", "--caption-dropout", "0.5",
                 "--batch-size", "3")
    empty = t.encode_text([""])
    drops = 0
    for _ in range(4):
        b = t.loader.next_batch()
        ctx, pooled = t.text_cache.lookup(b["indices"], b["dropped"], t.device)
        assert ctx.shape == (3, 77, 32) and pooled.shape == (3, 32)
        for j, (k, dropped) in enumerate(zip(b["indices"], b["dropped"])):
            assert b["captions"][j] == ("" if dropped else t.data.examples[k].caption)  # the dataset's decision
            own = t.encode_text([t.data.examples[k].caption])
            want, other = (empty, own) if dropped else (own, empty)
            for got, w, o in zip((ctx[j], pooled[j]), want, other):
                assert torch.allclose(got, w[0], atol=1e-6) and not torch.allclose(got, o[0], atol=1e-3)
            drops += dropped
    assert 0 < drops < 12


def test_disk_cache_written_once_reused_and_refreshed(tmp_path):
    data = write_shapes(str(tmp_path / "data"))
    cache = str(tmp_path / "cache")
    flags = ["--model", "tiny-random", "--data", data, "--cache-latents", "--cache-text", "--cache-dir", cache,
             "--max-steps", "2"]
    logs = []
    first = _trainer(tmp_path / "a", *flags, logs=logs)
    assert sum("cache: wrote" in s for s in logs) == 2, logs
    prints = {}
    for name in ("latents", "text"):
        with safe_open(os.path.join(cache, f"{name}.safetensors"), "pt") as f:
            prints[name] = f.metadata()["fingerprint"]
    stamp = {n: os.stat(os.path.join(cache, f"{n}.safetensors")).st_mtime_ns for n in prints}
    want = first.run()["losses"]

    logs.clear()
    calls = []
    second = _trainer(tmp_path / "b", *flags, logs=logs)
    second.model.vae.encode = lambda x: calls.append(x) or 1 / 0   # a reused cache runs no VAE at all
    assert sum("read from" in s for s in logs) == 2 and not any("wrote" in s for s in logs), logs
    assert all(torch.equal(second.latent_cache.moments[k], first.latent_cache.moments[k])
               for k in first.latent_cache.moments)
    assert second.run()["losses"] == want and not calls
    assert stamp == {n: os.stat(os.path.join(cache, f"{n}.safetensors")).st_mtime_ns for n in prints}

    # another resolution changes the latents' fingerprint, not the text's; an edited caption only the text's
    logs.clear()
    third = _trainer(tmp_path / "c", *flags, "--resolution", "48", logs=logs)
    assert any("latents.safetensors was made for another" in s for s in logs), logs
    assert any("wrote 7 latents" in s for s in logs) and any("caption embeddings read from" in s for s in logs)
    assert third.latent_cache.moments[(0, False)].shape[-1] == 48 // 2
    open(os.path.join(data, "0.txt"), "w").write("a new caption")
    logs.clear()
    _trainer(tmp_path / "d", *flags, "--resolution", "48", logs=logs)
    assert any("text.safetensors was made for another" in s for s in logs), logs
    assert any("latents read from" in s for s in logs), logs
    # a damaged file is recomputed, not trusted
    open(os.path.join(cache, "latents.safetensors"), "wb").write(b"junk")
    logs.clear()
    _trainer(tmp_path / "e", *flags, "--resolution", "48", logs=logs)
    assert any("unreadable" in s for s in logs) and any("wrote 7 latents" in s for s in logs), logs


@pytest.mark.parametrize("argv, words", [
    (["--cache-latents", "--random-crop"], "--cache-latents cannot be used with --random-crop"),
    (["--cache-text", "--train-text-encoder"], "--cache-text cannot be used with --train-text-encoder"),
    (["--cache-dir", "somewhere"], "--cache-dir needs"),
    (["--buckets", "--bucket-step", "6"], "--bucket-step 6 must be a multiple of 4"),
])
def test_refused_combinations_exit_2(tmp_path, data_dir, capsys, argv, words):
    rc = train.main(["--model", "tiny-random", "--data", data_dir, "--out", str(tmp_path / "run"), *FAST, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and words in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_sdxl_cached_micro_conditioning_from_real_sizes(tmp_path, sdxl_dir, monkeypatch):
    """SDXL with both caches and buckets: the size ids come from each real image (original size, crop offset) and its
    bucket (target size), equal to the uncached run's, and so are the losses."""
    data = write_shapes(str(tmp_path / "data"), [(60, 30), (30, 45), (40, 40)])
    seen = []
    real = trainer_mod.sdxl_vector_cond
    monkeypatch.setattr(trainer_mod, "sdxl_vector_cond", lambda pooled, ids, **kw: seen.append(ids) or real(
        pooled, ids, **kw))
    flags = ["--model", sdxl_dir, "--data", data, "--buckets", "--batch-size", "1", "--max-steps", "3",
             "--caption-dropout", "0.5", "--seed", "1"]
    want = _trainer(tmp_path / "plain", *flags).run()["losses"]
    ids_plain, seen[:] = [s.tolist() for s in seen], []
    t = _trainer(tmp_path / "cached", *flags, "--cache-latents", "--cache-text")
    assert t.text_cache.pooled.shape == (4, 32)                        # pooled (P = 32) cached too, + ""
    got = t.run()["losses"]
    ids_cached = [s.tolist() for s in seen]
    assert ids_cached == ids_plain
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0), (got, want)
    # by hand, R = 32, bucket step 4, sides 16..64, area <= 1024: 60x30 (ratio 2) -> bucket 44x20 (2.2; 40x24 is
    # 1.67), covered at 44x22, crop top 1; 30x45 (0.667) -> 24x40 (0.6; 28x36 is 0.78), covered at 27x40, crop
    # left 1; 40x40 -> 32x32. Rows: (orig h, w, crop top, left, target h, w)
    expected = {(30.0, 60.0, 1.0, 0.0, 20.0, 44.0), (45.0, 30.0, 0.0, 1.0, 40.0, 24.0),
                (40.0, 40.0, 0.0, 0.0, 32.0, 32.0)}
    assert {tuple(row) for ids in ids_cached for row in ids} <= expected
    assert len({tuple(row) for ids in ids_cached for row in ids}) >= 2
