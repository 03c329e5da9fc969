"""Data-parallel training (minisd/train/distributed.py) on the CPU: two gloo processes started by the test.

  * 2 ranks x batch B train as 1 process x batch 2B with --noise-streams sample: the same losses and adapter weights
    (plain loader with grad accumulation and clipping by the global norm; aspect-ratio buckets with uneven and empty
    slices and caches in a --cache-dir that rank 0 writes), within tolerances measured below;
  * a resume at the same world size repeats the uninterrupted run bitwise; at another world size it is refused with
    one line; rank 0 alone writes the files; torchrun + train.py runs end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.train import distributed  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--resolution", "64",
        "--rank", "2", "--targets", "attn", "--lr", "3e-3"]
PLAIN = ["--grad-accum", "2", "--max-grad-norm", "0.01", "--flip", "0.3", "--caption-dropout", "0.2"]
# measured (2-vCPU VM, torch 2.13 CPU, 3 steps each): plain max |Δloss| 1.2e-7, max |Δw| 1.3e-7; buckets 0 and 3.2e-7 -
# float sums in another order (the ranks' gradients are added after their backwards, one process adds them inside
# its own), which Adam's normalised step carries into the weights. Bounds: about 6x the largest
LOSS_TOL, WEIGHT_TOL = 1e-6, 2e-6


def bucket_folder(path: str) -> str:
    """Five captioned images of four aspect ratios (buckets with 1-2 images: uneven and empty rank slices)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 64), (96, 48), (48, 96), (64, 64), (80, 40)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
        open(os.path.join(path, f"{i}.txt"), "w").write(f"a picture number {i}")
    return path


def _run(flags: list[str], out: str, resume: bool = False) -> dict | None:
    cfg, _ = parse_config(FAST + flags + (["--resume", out] if resume else ["--out", out]))
    t = Trainer(cfg, out, log=lambda s: None)
    if not resume and distributed.current().is_main:  # what train.py writes, and --resume reads
        json.dump(cfg.to_dict(), open(os.path.join(out, "config.json"), "w"))
    if resume:
        t.load_checkpoint()
    return t.run()


def _worker(rank: int, world: int, store: str, jobs: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a file rendezvous (no port to pick, so no port another process can take first); then what torchrun runs
    torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    d = distributed.init_from_env("cpu")
    try:
        for flags, out, resume in jobs:
            if flags == "checks":
                _checks(d, out)
            else:
                _run(flags, out, resume)
    finally:
        distributed.shutdown()


def _checks(d, out: str) -> None:
    """The collectives on their own, results in out/checks_<rank>.json."""
    res = {}
    # reduce_step: a gradient on one rank is summed with zeros; a tensor without one on every rank keeps None
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    a.grad = torch.full((3,), 1.0 + d.rank)
    if d.rank == 1:
        b.grad = torch.full((3,), 5.0)
    loss = d.reduce_step([a, b, c], 0.25 * (d.rank + 1))
    res["reduce"] = [a.grad.tolist(), b.grad.tolist(), c.grad is None, loss]
    # on_main: rank 0's result reaches every rank; its error is one line on the others
    res["result"] = d.on_main(lambda: f"from rank {d.rank}")
    try:
        d.on_main(lambda: 1 / 0)
    except distributed.DistError as e:
        res["error"] = str(e)
    except ZeroDivisionError:
        res["error"] = "ZeroDivisionError on rank 0"
    os.makedirs(out, exist_ok=True)
    json.dump(res, open(os.path.join(out, f"checks_{d.rank}.json"), "w"))


def spawn(jobs: list, store: str, world: int = 2) -> None:
    mp.spawn(_worker, args=(world, store, jobs), nprocs=world, join=True)


def losses(out: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "loss.jsonl"))]


def weights(out: str) -> dict:
    return load_file(os.path.join(out, "lora.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process runs, started once: plain (3 steps), plain stopped at 1 and resumed to 3, buckets (3), the
    collectives on their own."""
    root = tmp_path_factory.mktemp("dist")
    data = world.write_folder(str(root / "world"), 6, seed=0, style="striped")
    buckets = bucket_folder(str(root / "bucket_data"))
    plain = ["--data", data, "--batch-size", "2", "--save-every", "0"] + PLAIN
    bflags = ["--data", buckets, "--batch-size", "2", "--buckets", "--bucket-step", "16", "--save-every", "0",
              "--max-steps", "3", "--max-grad-norm", "0", "--cache-latents", "--cache-text", "--cache-dir",
              str(root / "cache")]  # rank 0 writes the caches, rank 1 reads them
    spawn([(plain + ["--max-steps", "3"], str(root / "d_plain"), False),
           (plain + ["--max-steps", "1"], str(root / "d_half"), False),
           (plain + ["--max-steps", "3"], str(root / "d_half"), True),
           (bflags, str(root / "d_buckets"), False),
           ("checks", str(root / "checks"), False)], str(root / "store"))
    return dict(root=root, data=data, buckets=buckets, plain=plain, bflags=bflags)


def test_two_ranks_equal_one_process_with_twice_the_batch(runs, tmp_path):
    single = ["--data", runs["data"], "--batch-size", "4", "--noise-streams", "sample", "--save-every", "0",
              "--max-steps", "3"] + PLAIN
    _run(single, str(tmp_path / "one"))
    a, b = losses(str(runs["root"] / "d_plain")), losses(str(tmp_path / "one"))
    wa, wb = weights(str(runs["root"] / "d_plain")), weights(str(tmp_path / "one"))
    dl = max(abs(x - y) for x, y in zip(a, b))
    dw = max((wa[k] - wb[k]).abs().max().item() for k in wb)
    print(f"plain: losses {a}, max |Δloss| {dl:.2e}, max |Δw| {dw:.2e}")
    assert len(a) == len(b) == 3 and dl <= LOSS_TOL and dw <= WEIGHT_TOL
    # the adapters moved (a test of equal nothing would pass too)
    assert max(wb[k].abs().max().item() for k in wb if "lora_up" in k) > 1e-4
    # the one-process run's own batch stream differs (so the per-sample streams are what makes them equal)
    _run(single[:4] + ["--noise-streams", "batch", "--max-steps", "1"] + PLAIN, str(tmp_path / "batch"))
    assert abs(losses(str(tmp_path / "batch"))[0] - b[0]) > 1e-4


def test_buckets_with_uneven_slices_equal_one_process(runs, tmp_path):
    single = [f if f != "2" else "4" for f in runs["bflags"]] + ["--noise-streams", "sample"]
    _run(single, str(tmp_path / "one"))
    a, b = losses(str(runs["root"] / "d_buckets")), losses(str(tmp_path / "one"))
    wa, wb = weights(str(runs["root"] / "d_buckets")), weights(str(tmp_path / "one"))
    dl = max(abs(x - y) for x, y in zip(a, b))
    dw = max((wa[k] - wb[k]).abs().max().item() for k in wb)
    print(f"buckets: losses {a}, max |Δloss| {dl:.2e}, max |Δw| {dw:.2e}")
    assert len(a) == 3 and dl <= LOSS_TOL and dw <= WEIGHT_TOL
    assert sorted(os.listdir(os.path.join(runs["root"], "cache"))) == ["latents.safetensors", "text.safetensors"]


def test_resume_at_same_world_size_is_exact_and_other_size_is_refused(runs, tmp_path, capsys):
    full, half = str(runs["root"] / "d_plain"), str(runs["root"] / "d_half")
    assert losses(half) == losses(full)  # bitwise
    wf, wh = weights(full), weights(half)
    assert all(torch.equal(wf[k], wh[k]) for k in wf)
    ck = torch.load(os.path.join(half, "checkpoint.pt"), weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    # rank 0 alone wrote: one line per step, no temporary files left
    assert len(losses(full)) == 3 and not [f for f in os.listdir(full) if f.endswith(".tmp")]
    rc = train.main(["--resume", half, "--max-steps", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err and "2 process(es)" in err, err


def test_batch_streams_refused_with_two_processes():
    d = distributed.Dist(rank=0, world=2)
    with pytest.raises(distributed.DistError, match="noise-streams batch"):
        distributed.shard(object(), d, "batch")


def test_torchrun_train_py(runs, tmp_path):
    """The command of the README: torchrun starts train.py twice; the run equals the spawned one (same flags)."""
    out = str(tmp_path / "tr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py")] + FAST + runs["plain"] + ["--max-steps", "2", "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("train config:") == 1  # rank 0 alone prints
    assert losses(out) == losses(str(runs["root"] / "d_plain"))[:2]
    for f in ("lora.safetensors", "lora_kohya.safetensors", "checkpoint.pt", "config.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, f)), f


def test_collectives_sum_gradients_and_carry_rank_0s_result_and_error(runs):
    r0, r1 = (json.load(open(runs["root"] / "checks" / f"checks_{r}.json")) for r in (0, 1))
    assert r0["reduce"] == r1["reduce"] == [[3.0] * 3, [5.0] * 3, True, 0.75]
    assert r0["result"] == r1["result"] == "from rank 0"
    assert r0["error"] == "ZeroDivisionError on rank 0" and r1["error"] == "rank 0: division by zero"


def test_one_process_options_refused_under_torchrun(tmp_path, monkeypatch):
    """--fused-backward and --cuda-graph step or record inside the backward, before the all-reduce: refused."""
    monkeypatch.setattr(distributed, "_CURRENT", distributed.Dist(rank=0, world=2))
    cfg, _ = parse_config(FAST + ["--fused-backward", "--max-grad-norm", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="need one process"):
        Trainer(cfg, str(tmp_path), log=lambda s: None)
