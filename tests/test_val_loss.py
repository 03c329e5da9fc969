"""Held-out validation loss: the same value for the same weights (fixed ε_z, t, ε), no effect on the training losses
or any RNG, a --val-fraction split that keeps the held-out images out of training (the same split every time),
drawn in loss.png, and its flags refused where they would be ignored. (Identical across kill + --resume:
tests/test_dreambooth.py::test_dreambooth_resume_exact_with_val_loss.)"""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from minisd.train.val_loss import VAL_SEED  # noqa: E402
from minisd.trainer import Draws, MicroBatch, training_loss  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "2",
        "--resolution", "32", "--save-every", "0", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return (world.write_folder(str(root / "train"), 6, seed=0, style="outlined"),
            world.write_folder(str(root / "val"), 3, seed=5, split="heldout", style="outlined"))


def _trainer(run, data, *flags):
    cfg, _ = parse_config(FAST + ["--data", data, "--out", str(run)] + list(flags))
    return Trainer(cfg, str(run), log=lambda s: None)


def test_fixed_draws_and_no_disturbance(tmp_path, dirs):
    data, val = dirs
    t = _trainer(tmp_path / "a", data, "--max-steps", "4", "--val-loss-every", "2", "--val-data", val,
                 "--dropout", "0.3")
    states = (t.gen.get_state(), torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    v1, v2 = t.val_loss(), t.val_loss()
    assert v1 == v2  # same weights, same draws: the same number
    after = (t.gen.get_state(), torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert all(torch.equal(a, b) for a, b in zip(states[:2], after[:2]))
    assert (states[2] == after[2]).all() and states[3] == after[3]
    # the value is the training loss of the held-out images under the generator seeded VAL_SEED + seed
    mb = t.val_loss.batches
    g = Draws(torch.Generator().manual_seed(VAL_SEED + 0))
    t.model.eval()
    with torch.no_grad():
        hand = sum(len(b.ids[0]) * training_loss(t.model, t.noise, MicroBatch(moments=b.moments, ids=b.ids),
                                                 g).item() for b in mb) / 3
    t.model.train()
    assert abs(hand - v1) <= 1e-6 * v1, (hand, v1)
    with_val = t.run()["losses"]
    plain = _trainer(tmp_path / "b", data, "--max-steps", "4", "--dropout", "0.3").run()["losses"]
    assert with_val == plain  # the run's losses do not see the validation loss
    rows = [json.loads(line) for line in open(tmp_path / "a" / "loss.jsonl")]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4] and vals[0] != vals[1] != v1
    png = np.asarray(Image.open(tmp_path / "a" / "loss.png").convert("RGB")).reshape(-1, 3)
    assert ((png[:, 0] == 210) & (png[:, 1] == 40) & (png[:, 2] == 40)).any()  # the red validation curve


def test_fraction_split(tmp_path, dirs):
    data, _ = dirs
    a = _trainer(tmp_path / "a", data, "--val-loss-every", "1", "--val-fraction", "0.34")
    b = _trainer(tmp_path / "b", data, "--val-loss-every", "1", "--val-fraction", "0.34")
    assert len(a.data.examples) == 4 and len(a.data.slots) == 4 and a.val_loss.n == 2
    kept = {ex.path for ex in a.data.examples}
    assert kept == {ex.path for ex in b.data.examples}                  # the same split every time
    every = {os.path.join(data, f"{i:05d}.png") for i in range(6)}
    assert len(every - kept) == 2                                       # the held-out two, out of training
    assert a.val_loss() == b.val_loss()


@pytest.mark.parametrize("flags, message", [
    (["--val-data", "x"], "would be ignored without --val-loss-every"),
    (["--val-fraction", "0.2"], "would be ignored without --val-loss-every"),
    (["--val-loss-every", "5"], "exactly one of --val-data DIR and --val-fraction F"),
    (["--val-loss-every", "5", "--val-data", "x", "--val-fraction", "0.1"], "exactly one of"),
    (["--val-loss-every", "5", "--val-fraction", "1.5"], "--val-fraction must be within"),
])
def test_flags_refused(tmp_path, dirs, capsys, flags, message):
    rc = train.main(FAST + ["--data", dirs[0], "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and message in err and "\n" not in err, err
