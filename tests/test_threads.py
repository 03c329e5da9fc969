"""CPU threads: sample.py and train.py default to 1 (torch's one per core made training 11-26x slower on a busy
2-core machine, with the same losses), say so in --help, and refuse 0 or a negative count with one `error:` line."""
import json

import pytest
import torch

import sample
import train
from minisd.train.config import TrainConfig, build_parser, parse_config


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sample_default_is_one_thread_and_help_says_why(capsys):
    assert sample.parse_args(["x"]).threads == 1
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads THREADS torch CPU threads. Default 1" in text and "(default: 1)" in text


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_sample_rejects_bad_threads_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["x", "--threads", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --threads must be at least 1, got {bad}\n"


def test_sample_sets_the_thread_count(restore_threads, tmp_path):
    # a missing model ends main() with its one-line error, after the thread count is set
    assert sample.main(["x", "--model", str(tmp_path / "none"), "--threads", "3", "--device", "cpu"]) == 2
    assert torch.get_num_threads() == 3


def test_train_default_is_one_thread_and_help_says_why():
    assert TrainConfig().threads == 1
    cfg, _ = parse_config([])
    assert cfg.threads == 1
    text = " ".join(build_parser().format_help().split())
    assert "--threads THREADS torch CPU threads. Default 1" in text


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_train_rejects_bad_threads_in_one_line(bad, capsys):
    with pytest.raises(ValueError):  # first, so that a missing check fails here instead of starting a run
        parse_config(["--threads", bad])
    assert train.main(["--threads", bad]) == 2
    assert capsys.readouterr().err == "error: --threads must be >= 1\n"


def test_resume_of_a_run_saved_with_threads_0(tmp_path):
    """Runs written before the default was 1 saved threads = 0 (then: torch's default); they still resume."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"threads": 0, "max_steps": 7}, f)
    cfg, _ = parse_config(["--resume", str(tmp_path)])
    assert (cfg.threads, cfg.max_steps) == (1, 7)
    cfg, _ = parse_config(["--resume", str(tmp_path), "--threads", "2"])
    assert cfg.threads == 2
