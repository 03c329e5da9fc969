"""train.py never destroys what the user has (issue 15): an existing --out is refused unless --resume or --overwrite
(an earlier run folder only, never one holding --data or the working directory); everything that can be checked is
checked before the run folder is made, so a refused run leaves nothing behind (and a run it would replace stays
whole); the run folder is locked, so a second train.py on it is refused while a dead one's lock is no lock; every
file a resumed run writes goes through a fresh private temporary file, so links planted at any name are never
written through; a full disk mid-checkpoint ends with one line and keeps the previous checkpoint. Refusals are
judged as the audit did: non-zero exit, exactly one `error:` line, no traceback, nothing written or destroyed."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import train
from conftest import ROOT
from minisd import world
from safe_helpers import call, leftovers, ok, plant_link, refused, tree

torch.set_num_threads(1)
# tiny-random at 32 px, one image per step
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "1",
        "--resolution", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 4, seed=0, style="striped")


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, data_dir):
    """A finished 2-step run (checkpoint at step 2, cached latents and text)."""
    root = tmp_path_factory.mktemp("done")
    run = str(root / "run")
    assert train.main(FAST + ["--data", data_dir, "--out", run, "--max-steps", "2", "--save-every", "2",
                              "--cache-latents", "--cache-text", "--cache-dir", str(root / "cache")]) == 0
    return run


def copy_run(done_run, dest) -> str:
    shutil.copytree(done_run, dest, symlinks=True)
    return str(dest)


def plain_data(data_dir, dest) -> str:
    """The world images as an ordinary data folder (no attributes.jsonl: validation needs --validation-prompts)."""
    shutil.copytree(data_dir, dest, ignore=shutil.ignore_patterns("attributes.jsonl"))
    return str(dest)


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, done_run, data_dir, capfd):
    run = copy_run(done_run, tmp_path / "run")
    before = tree(str(tmp_path))
    refused(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", run), "exists", "--overwrite")
    cache = json.load(open(os.path.join(run, "config.json")))["cache_dir"]  # outside the run: confirmed by the flag
    refused(call(capfd, "train.py", "--resume", run, "--overwrite", "--cache-dir", cache), "--overwrite", "--resume")
    assert tree(str(tmp_path)) == before


def test_overwrite_replaces_an_earlier_run_only(tmp_path, done_run, data_dir, capfd):
    run = copy_run(done_run, tmp_path / "run")
    ok(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", run, "--overwrite", "--seed", "5",
            "--max-steps", "1"))
    assert json.load(open(os.path.join(run, "config.json")))["seed"] == 5
    assert len(open(os.path.join(run, "loss.jsonl")).readlines()) == 1 and not leftovers(str(tmp_path))
    # a folder holding what train.py does not write, one holding --data, the working directory: never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "notes.txt").write_text("the user's")
    holder = tmp_path / "holder"
    data = plain_data(data_dir, holder / "data")
    (holder / "config.json").write_text("{}")
    here = copy_run(done_run, tmp_path / "here")
    before = tree(str(tmp_path))
    refused(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", foreign, "--overwrite"), "notes.txt")
    refused(call(capfd, "train.py", *FAST, "--data", data, "--out", holder, "--overwrite"), "holds an input")
    refused(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", ".", "--overwrite", cwd=here),
            "working directory")
    assert tree(str(tmp_path)) == before


def test_a_refused_run_leaves_nothing_behind(tmp_path, done_run, data_dir, capfd):
    work = tmp_path / "work"
    work.mkdir()
    (work / "empty").mkdir()
    plain = plain_data(data_dir, tmp_path / "plain")
    world_flags = ["--threads", "1", "--no-progress", "--no-samples", "--n-images", "4", "--max-steps", "1"]
    cases = [  # (flags, words): a world run with a bad model (before: an empty run folder was left), bad data,
        (world_flags + ["--model", str(tmp_path / "nope")], ["nope"]),  # and a refusal inside the Trainer
        (FAST + ["--data", str(work / "empty")], ["no image"]),
        (FAST + ["--data", plain, "--validate-every", "1"], ["--validation-prompts"]),
        (world_flags + ["--model", "tiny-random", "--validate-every", "1", "--validation-prompts",
                        str(tmp_path / "none.txt")], ["none.txt"])]  # refused by the Trainer, after the world data
    for flags, words in cases:
        refused(call(capfd, "train.py", *flags, "--out", work / "run"), *words)
        assert sorted(os.listdir(work)) == ["empty"]
    (work / "given").mkdir()  # an empty folder given as --out is free; refused, it is left empty again
    for flags, words in cases:
        refused(call(capfd, "train.py", *flags, "--out", work / "given"), *words)
        assert os.listdir(work / "given") == []
    # with --overwrite the earlier run stays whole when the new one is refused, before or after the folder swap
    run = copy_run(done_run, work / "old")
    before = tree(run)
    for flags, words in cases[::2]:
        refused(call(capfd, "train.py", *flags, "--out", run, "--overwrite"), *words)
        assert tree(run) == before and sorted(os.listdir(work)) == ["empty", "given", "old"]


def test_output_paths_are_checked_before_any_work(tmp_path, done_run, data_dir, capfd, monkeypatch):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    save_file({"w": torch.ones(2)}, str(cache / "latents.safetensors"))  # someone's tensors, not a cache
    run = copy_run(done_run, tmp_path / "run")
    os.symlink(str(ro), os.path.join(run, "validation"))
    before = tree(str(tmp_path))
    for flags, words in (
            (["--out", afile], ["is a file"]),
            (["--out", afile / "run"], ["is a file, not a folder"]),
            (["--out", tmp_path / "new", "--cache-latents", "--cache-dir", afile], ["--cache-dir", "is a file"]),
            (["--out", tmp_path / "new", "--cache-latents", "--cache-dir", cache], ["not a minisd cache"])):
        p = call(capfd, "train.py", *FAST, "--data", data_dir, *flags)
        refused(p, *words)
        assert "train config" not in p.stdout
    old_cache = json.load(open(os.path.join(run, "config.json")))["cache_dir"]  # outside the run: confirmed
    refused(call(capfd, "train.py", "--resume", run, "--max-steps", "3", "--cache-dir", old_cache), "validation",
            "link")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.path.realpath(p) == str(ro)
                        and mode & os.W_OK else real(p, mode, *a, **k))  # root ignores permission bits: simulate
    refused(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", ro / "run"), "not writable")
    assert tree(str(tmp_path)) == before


def test_links_planted_in_a_resumed_run_are_never_written_through(tmp_path, done_run, capfd):
    run = copy_run(done_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "cache"
    # the temporary names of earlier versions, and the run's own outputs replaced by links
    temporary = ["checkpoint.pt.tmp", "loss.jsonl.tmp", "validation/step_000004.png.tmp",
                 "validation/step_000004.tmp.png"]
    outputs = ["loss.jsonl", "loss.png", "lora.safetensors", "lora_kohya.safetensors", "lora_diffusers.safetensors",
               "profile.json"]
    for name in temporary + outputs:
        if os.path.lexists(os.path.join(run, name)):
            os.remove(os.path.join(run, name))
        plant_link(os.path.join(run, name), str(victim))
    for name in ("latents.safetensors.tmp", "text.safetensors.tmp"):
        plant_link(str(cache / name), str(victim))
    saved = tmp_path / "cfg.json"  # config.json a link to a copy: --resume reads it, then replaces the link
    os.rename(os.path.join(run, "config.json"), saved)
    os.symlink(str(saved), os.path.join(run, "config.json"))
    text = saved.read_text()
    ok(call(capfd, "train.py", "--resume", run, "--max-steps", "4", "--validate-every", "4",
            "--validation-prompts", "a|b", "--validation-steps", "1", "--cache-dir", cache, "--profile"))
    assert saved.read_text() == text
    assert victim.read_text() == "precious"
    for name in temporary:
        assert os.readlink(os.path.join(run, name)) == str(victim)  # ignored, never written through
    for name in outputs + ["validation/step_000004.png", "checkpoint.pt", "config.json"]:
        assert os.path.isfile(os.path.join(run, name)) and not os.path.islink(os.path.join(run, name)), name
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["step"] == 4
    assert all(os.path.isfile(cache / n) and not os.path.islink(cache / n)
               for n in ("latents.safetensors", "text.safetensors"))
    assert not leftovers(run) and not leftovers(str(cache))
    # the lock file itself as a link: refused, not followed
    os.remove(os.path.join(run, "train.lock"))
    plant_link(os.path.join(run, "train.lock"), str(victim))
    refused(call(capfd, "train.py", "--resume", run, "--max-steps", "5", "--cache-dir", cache), "train.lock")
    assert victim.read_text() == "precious"


def test_a_second_trainer_on_one_run_folder_is_refused(tmp_path, data_dir, capfd):
    run = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--data", data_dir, "--out", run,
                              "--max-steps", "100000", "--save-every", "0"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 120
        while not (os.path.isfile(os.path.join(run, "loss.jsonl")) and os.path.getsize(os.path.join(run, "loss.jsonl"))):
            assert time.monotonic() < deadline and first.poll() is None, "the first trainer did not start"
            time.sleep(0.2)
        for flags in (["--resume", run], [*FAST, "--data", data_dir, "--out", run, "--overwrite"]):
            refused(call(capfd, "train.py", *flags), "in use by another train.py", f"pid {first.pid}")
        assert first.poll() is None  # still training, undisturbed
    finally:
        first.kill()
        first.wait()
    # its lock died with it: the folder can be replaced now
    ok(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", run, "--overwrite", "--max-steps", "1"))


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, data_dir, capfd, monkeypatch):
    run = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def full_disk(obj, path, *a, **k):  # the second checkpoint meets a full disk half-way
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    refused(call(capfd, "train.py", *FAST, "--data", data_dir, "--out", run, "--max-steps", "6", "--save-every", "2"),
            "checkpoint.pt", "No space left")
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["step"] == 2
    assert not leftovers(run)
    monkeypatch.setattr(torch, "save", real_save)
    ok(call(capfd, "train.py", "--resume", run))  # and the run goes on from it
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["step"] == 6
