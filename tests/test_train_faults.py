"""train.py when things go wrong: a real SIGKILL mid-run and `--resume` reproduce the uninterrupted run bitwise;
out of memory ends with one `error:` line naming the flags that save memory (exit 2, nothing half-written); a data
folder of mostly broken images trains on the good ones and reports the rest, one with none ends with exit 2."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT
import train
from minisd import world
from minisd.unet import UNetModel

torch.set_num_threads(1)
# tiny-random at 32 px (4x4 latents), one image per step: ~0.06 s a step on one CPU thread
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "1",
        "--resolution", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 6, seed=0, style="striped")


def _losses(run: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "loss.jsonl"))]


def _checkpoint_step(run: str) -> int:
    """The step of the run's last complete checkpoint (-1: none yet). checkpoint.pt only ever appears by an atomic
    rename, so what is read is complete; a rename during the read leaves this open file intact (POSIX)."""
    path = os.path.join(run, "checkpoint.pt")
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except FileNotFoundError:
        return -1


def test_sigkill_then_resume_is_exact(tmp_path, data_dir):
    # the LR is constant, so the schedule does not depend on --max-steps: the killed run is started with far more
    # steps than it will live (it can never finish before the kill), and the reference and the resumed run stop
    # a few steps after the step the kill left, whatever that step is
    flags = FAST + ["--data", data_dir, "--seed", "3", "--flip", "0.5", "--caption-dropout", "0.3",
                    "--noise-offset", "0.1", "--network", "dora", "--lr-scheduler", "constant"]
    run = str(tmp_path / "killed")
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", run,
                             "--max-steps", "10000", "--save-every", "2"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_step(run) < 4:  # poll the run folder until a checkpoint beyond step 3 exists
            assert proc.poll() is None, f"train.py ended early:\n{open(tmp_path / 'killed.log').read()}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no handler, no cleanup: as a crash, an OOM killer or a preemption
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    saved = _checkpoint_step(run)
    assert saved >= 4 and not os.path.exists(os.path.join(run, "lora.safetensors"))
    # loss.jsonl may hold steps past the checkpoint (appended every step); the resume must cut them
    assert len(_losses(run)) >= saved
    end = saved + 4

    ref = str(tmp_path / "ref")
    assert train.main(flags + ["--out", ref, "--max-steps", str(end), "--save-every", "0"]) == 0
    assert train.main(["--resume", run, "--max-steps", str(end)]) == 0
    want, got = _losses(ref), _losses(run)
    assert len(want) == end and got == want, (saved, got, want)  # bitwise on the CPU
    a, b = load_file(os.path.join(ref, "lora.safetensors")), load_file(os.path.join(run, "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_memory_is_one_line_with_flags(tmp_path, data_dir, monkeypatch, capsys):
    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(UNetModel, "forward", oom)
    out = tmp_path / "run"
    assert train.main(FAST + ["--data", data_dir, "--out", str(out), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory") and "\n" not in err and "Traceback" not in err, err
    for flag in ("--gradient-checkpointing", "--mixed-precision", "--batch-size", "--grad-accum"):
        assert flag in err, (flag, err)
    assert not (out / "lora.safetensors").exists() and not (out / "lora_kohya.safetensors").exists()


def _png(path, seed):
    a = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), np.uint8)
    Image.fromarray(a).save(path)


def test_broken_images_train_on_the_good_ones(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(2):
        _png(d / f"good{i}.png", i)
        (d / f"good{i}.txt").write_text(f"good picture {i}")
    _png(d / "trunc.png", 9)
    data = (d / "trunc.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])      # header intact, pixels cut
    (d / "garbage.jpg").write_bytes(b"not an image at all")
    (d / "empty.webp").write_bytes(b"")
    Image.new("RGB", (4, 4), "red").save(d / "tiny.png")       # below MIN_SIDE
    out = tmp_path / "run"
    assert train.main(FAST + ["--data", str(d), "--out", str(out), "--max-steps", "3", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "data: 2 images used" in text and "skipped 4 files" in text, text
    for name in ("trunc.png", "garbage.jpg", "empty.webp", "tiny.png"):
        assert name in text, name
    assert len(_losses(str(out))) == 3 and (out / "lora.safetensors").exists()

    for f in ("good0.png", "good1.png"):  # nothing usable left: one error line, exit 2
        os.remove(d / f)
    assert train.main(FAST + ["--data", str(d), "--out", str(tmp_path / "run2"), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no usable images (4 unreadable" in err and "\n" not in err, err
