"""--fused-backward (minisd/train/fused.py): the same weights and EMA after N steps as the unfused optimizer (AdamW and
AdamW8bit, two parameter groups with their own LRs, an LR warmup) for buckets smaller and larger than the model; the
opt.step calls per step, call by call, against the buckets worked out by hand from the hook order; the live gradient
bytes counted at every post-accumulate-grad event (all of them unfused; fused the bucket's and the new tensor's, at
most (bucket - 1) values + the largest tensor); AdamW8bit's chunk layouts built once; one-line refusals where it
cannot be exact and for a bad --fused-bucket-mb."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.adapters import adapter_state_dict  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.fused import BUCKET_VALUES, FusedBackward, bucket_values  # noqa: E402
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


def _mb(values: int) -> str:
    """--fused-bucket-mb for a bucket of `values` values (MB of fp32 gradient: values / 2^18, exact in binary)."""
    return repr(values / 2 ** 18)


def _by_hand(order: list[int], sizes: list[int], bucket: int) -> list[list[int]]:
    """The opt.step calls of one step, by hand from the tensors (indices into `sizes`) in hook order: a bucket is
    stepped before a tensor that would take it past `bucket` values, and as soon as it holds `bucket`; the last
    call is the loop's (the rest)."""
    calls, cur, n = [], [], 0
    for i in order:
        if cur and n + sizes[i] > bucket:
            calls, cur, n = calls + [cur], [], 0
        cur, n = cur + [i], n + sizes[i]
        if n >= bucket:
            calls, cur, n = calls + [cur], [], 0
    return calls + [cur]


# adamw8bit at rank 64: the 64x64 adapters reach its 8-bit state (min_8bit_size 4096), the rest keep fp32 state;
# with gradient checkpointing the hooks fire inside the recomputing backward. Buckets: 1000 and 9000 values (rank 2's
# tensors hold 64 or 128 values, rank 64's 2048 or 4096: neither divides them, so buckets end short and tensors are
# held back), and 128 MB, more than the model (12,544 / 401,408 values): one bucket, all of it stepped by the loop.
# calls per step: at least ⌈values / bucket⌉ (13; 45), more where the next tensor would not fit and the bucket is
# stepped short: 14; 52 (`_by_hand` from the hook order, checked call by call).
@pytest.mark.parametrize("optimizer, rank, more, bucket, calls", [
    ("adamw", "2", [], 1000, 14), ("adamw8bit", "64", [], 9000, 52),
    ("adamw", "2", ["--gradient-checkpointing"], 1000, 14), ("adamw8bit", "64", [], 2 ** 25, 1)])
def test_fused_equals_unfused_in_buckets(tmp_path, data_dir, optimizer, rank, more, bucket, calls):
    runs = {}
    for fused in (False, True):
        t = _trainer(tmp_path / str(fused), data_dir, "--optimizer", optimizer, "--rank", rank, "--ema-decay", "0.8",
                     *more, *(["--fused-backward", "--fused-bucket-mb", _mb(bucket)] if fused else []))
        # count the gradient bytes alive whenever a tensor's gradient completes: a hook that runs before the fused
        # one (hooks run in the order registered), and record the tensors' order
        peak, order, index = [0], [], {p: i for i, p in enumerate(t.params)}

        def count(p, t=t, index=index):
            peak[0] = max(peak[0], sum(q.grad.nbytes for q in t.params if q.grad is not None))
            order.append(index[p])
        if fused:
            assert t.fused.bucket_values == bucket
            t.fused.remove()
        for p in t.params:
            p.register_post_accumulate_grad_hook(count)
        if fused:
            t.fused = FusedBackward(t.opt, t.params, bucket)
        # every opt.step call: the tensors it steps (those with a gradient) and the lr each one's group view holds
        steps = []
        t.opt.register_step_pre_hook(lambda opt, a, k, steps=steps, index=index: steps.append(
            [(index[p], g["lr"]) for g in opt.param_groups for p in g["params"] if p.grad is not None]))
        losses = t.run()["losses"]
        assert all(p.grad is None for p in t.params)  # zero_grad freed the last bucket's
        runs[fused] = (losses, {k: v.detach().clone() for k, v in adapter_state_dict(t.model).items()}, peak[0],
                       t, steps, order, [s.clone() for s in t.ema.shadow])
    (l0, w0, p0, t0, s0, _, e0), (l1, w1, p1, t1, s1, o1, e1) = runs[False], runs[True]
    dw = max((w0[k] - w1[k]).abs().max().item() for k in w0)
    total = sum(p.nbytes for p in t0.params)
    largest = max(p.nbytes for p in t0.params)
    n = len(t1.params)
    print(f"{optimizer}, bucket {bucket}: max |Δw| {dw:.1e} after 3 steps; live gradient bytes at the peak: unfused "
          f"{p0:,} (all {n} tensors), fused {p1:,} (bound {(bucket - 1) * 4 + largest:,}); opt.step calls per step: "
          f"{len(s1) // 3}")
    # measured: bitwise equal (each tensor's update reads only its own gradient and state, in the same ops); the
    # EMA averages the same weights (the loop's update comes after the last bucket's step)
    assert l0 == l1 and dw == 0.0 and all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert max(w0[k].abs().max().item() for k in w0 if "lora_up" in k) > 1e-4  # it trained
    # the calls, by hand from the hook order: each step the same buckets, then the loop's call with exactly the rest
    assert len(o1) == 3 * n and o1[:n] == o1[n:2 * n] == o1[2 * n:]
    by_hand = _by_hand(o1[:n], [p.numel() for p in t1.params], bucket)
    assert len(by_hand) == calls and len(s0) == 3 and len(s1) == 3 * calls and t1.fused.steps == 3 * (calls - 1)
    for i, call in enumerate(s1):
        assert sorted(j for j, _ in call) == sorted(by_hand[i % calls])  # the loop's call: in group order
        # each tensor in its own group's view, at the group's lr of that step (as the unfused call)
        lrs = {p: lr for p, lr in s0[i // calls]}
        assert all(lr == lrs[p] for p, lr in call)
    # a bucket that spans the UNet's last tensors and the text encoder's first (1000 values: 10,752 UNet values end
    # inside one; 9000: they end with a bucket of 8192s): two views, each at its group's lr
    mixed = [i for i, b in enumerate(by_hand[:-1]) if len({t1.fused.group_of[t1.params[j]] for j in b}) == 2]
    assert bool(mixed) == (bucket == 1000) and all(len({lr for _, lr in s1[i]}) == 2 for i in mixed)
    # live gradient bytes: unfused all of them; fused the most any bucket held with the next tensor's gradient,
    # at most (bucket - 1) values + the largest tensor
    # at tensor j of a bucket: the bucket's tensors before it and j; at the first of the next bucket, when the bucket
    # was stepped because that tensor would not fit: all of it and that tensor
    nbytes, numel = [p.nbytes for p in t1.params], [p.numel() for p in t1.params]  # fp32 gradients
    held = max(sum(nbytes[i] for i in b[:j]) + nbytes[b[j]] for b in by_hand for j in range(len(b)))
    held = max([held] + [sum(nbytes[i] for i in b) + nbytes[c[0]] for b, c in zip(by_hand, by_hand[1:])
                         if c and sum(numel[i] for i in b) < bucket])
    assert p0 == total and p1 == held == t1.fused.peak_grad_bytes <= (bucket - 1) * 4 + largest
    assert (p1 == total) == (bucket > total // 4)
    # both groups stepped with their own LR (the text encoder's adapters moved, at --te-lr)
    assert t1.opt.param_groups[1]["lr"] != t1.opt.param_groups[0]["lr"]
    assert any(k.startswith("text_encoders.") and w1[k].abs().max() > 0 for k in w1 if "lora_up" in k)
    if optimizer == "adamw8bit":
        assert any("m_code" in s for s in t1.opt.state.values())


def test_fused_8bit_chunks_are_built_once(tmp_path, data_dir, monkeypatch):
    """AdamW8bit's fused path (as on CUDA; here uncompiled, which equals the eager path bit for bit) under buckets of
    9000 values: the chunk layouts (keyed by the bucket's tensors) are built and packed in the first step only and
    reused by the next two; the step's scalars are copied once per group and step, not once per bucket."""
    from minisd.train import adamw8bit
    monkeypatch.setattr(adamw8bit.AdamW8bit, "compile_fused", False)
    events = []  # (step, what)
    init, pack, scalars = adamw8bit._Chunk.__init__, adamw8bit._Chunk.pack, adamw8bit.step_scalars

    def counted_pack(c, state):
        before = c.buffers
        pack(c, state)
        if c.buffers is not before:
            events.append((t.step, "pack"))
    monkeypatch.setattr(adamw8bit._Chunk, "__init__", lambda c, *a: (events.append((t.step, "chunk")), init(c, *a))[1])
    monkeypatch.setattr(adamw8bit._Chunk, "pack", counted_pack)
    monkeypatch.setattr(adamw8bit, "step_scalars", lambda *a: (events.append((t.step, "hp")), scalars(*a))[1])
    eager = _trainer(tmp_path / "eager", data_dir, "--optimizer", "adamw8bit", "--rank", "64")
    l0 = eager.run()["losses"]
    assert events == []  # the eager path: no chunks
    t = _trainer(tmp_path / "fused", data_dir, "--optimizer", "adamw8bit", "--rank", "64", "--fused-backward",
                 "--fused-bucket-mb", _mb(9000))
    t.opt.fused = True
    assert t.run()["losses"] == l0
    w0, w1 = adapter_state_dict(eager.model), adapter_state_dict(t.model)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    n_8bit = sum("m_code" in t.opt.state[p] for p in t.params)
    chunks = [e for e in events if e[1] == "chunk"]
    # the 8-bit tensors hold 4096 values: a bucket of <= 9000 values holds one or two of them, one chunk (< 2^25)
    assert n_8bit / 2 <= len(chunks) < n_8bit and {s for s, _ in chunks} == {0}  # built in step 0 only
    assert [s for s, e in events if e == "pack"] == [0] * len(chunks)  # each packed once, when built
    assert len(t.opt._layouts) == len(chunks)  # nothing rebuilt under another key
    # two groups (UNet, text encoder), each one lr per step (warming up: a new one each step) -> 2 copies a step
    assert [e for e in events if e[1] == "hp"] == [(s, "hp") for s in range(3) for _ in range(2)]


@pytest.mark.parametrize("flags, message", [
    (["--fused-bucket-mb", "64"], "--fused-bucket-mb would be ignored without --fused-backward"),
    (["--fused-backward", "--fused-bucket-mb", "0"], "--fused-bucket-mb must be a positive number of MB, got 0.0"),
    (["--fused-backward", "--fused-bucket-mb", "-2.5"], "--fused-bucket-mb must be a positive number of MB, got -2.5"),
])
def test_bucket_flag_refused(tmp_path, capsys, flags, message):
    rc = train.main(FLAGS + ["--out", str(tmp_path / "r")] + flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: " + message and not (tmp_path / "r").exists()


def test_bucket_values_of_the_flag():
    assert bucket_values(128) == 2 ** 25 == BUCKET_VALUES  # 128 MB of fp32 gradient
    assert bucket_values(1000 / 2 ** 18) == 1000 and bucket_values(1e-9) == 1  # rounded up, never 0


def test_fused_resume_is_exact(tmp_path, data_dir):
    """Stopped after step 1 and resumed (the LR still warming up: the resumed optimizer's groups must be the ones
    the hooks read), the fused run repeats the uninterrupted one bitwise."""
    bucket = ["--fused-backward", "--fused-bucket-mb", _mb(700)]  # 18 buckets and the loop's remainder
    full = _trainer(tmp_path / "full", data_dir, *bucket)
    l_full = full.run()["losses"]
    _trainer(tmp_path / "half", data_dir, *bucket, "--max-steps", "1").run()
    cfg, _ = parse_config(FLAGS + ["--data", data_dir, "--out", str(tmp_path / "half"), *bucket])
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
