"""--fused-backward (minisd/train/fused.py): the same weights after N steps as the unfused optimizer (AdamW and
AdamW8bit, two parameter groups with their own LRs, an LR warmup), the live gradient bytes counted at every
post-accumulate-grad event (all of them at once unfused, one tensor's fused), and one-line refusals where it cannot
be exact."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.adapters import adapter_state_dict  # noqa: E402
from minisd.train.config import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402

torch.set_num_threads(1)
FLAGS = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--resolution", "64",
         "--batch-size", "2", "--rank", "2", "--targets", "attn", "--lr", "3e-3", "--train-text-encoder",
         "--te-lr", "1e-3", "--warmup-steps", "2", "--max-grad-norm", "0", "--save-every", "0", "--max-steps", "3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 4, seed=0, style="striped")


def _trainer(tmp_path, data_dir, *flags):
    cfg, _ = parse_config(FLAGS + ["--data", data_dir, "--out", str(tmp_path)] + list(flags))
    return Trainer(cfg, str(tmp_path), log=lambda s: None)


# adamw8bit at rank 64: the 64x64 adapters reach its 8-bit state (min_8bit_size 4096), the rest keep fp32 state
# and with gradient checkpointing (the hooks fire inside the recomputing backward)
@pytest.mark.parametrize("optimizer, rank, more", [("adamw", "2", []), ("adamw8bit", "64", []),
                                                   ("adamw", "2", ["--gradient-checkpointing"])])
def test_fused_equals_unfused_and_holds_one_gradient_at_a_time(tmp_path, data_dir, optimizer, rank, more):
    runs = {}
    for fused in (False, True):
        t = _trainer(tmp_path / str(fused), data_dir, "--optimizer", optimizer, "--rank", rank, *more,
                     *(["--fused-backward"] if fused else []))
        # count the gradient bytes alive whenever a tensor's gradient completes (the fused hook counts its own)
        peak = [0]
        if not fused:
            def count(p, t=t):
                peak[0] = max(peak[0], sum(q.grad.nbytes for q in t.params if q.grad is not None))
            for p in t.params:
                p.register_post_accumulate_grad_hook(count)
        losses = t.run()["losses"]
        runs[fused] = (losses, {k: v.detach().clone() for k, v in adapter_state_dict(t.model).items()},
                       t.fused.peak_grad_bytes if fused else peak[0], t)
    (l0, w0, p0, t0), (l1, w1, p1, t1) = runs[False], runs[True]
    dw = max((w0[k] - w1[k]).abs().max().item() for k in w0)
    total = sum(p.nbytes for p in t0.params)
    largest = max(p.nbytes for p in t0.params)
    print(f"{optimizer}: max |Δw| {dw:.1e} after 3 steps; live gradient bytes at the peak: unfused {p0:,} "
          f"(all {len(t0.params)} tensors), fused {p1:,} (the largest tensor: {largest:,})")
    # measured: bitwise equal (each tensor's update reads only its own gradient and state, in the same ops)
    assert l0 == l1 and dw == 0.0
    assert max(w0[k].abs().max().item() for k in w0 if "lora_up" in k) > 1e-4  # it trained
    assert p0 == total and p1 == largest
    # both groups stepped with their own LR (the text encoder's adapters moved, at --te-lr)
    assert t1.opt.param_groups[1]["lr"] != t1.opt.param_groups[0]["lr"]
    assert any(k.startswith("text_encoders.") and w1[k].abs().max() > 0 for k in w1 if "lora_up" in k)
    if optimizer == "adamw8bit":
        assert any("m_code" in s for s in t1.opt.state.values())


def test_fused_resume_is_exact(tmp_path, data_dir):
    """Stopped after step 1 and resumed (the LR still warming up: the resumed optimizer's groups must be the ones
    the hooks read), the fused run repeats the uninterrupted one bitwise."""
    full = _trainer(tmp_path / "full", data_dir, "--fused-backward")
    l_full = full.run()["losses"]
    _trainer(tmp_path / "half", data_dir, "--fused-backward", "--max-steps", "1").run()
    cfg, _ = parse_config(FLAGS + ["--data", data_dir, "--out", str(tmp_path / "half"), "--fused-backward"])
    t = Trainer(cfg, str(tmp_path / "half"), log=lambda s: None)
    t.load_checkpoint()
    assert t.run()["losses"] == l_full
    wf, wh = adapter_state_dict(full.model), adapter_state_dict(t.model)
    assert all(torch.equal(wf[k], wh[k]) for k in wf)


@pytest.mark.parametrize("flags, words", [
    (["--grad-accum", "2"], "--grad-accum > 1"),
    (["--max-grad-norm", "1"], "--max-grad-norm > 0"),
    (["--optimizer", "prodigy", "--lr", "1"], "--optimizer prodigy"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16"),
])
def test_refused_where_not_exact(tmp_path, capsys, flags, words):
    argv = [f for f in FLAGS if f != "--train-text-encoder"]
    argv = argv[:argv.index("--te-lr")] + argv[argv.index("--te-lr") + 2:]
    rc = train.main(argv + ["--fused-backward", "--out", str(tmp_path / "r")] + flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --fused-backward cannot be used with " + words) and "\n" not in err
