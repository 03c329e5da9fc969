"""`train.py --profile`: the stage timer adds up (stages + other = step, warm-up skipped, off = no-op), a profiled
run prints the table and writes profile.json with every stage of the step, and profiling leaves the losses as
they are (bitwise)."""
import json
import os
import time
from contextlib import nullcontext

import torch

import train
from minisd import world
from minisd.perf.profiler import STAGES, StageTimer

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "1",
        "--resolution", "32", "--save-every", "0"]


def test_stage_timer_adds_up():
    prof = StageTimer(True, "cpu", warmup=1)
    for i in range(3):
        with prof.step():
            for _ in range(2):  # a stage entered twice in a step (grad_accum) accumulates
                with prof.stage("data"):
                    time.sleep(0.005 if i else 0.1)  # the slow first step is the warm-up: left out
            with prof.stage("backward"):
                time.sleep(0.02)
            time.sleep(0.005)  # outside every stage: "other"
    s = prof.summary()
    assert (s["steps_measured"], s["warmup_skipped"]) == (2, 1)
    assert list(s["stages"]) == ["data", "backward", "other"]  # trainer order, "other" last
    ms = {k: v["ms_per_step"] for k, v in s["stages"].items()}
    # lower bounds are sleep()'s promise; upper ones generous for a loaded machine, yet below the
    # 70 ms "data" would average with the warm-up step included
    assert 10 <= ms["data"] < 60 and 20 <= ms["backward"] < 80 and 5 <= ms["other"] < 60, ms
    assert abs(sum(ms.values()) - s["step_ms"]) < 1e-6
    assert abs(sum(v["percent"] for v in s["stages"].values()) - 100) < 1e-6
    assert "backward" in prof.table() and "warm-up skipped" in prof.table()

    off = StageTimer(False, "cpu")
    assert isinstance(off.step(), nullcontext) and isinstance(off.stage("data"), nullcontext)
    with off.step(), off.stage("data"):
        pass
    assert off.records == [] and StageTimer(True).stage("data").__class__ is nullcontext  # outside a step


def test_profiled_run_table_json_and_same_losses(tmp_path, capsys):
    data = world.write_folder(str(tmp_path / "data"), 4, seed=0, style="striped")
    flags = FAST + ["--data", data, "--max-steps", "6", "--grad-accum", "2", "--train-text-encoder"]
    plain, prof = tmp_path / "plain", tmp_path / "prof"
    assert train.main(flags + ["--out", str(plain)]) == 0
    assert not (plain / "profile.json").exists()
    capsys.readouterr()
    assert train.main(flags + ["--out", str(prof), "--profile"]) == 0
    text = capsys.readouterr().out
    assert "profile: 3 steps measured (3 warm-up skipped)" in text, text
    for stage in STAGES:
        assert stage in text
    read = lambda run: [json.loads(line)["loss"] for line in open(os.path.join(run, "loss.jsonl"))]
    assert read(prof) == read(plain)  # timing touches no RNG and no tensor

    s = json.load(open(prof / "profile.json"))
    assert list(s["stages"]) == list(STAGES) + ["other"]
    staged = sum(s["stages"][k]["ms_per_step"] for k in STAGES)
    # the named stages are nearly the whole step on the CPU (the rest: noise draws, the loss, .item())
    assert 0.6 * s["step_ms"] <= staged <= s["step_ms"] * (1 + 1e-9), s
    assert all(s["stages"][k]["ms_per_step"] > 0 for k in STAGES), s
