"""Never destroy what the user has (issue 15), convert.py and sample.py, run as the commands they are: an existing
destination is refused unless --overwrite; --overwrite replaces only an earlier output of the same kind, never the
source, a folder holding it or the working directory; a link planted at any temporary or destination name is never
written through; output paths are checked before any work; a full disk ends with one line and keeps what was there.
Each refusal is judged as the audit did: non-zero exit, exactly one `error:` line, no traceback, nothing written or
left, nothing there destroyed. The primitives of minisd/formats/safe_write.py are tested in process at the end."""
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import randomize
from safe_helpers import call, leftovers, ok, plant_link, refused, run_cmd, tree
from minisd import adapters
from minisd import model as model_module
from minisd.formats import export
from minisd.config import TINY
from minisd.formats.export import export_diffusers, export_single_file
from minisd.formats.safe_write import RunLock, WriteError, atomic_path, is_io_error
from minisd.model import StableDiffusion, is_minisd_folder, save_model
from minisd.trainer import TARGETS

torch.set_num_threads(1)
SAMPLE = ["--model", "tiny-random", "--steps", "1", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny minisd folder M, its single file S, its diffusers folder D and a LoRA file L for it."""
    root = tmp_path_factory.mktemp("src")
    torch.manual_seed(0)
    model = randomize(StableDiffusion(TINY), 0, 0.05)
    save_model(model, str(root / "M"))
    export_single_file(model, str(root / "M"), str(root / "S.safetensors"))
    export_diffusers(model, str(root / "D"), folder=str(root / "M"))
    adapters.inject(model.unet, "lora", TARGETS["attn"], rank=2, alpha=2)
    adapters.save_adapter(model, str(root / "L.safetensors"))
    return {k: str(root / v) for k, v in (("M", "M"), ("S", "S.safetensors"), ("D", "D"), ("L", "L.safetensors"))}


def read_only(monkeypatch, folder: str) -> None:
    """os.access says `folder` is not writable, as it does for a user without write permission (these tests run as
    root, for whom permission bits do not bind)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.path.realpath(p) == os.path.realpath(
        folder) and mode & os.W_OK else real(p, mode, *a, **k))


def full_disk(writer):
    """`writer(obj, path, ...)` as on a full disk: some bytes reach the file, then OSError(ENOSPC)."""
    def write(obj, path, *args, **kw):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def user_folder(path) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("the user's")
    return str(path)


# ----------------------------------------------------------------------------------------------- convert.py
def test_convert_out_dot_never_deletes_the_working_directory(tmp_path, src, capfd):
    work = user_folder(tmp_path / "work")
    before = tree(work)
    # the audit's case, as a real process in its working directory
    refused(run_cmd("convert.py", src["S"], "--out", ".", cwd=work), "exists", "--overwrite")
    refused(run_cmd("convert.py", src["S"], "--out", ".", "--overwrite", cwd=work), "working directory")
    # even when the working directory is a minisd folder, the kind --overwrite may replace
    mine = str(tmp_path / "model")
    shutil.copytree(src["M"], mine)
    refused(call(capfd, "convert.py", src["S"], "--out", ".", "--overwrite", cwd=mine), "working directory")
    refused(call(capfd, "convert.py", src["S"], "--out", tmp_path, "--overwrite", cwd=mine), "working directory")
    assert tree(work) == before and is_minisd_folder(mine) and not leftovers(str(tmp_path))


@pytest.mark.parametrize("how", ["out", "diffusers", "single-file", "lora-kohya"])
def test_convert_existing_destination_refused(tmp_path, src, how, capfd):
    dest = user_folder(tmp_path / "dest") if how in ("out", "diffusers") else str(tmp_path / "dest.safetensors")
    if how not in ("out", "diffusers"):
        with open(dest, "wb") as f:
            f.write(b"the user's file")
    args = {"out": [src["S"], "--out", dest], "diffusers": [src["M"], "--to", "diffusers", dest],
            "single-file": [src["M"], "--to", "single-file", dest],
            "lora-kohya": [src["M"], "--lora", src["L"], "--to", "lora-kohya", dest]}[how]
    before = tree(str(tmp_path))
    refused(call(capfd, "convert.py", *args), "exists", "--overwrite")
    assert tree(str(tmp_path)) == before


def test_convert_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path, src, capfd):
    out = str(tmp_path / "O")
    ok(call(capfd, "convert.py", src["S"], "--out", out))
    ok(call(capfd, "convert.py", src["S"], "--out", out, "--overwrite", "--dtype", "fp16"))
    assert is_minisd_folder(out) and not leftovers(str(tmp_path))
    single = str(tmp_path / "s.safetensors")
    shutil.copy(src["S"], single)
    ok(call(capfd, "convert.py", src["M"], "--to", "single-file", single, "--overwrite", "--dtype", "fp16"))
    assert os.path.getsize(single) < os.path.getsize(src["S"])  # replaced by the fp16 file
    diff = str(tmp_path / "D")
    shutil.copytree(src["D"], diff)
    ok(call(capfd, "convert.py", src["M"], "--to", "diffusers", diff, "--overwrite"))
    # a folder of another kind, or of the kind with something of the user's inside, is never replaced
    carded = str(tmp_path / "carded")
    shutil.copytree(src["M"], carded)
    with open(os.path.join(carded, "README.md"), "w") as f:
        f.write("model card")
    before = tree(str(tmp_path))
    refused(call(capfd, "convert.py", src["S"], "--out", diff, "--overwrite"), "minisd folder", "config.json")
    refused(call(capfd, "convert.py", src["M"], "--to", "diffusers", out, "--overwrite"), "diffusers folder")
    refused(call(capfd, "convert.py", src["S"], "--out", carded, "--overwrite"), "README.md")
    refused(call(capfd, "convert.py", src["S"], "--out", user_folder(tmp_path / "u"), "--overwrite"), "minisd folder")
    assert {k: v for k, v in tree(str(tmp_path)).items() if not k.startswith("u")} == before


def test_convert_overwrite_never_the_source_or_a_folder_holding_it(tmp_path, src, capfd):
    shutil.copytree(src["D"], tmp_path / "D")
    shutil.copytree(src["M"], tmp_path / "P" / "M")
    d, m = str(tmp_path / "D"), str(tmp_path / "P" / "M")
    before = tree(str(tmp_path))
    refused(call(capfd, "convert.py", d, "--out", d, "--overwrite"), "input")
    refused(call(capfd, "convert.py", m, "--to", "diffusers", str(tmp_path / "P"), "--overwrite"), "holds an input")
    refused(call(capfd, "convert.py", m, "--to", "single-file", os.path.join(m, "unet.safetensors"), "--overwrite"),
            "input")
    refused(call(capfd, "convert.py", m, "--lora", src["L"], "--out", m, "--overwrite"), "input")
    assert tree(str(tmp_path)) == before


def test_convert_planted_links_are_never_written_through(tmp_path, src, capfd):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    single, lora = str(tmp_path / "o" / "x.safetensors"), str(tmp_path / "o" / "l.safetensors")
    plant_link(single + ".tmp", str(victim))  # the temporary names of earlier versions
    plant_link(lora + ".tmp", str(victim))
    ok(call(capfd, "convert.py", src["M"], "--to", "single-file", single))
    ok(call(capfd, "convert.py", src["M"], "--lora", src["L"], "--to", "lora-kohya", lora))
    os.remove(single)
    plant_link(single, str(victim))  # a link at the destination itself: --overwrite replaces the link
    ok(call(capfd, "convert.py", src["M"], "--to", "single-file", single, "--overwrite"))
    assert not os.path.islink(single) and os.path.getsize(single) > 1000
    for folder_flag in (["--out"], ["--to", "diffusers"]):  # a folder destination that is a link is refused
        link = str(tmp_path / ("linked" + str(len(folder_flag))))
        os.symlink(user_folder(tmp_path / ("target" + str(len(folder_flag)))), link)
        refused(call(capfd, "convert.py", src["M" if len(folder_flag) == 2 else "S"], *folder_flag, link, "--overwrite"),
                "symbolic link")
    assert victim.read_text() == "precious" and os.readlink(single + ".tmp") == str(victim)
    assert tree(str(tmp_path / "target1")) == tree(str(tmp_path / "target2")) == {"notes.txt": b"the user's"}


def test_convert_output_paths_checked_before_any_work(tmp_path, src, capfd, monkeypatch):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    ro = user_folder(tmp_path / "ro")
    before = tree(str(tmp_path))
    for args, words in ((["--out", str(afile)], ["is a file"]),
                        (["--out", str(afile / "m")], ["is a file, not a folder"]),
                        (["--to", "single-file", str(tmp_path)], ["is a folder"]),
                        (["--to", "diffusers", str(afile)], ["is a file"])):
        p = call(capfd, "convert.py", src["M"] if args[0] == "--to" else src["S"], *args)
        refused(p, *words)
        assert "source tensors" not in p.stderr  # refused before the model was read
    read_only(monkeypatch, ro)
    p = call(capfd, "convert.py", src["S"], "--out", os.path.join(ro, "m"))
    refused(p, "not writable")
    assert "source tensors" not in p.stderr and tree(str(tmp_path)) == before


@pytest.mark.parametrize("how", ["single-file", "out"])
def test_convert_full_disk_keeps_what_was_there(tmp_path, src, how, capfd, monkeypatch):
    dest = str(tmp_path / ("x.safetensors" if how == "single-file" else "O"))
    if how == "single-file":
        shutil.copy(src["S"], dest)
        args = [src["M"], "--to", "single-file", dest, "--overwrite"]
    else:
        shutil.copytree(src["M"], dest)
        args = [src["S"], "--out", dest, "--overwrite"]
    before = tree(str(tmp_path))
    for module in (export, model_module):  # the writers, as they imported save_file
        monkeypatch.setattr(module, "save_file", full_disk(module.save_file))
    refused(call(capfd, "convert.py", *args), "No space left", "kept")
    assert tree(str(tmp_path)) == before  # old output whole, no partial file, no temporary folder


# ----------------------------------------------------------------------------------------------- sample.py
def test_sample_existing_output_refused_unless_overwrite(tmp_path, capfd):
    out = str(tmp_path / "o.png")
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", out))
    before = tree(str(tmp_path))
    refused(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", out, "--seed", "1"), "exists", "--overwrite")
    # a batch: every output name is checked before any work, so o-0.png is not written either
    with open(tmp_path / "b-1.png", "wb") as f:
        f.write(b"mine")
    p = call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / "b.png"), "--batch", "2")
    refused(p, "b-1.png", "exists")
    assert "loaded" not in p.stderr and not os.path.exists(tmp_path / "b-0.png")
    assert tree(str(tmp_path)) == {**before, "b-1.png": b"mine"}
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", out, "--seed", "1", "--overwrite"))
    assert tree(str(tmp_path))["o.png"] != before["o.png"] and not leftovers(str(tmp_path))


def test_sample_never_overwrites_an_input(tmp_path, capfd):
    init = str(tmp_path / "init.png")
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", init))
    before = tree(str(tmp_path))
    refused(call(capfd, "sample.py", "a cat", *SAMPLE, "--init", init, "--out", init, "--overwrite"), "input")
    prompts = tmp_path / "o-0.png"  # a prompts file that happens to sit at an output name (line 0 -> OUT-0.png)
    prompts.write_text("a cat\n")
    refused(call(capfd, "sample.py", *SAMPLE, "--prompts", str(prompts), "--out", str(tmp_path / "o.png"), "--overwrite"),
            "input")
    assert tree(str(tmp_path)) == {**before, "o-0.png": b"a cat\n"}


def test_sample_planted_links_are_never_written_through(tmp_path, capfd):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("o.png.tmp", "b-0.png.tmp", "b-1.png.tmp"):  # the temporary names of earlier versions
        plant_link(str(tmp_path / name), str(victim))
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / "o.png")))
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / "b.png"), "--batch", "2"))
    os.remove(tmp_path / "o.png")
    plant_link(str(tmp_path / "o.png"), str(victim))
    refused(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / "o.png")), "exists")
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / "o.png"), "--overwrite"))
    assert victim.read_text() == "precious" and not os.path.islink(tmp_path / "o.png")
    assert all(os.path.isfile(tmp_path / n) for n in ("b-0.png", "b-1.png"))


def test_sample_output_paths_checked_before_any_work(tmp_path, capfd, monkeypatch):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "a.txt").write_text("x")
    ro = user_folder(tmp_path / "ro")
    before = tree(str(tmp_path))
    for out, words in (("dir.png", ["is a folder"]), ("a.txt/x.png", ["is a file, not a folder"])):
        p = call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / out))
        refused(p, *words)
        assert "loaded" not in p.stderr
    read_only(monkeypatch, ro)
    p = call(capfd, "sample.py", "a cat", *SAMPLE, "--out", os.path.join(ro, "x.png"))
    refused(p, "not writable")
    assert tree(str(tmp_path)) == before


def test_sample_full_disk_leaves_no_partial_png(tmp_path, capfd, monkeypatch):
    out = str(tmp_path / "o.png")
    ok(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", out))
    before = tree(str(tmp_path))
    monkeypatch.setattr(Image.Image, "save", full_disk(Image.Image.save))
    refused(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", out, "--overwrite", "--seed", "2"),
            "No space left", "kept")
    refused(call(capfd, "sample.py", "a cat", *SAMPLE, "--out", str(tmp_path / "new.png")), "No space")
    assert tree(str(tmp_path)) == before


# ----------------------------------------------------------------------------------------------- primitives
def test_atomic_path_keeps_the_old_file_on_failure_and_replaces_links(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(WriteError, match="No space left"):
        with atomic_path(str(dest)) as tmp:
            open(tmp, "wb").write(b"half")
            raise OSError(28, "No space left on device")
    with pytest.raises(ValueError):  # not a storage error: passed on as it is, partial file removed too
        with atomic_path(str(dest)) as tmp:
            open(tmp, "wb").write(b"half")
            raise ValueError("bug")
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.remove(dest)
    os.symlink(victim, dest)
    with atomic_path(str(dest)) as tmp:
        open(tmp, "wb").write(b"new")
    assert dest.read_bytes() == b"new" and not os.path.islink(dest) and victim.read_bytes() == b"precious"


def test_run_lock_refuses_a_second_holder_and_ignores_a_dead_one(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(WriteError, match=f"in use by another train.py \\(pid {os.getpid()}\\)"):
            RunLock(str(tmp_path)).acquire()
        assert RunLock.holder(str(tmp_path)) == str(os.getpid())
    assert RunLock.holder(str(tmp_path)) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / RunLock.NAME).write_text(dead.stdout)  # a lock file left by a process that is gone
    with RunLock(str(tmp_path)):
        assert (tmp_path / RunLock.NAME).read_text().strip() == str(os.getpid())


def test_storage_errors_of_every_writer_are_recognised():
    """What a full disk looks like from each writer (Linux's /dev/full answers every write with ENOSPC): torch.save
    reports it as a RuntimeError of its C++ writer, pillow and Python as OSError; each becomes one WriteError line."""
    errors = []
    for write in (lambda: torch.save({"a": torch.zeros(1000)}, "/dev/full"),
                  lambda: Image.new("RGB", (256, 256)).save("/dev/full", format="PNG")):
        with pytest.raises(Exception) as e:
            write()
        errors.append(e.value)
    assert isinstance(errors[0], RuntimeError) and isinstance(errors[1], OSError)
    assert all(is_io_error(e) for e in errors) and not is_io_error(ValueError("a bug"))


def test_pretrain_out_is_checked_before_training(tmp_path, capfd):
    """train.py --from-scratch (minisd/world/pretrain.py) refuses an existing --out before hours of training."""
    mine = user_folder(tmp_path / "mine")
    before = tree(str(tmp_path))
    p = call(capfd, "train.py", "--from-scratch", "--out", mine, "--overwrite", "--device", "cpu")
    refused(p, "minisd folder")
    assert "pretrain settings" not in p.stdout and tree(str(tmp_path)) == before
