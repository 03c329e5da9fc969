"""Stopping train.py cleanly (minisd/train/signals.py): a real SIGINT or SIGTERM to a training subprocess ends it at a
step boundary with a checkpoint at that step, one stderr line with the `--resume` command (the same line in the run
folder's stopped.txt) and exit code 130 / 143; running that very command continues to the losses and adapter of an
uninterrupted run, bitwise. A second signal quits at once, leaving the previous checkpoint intact. An error that ends
the steps (here a NaN loss) also leaves stopped.txt saying why."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
import train
from minisd import world
import minisd.train.loop as loop
from minisd.train.signals import resume_command, write_stop_note

torch.set_num_threads(1)
# tiny-random at 32 px (4x4 latents), one image per step: ~0.06 s a step on one CPU thread. The LR is constant, so
# a run started with --max-steps 10000 and stopped at step k trains its first k steps as a run of any length does.
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "1",
        "--resolution", "32", "--lr-scheduler", "constant"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 6, seed=0, style="striped")


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "loss.jsonl"))]


def _n_lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def _start(tmp_path, run, flags, name):
    """train.py as a subprocess in tmp_path (so the printed command is read from there); stderr to a file."""
    err = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", run],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=err)
    return proc, err


def _wait_for(proc, cond, what, log, timeout=180):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"train.py ended before {what}:\n{open(log).read()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def _checkpoint_step(run) -> int:
    """The step of the run's checkpoint.pt (-1: none yet); it only ever appears by an atomic rename."""
    try:
        return int(torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=True)["step"])
    except FileNotFoundError:
        return -1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_then_resume_is_exact(tmp_path, data_dir, sig, monkeypatch):
    flags = FAST + ["--data", data_dir, "--seed", "3", "--flip", "0.5", "--caption-dropout", "0.3",
                    "--noise-offset", "0.1", "--network", "dora"]
    run = "stopped"  # relative, as a user types it: the printed command must work from the same folder
    loss_log = tmp_path / run / "loss.jsonl"
    proc, err = _start(tmp_path, run, flags + ["--max-steps", "10000", "--save-every", "0"], "stopped")
    try:
        _wait_for(proc, lambda: _n_lines(loss_log) >= 3, "step 3", tmp_path / "stopped.err")
        os.kill(proc.pid, sig)  # a real signal, once
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    text = (tmp_path / "stopped.err").read_text()
    assert proc.returncode == 128 + sig, text  # 130 for SIGINT, 143 for SIGTERM
    assert "Traceback" not in text, text
    stop_lines = [line for line in text.splitlines() if "resume with" in line]
    assert len(stop_lines) == 1, text
    line = stop_lines[0]
    # --save-every 0: the only checkpoint is the one the stop wrote, at the step the loop had reached
    ckpt = torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
    k = int(ckpt["step"])
    assert k >= 3 and len(_losses(tmp_path / run)) == k, (k, text)
    assert line.startswith(f"stopped by {sig.name} at step {k} (checkpoint saved); resume with: python "), line
    assert (tmp_path / run / "stopped.txt").read_text() == line + "\n"
    assert not (tmp_path / run / "lora.safetensors").exists()
    end = k + 3

    # the printed command, from the same folder, with the shorter --max-steps of the reference (in this process:
    # its script is this train.py, its arguments train.main's)
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert cmd[0] == "python" and os.path.samefile(tmp_path / cmd[1], os.path.join(ROOT, "train.py")), cmd
    assert cmd[2:] == ["--resume", run], cmd
    monkeypatch.chdir(tmp_path)
    assert train.main(cmd[2:] + ["--max-steps", str(end)]) == 0
    assert not (tmp_path / run / "stopped.txt").exists()  # the resumed run finished: no stale note

    ref = str(tmp_path / "ref")
    assert train.main(flags + ["--out", ref, "--max-steps", str(end), "--save-every", "0"]) == 0
    want, got = _losses(ref), _losses(tmp_path / run)
    assert len(want) == end and got == want, (k, got, want)  # bitwise on the CPU
    a, b = load_file(os.path.join(ref, "lora.safetensors")), load_file(tmp_path / run / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_second_sigint_quits_at_once(tmp_path, data_dir):
    # --grad-accum 15 makes a step ~1 s long: the first SIGINT is sent just after a step ended, the second once the
    # first is acknowledged, both within one step, which the second must not wait for
    flags = FAST + ["--data", data_dir, "--grad-accum", "15", "--max-steps", "10000", "--save-every", "1"]
    run = str(tmp_path / "run")
    log = tmp_path / "run.err"
    proc, err = _start(tmp_path, run, flags, "run")
    try:
        # a new checkpoint has just been renamed into place: the next step has only begun
        _wait_for(proc, lambda: _checkpoint_step(run) >= 1, "the checkpoint of step 1", log)
        os.kill(proc.pid, signal.SIGINT)
        _wait_for(proc, lambda: "again to quit at once" in log.read_text(), "the first signal's note", log)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        quit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    text = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text
    k = _checkpoint_step(run)
    # the second signal came within step k + 1: no checkpoint at k + 1, the one at k complete and loadable
    assert len(_losses(run)) == k and k >= 1, (k, text)
    line = text.strip().splitlines()[-1]
    assert line.startswith(f"stopped at once by a second SIGINT after step {k}; the checkpoint holds step {k}; "
                           "resume with: python "), text
    assert open(os.path.join(run, "stopped.txt")).read() == line + "\n"
    # the step in flight did not finish (no loss line, no checkpoint for it: a finished step would have ended in a
    # normal stop, "stopped by SIGINT at step k + 1")
    print(f"quit {quit_s:.2f} s after the second SIGINT")


def test_error_mid_training_leaves_a_note(tmp_path, data_dir, monkeypatch, capsys):
    real = loop.training_loss
    calls = []

    def nan_at_step_4(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss
    monkeypatch.setattr(loop, "training_loss", nan_at_step_4)
    run = str(tmp_path / "run")
    assert train.main(FAST + ["--data", data_dir, "--out", run, "--max-steps", "10", "--save-every", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: loss is nan at step 4") and "\n" not in err, err
    note = open(os.path.join(run, "stopped.txt")).read()
    assert note.startswith("stopped by an error: loss is nan at step 4") and note.count("\n") == 1, note
    assert "after step 3; the checkpoint holds step 2; resume with: " in note, note
    assert note.endswith(f"; the checkpoint holds step 2; resume with: {resume_command(run)}\n"), note


def test_full_disk_mid_training_leaves_a_note(tmp_path, data_dir, monkeypatch):
    real = loop.Trainer.append_loss

    def disk_full_at_step_3(self, record):
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", "loss.jsonl")
        real(self, record)
    monkeypatch.setattr(loop.Trainer, "append_loss", disk_full_at_step_3)
    run = str(tmp_path / "run")
    with pytest.raises(OSError):  # how train.py reports it is not this test's concern: the folder's note is
        train.main(FAST + ["--data", data_dir, "--out", run, "--max-steps", "10", "--save-every", "0"])
    note = open(os.path.join(run, "stopped.txt")).read()
    assert note == ("stopped by an error: [Errno 28] No space left on device: 'loss.jsonl' after step 3; no checkpoint "
                    "was written yet, so there is nothing to resume: start the run again\n"), note


def test_signal_outside_the_steps_is_one_line(tmp_path, data_dir, monkeypatch, capsys):
    # SIGTERM while the model loads (before any step): one line, exit 143, no traceback
    real = loop.Trainer.build_model

    def build_then_term(self):
        real(self)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(loop.Trainer, "build_model", build_then_term)
    assert train.main(FAST + ["--data", data_dir, "--out", str(tmp_path / "run"), "--max-steps", "3"]) == 143
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stopped by SIGTERM outside the training steps") and "\n" not in err, err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main put the handlers back


@pytest.mark.parametrize("phase", ["render", "steps"])
def test_pretrain_stops_with_one_line(tmp_path, phase):
    """The world pretraining keeps no checkpoints: Ctrl-C ends it with one line and nothing at --out. "render": a
    terminal's Ctrl-C (SIGINT to the whole process group, render workers included) while the pool is drawn; "steps":
    SIGTERM to the process during the autoencoder's steps."""
    out = tmp_path / "m"
    pool = ["--pool", "200000", "--workers", "2"] if phase == "render" else ["--pool", "16", "--workers", "1"]
    cmd = [sys.executable, "-m", "minisd.world.pretrain", *pool, "--vae-styled", "0", "--vae-steps", "100000",
           "--vae-batch", "2", "--steps", "2", "--batch", "2", "--out", str(out), "--device", "cpu"]
    log = tmp_path / "pretrain.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = "pretrain settings" if phase == "render" else "pool: "
            _wait_for(proc, lambda: ready in log.read_text(), repr(ready), log)
            time.sleep(0.5)  # into the rendering / the steps
            if phase == "render":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    sig = signal.SIGINT if phase == "render" else signal.SIGTERM
    assert proc.returncode == 128 + sig and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: pretraining stopped by {sig.name} after "), text
    assert f"nothing was written to {out}" in errors[0]
    assert not out.exists() and os.listdir(tmp_path) == ["pretrain.log"]


def test_stop_note_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / f"stopped.txt.{os.getpid()}.tmp")   # a planted temporary file
    os.symlink(victim, run / "stopped.txt")                      # and a planted note
    write_stop_note(str(run), "stopped by SIGINT at step 3")
    assert victim.read_text() == "keep me"
    note = run / "stopped.txt"
    assert not note.is_symlink() and note.read_text() == "stopped by SIGINT at step 3\n"
    assert sorted(os.listdir(run)) == ["stopped.txt"]
