"""DreamBooth with prior preservation: the loss of a micro-step is L_instance + λ·L_prior with both terms recomputed
by hand (Ruiz et al. 2022, Eq. 2); class images drawn by the base model are cached, counted, continued exactly after
an interruption and refused when drawn otherwise; kill + --resume is exact with the full fine-tune and with LoRA
(losses, prior terms, validation losses); the DreamBooth flags are refused where they would be ignored.
--cuda-graph: the recorded function (`Trainer.forward_backward` with the class batch) gives the eager loss, prior
term and gradients bit for bit; StepGraph's host side over whole DreamBooth steps gives the eager steps (CPU, the
recorder replaced by eager calls on copies of the inputs); on the GPU (`-m gpu`) a graphed run trains as an eager
one."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.data import DataError  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from minisd.adapters import adapter_state_dict  # noqa: E402
from minisd.perf import graphs  # noqa: E402
from minisd.trainer import Draws  # noqa: E402
from conftest import kill_at  # noqa: E402
from test_train_by_hand import alphas_cumprod  # noqa: E402
from test_train_graph import _EagerRecorder  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "2",
        "--resolution", "32", "--sample-steps", "2"]
# measured |trainer − hand| 1e-7 relative (float32 ᾱ table vs float64 here, summation order); 20x margin
RTOL = 5e-6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    inst = world.write_folder(str(root / "inst"), 3, seed=0, subject=True)
    cls = world.write_folder(str(root / "cls"), 5, seed=1)  # "your own" class images: no class_images.json
    return inst, cls


def _trainer(run, inst, *flags):
    cfg, _ = parse_config(FAST + ["--data", inst, "--out", str(run)] + list(flags))
    return Trainer(cfg, str(run), log=lambda s: None)


def _hand_loss(m, ab_table, g, pixels, prompt):
    """mean_b ‖UNet(z_t, t, c) − ε‖² / (C·h·w) for one batch, drawing ε_z, t, ε from g (minisd/trainer.py's order)."""
    with torch.no_grad():
        mean, logvar = m.vae.encode(pixels).moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    B, C, h, w = mean.shape
    eps_z = torch.randn((B, C, h, w), generator=g)
    t = torch.randint(0, len(ab_table), (B,), generator=g)
    eps = torch.randn((B, C, h, w), generator=g)
    z0 = (mean + std * eps_z) * m.cfg.vae.scale_factor
    a = ab_table[t].float().view(B, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    ctx = m.text_encoders[0](m.tokenizers[0]([prompt] * B))
    ctx = ctx[0] if isinstance(ctx, tuple) else ctx
    with torch.no_grad():
        pred = m.unet(zt, t, ctx)
    return ((pred - eps) ** 2).mean().item()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_prior_term_by_hand(tmp_path, dirs, method):
    inst, cls = dirs
    lam = 0.3
    t = _trainer(tmp_path, inst, "--instance-prompt", "a sks emblem", "--class-prompt", "an emblem", "--class-data",
                 cls, "--num-class-images", "4", "--prior-loss-weight", str(lam), "--method", method)
    if method == "lora":  # LoRA B = 0 at init would make the adapters invisible: give them values
        g0 = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in t.model.named_parameters():
                if n.endswith("lora_up.weight"):
                    p.copy_(torch.randn(p.shape, generator=g0) * 0.2)
    cls_state, gen = t.prior.loader.state_dict(), t.gen.get_state()
    batch = t.loader.next_batch()
    cbatch = t.prior.loader.next_batch()
    t.prior.loader.load_state_dict(cls_state)
    assert set(batch["captions"]) == {"a sks emblem"} and set(cbatch["captions"]) == {"an emblem"}
    assert all(os.path.dirname(p) == cls for p in [t.prior.dataset.examples[i].path for i in cbatch["indices"]])
    with torch.no_grad():
        got = t.micro_loss(batch).item()
    ab = alphas_cumprod(t.model.cfg.schedule, False)
    g = torch.Generator()
    g.set_state(gen)
    L_inst = _hand_loss(t.model, ab, g, batch["pixels"], "a sks emblem")
    L_prior = _hand_loss(t.model, ab, g, cbatch["pixels"], "an emblem")   # drawn after the instance batch
    assert abs(t.prior.last.item() - L_prior) <= RTOL * L_prior, (t.prior.last.item(), L_prior)
    assert abs(got - (L_inst + lam * L_prior)) <= RTOL * got, (got, L_inst, L_prior)
    assert abs(L_prior - L_inst) > 1e-2 * L_inst  # the two terms differ: a swapped or missing term would show


def test_one_unet_call_of_both_batches(tmp_path, dirs):
    """Instance and class rows go through the UNet and the text encoder together, 2B rows in one call each (as
    diffusers' script does; two calls of B rows cost 0.70x its step time at batch 1 on an H100), and the prior
    loss is not read back to the host during the micro-step (no .item(): a sync would stall the GPU queue)."""
    inst, cls = dirs
    t = _trainer(tmp_path, inst, "--instance-prompt", "a sks emblem", "--class-prompt", "an emblem", "--class-data",
                 cls, "--num-class-images", "4", "--batch-size", "3")
    rows = []
    unet_forward = t.model.unet.forward
    t.model.unet.forward = lambda zt, *a, **k: (rows.append(zt.shape[0]), unet_forward(zt, *a, **k))[1]
    enc = t.model.encode_text
    texts = []
    t.model.encode_text = lambda ids: (texts.append(ids[0].shape[0]), enc(ids))[1]
    with torch.no_grad():
        t.micro_loss(t.loader.next_batch())
    assert rows == [6] and texts == [6]
    assert isinstance(t.prior.sum, torch.Tensor) and t.prior.count == 1
    assert t.prior.step_mean() == pytest.approx(t.prior.last.item(), rel=0, abs=0)


def test_class_images_cached_counted_resumable(tmp_path, dirs):
    inst, _ = dirs
    folder = str(tmp_path / "cls")
    flags = ["--class-prompt", "a red shape", "--class-data", folder, "--num-class-images", "3"]
    t = _trainer(tmp_path / "r1", inst, *flags)
    assert t.prior.drawn == 3
    first = {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".png")}
    assert list(first) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    # an interrupted generation: image 1 missing, a half-written file left behind
    os.remove(os.path.join(folder, "class_00001.png"))
    open(os.path.join(folder, "class_00001.png.tmp"), "wb").write(b"\x89PNG half")
    t = _trainer(tmp_path / "r2", inst, *flags[:-1], "4")  # and one more image wanted
    assert t.prior.drawn == 2
    for f, data in first.items():
        assert open(os.path.join(folder, f), "rb").read() == data, f  # exactly what the first run drew
    assert sorted(f for f in os.listdir(folder) if f.endswith(".png")) == [f"class_0000{i}.png" for i in range(4)]
    t = _trainer(tmp_path / "r3", inst, *flags)  # enough: reused, nothing drawn
    assert t.prior.drawn == 0
    # drawn with another prompt: not filled up
    with pytest.raises(DataError, match="another prompt"):
        _trainer(tmp_path / "r4", inst, "--class-prompt", "a blue shape", "--class-data", folder,
                 "--num-class-images", "6")


def test_own_class_folder_too_small_is_one_line(tmp_path, dirs, capsys):
    inst, cls = dirs
    rc = train.main(FAST + ["--data", inst, "--out", str(tmp_path / "r"), "--class-prompt", "an emblem",
                            "--class-data", cls, "--num-class-images", "9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "holds 5 images of your own" in err and "\n" not in err, err


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dreambooth_resume_exact_with_val_loss(tmp_path, dirs, method):
    inst, cls = dirs
    flags = ["--max-steps", "5", "--seed", "4", "--flip", "0.5", "--instance-prompt", "a sks emblem",
             "--class-prompt", "an emblem", "--class-data", cls, "--num-class-images", "5", "--prior-loss-weight",
             "0.7", "--val-loss-every", "2", "--val-data", cls, "--method", method]
    if method == "lora":
        flags += ["--dropout", "0.2", "--train-text-encoder"]
    full = _trainer(tmp_path / "full", inst, *flags)
    full.run()
    want = [json.loads(line) for line in open(tmp_path / "full" / "loss.jsonl")]
    assert [("val_loss" in r) for r in want] == [False, True, False, True, False]
    assert all("prior_loss" in r for r in want)
    part = tmp_path / "part"
    killed = _trainer(part, inst, *flags, "--save-every", "3")
    json.dump(killed.cfg.to_dict(), open(part / "config.json", "w"))
    kill_at(killed, 4)
    assert train.main(["--resume", str(part)]) == 0
    got = [json.loads(line) for line in open(part / "loss.jsonl")]
    assert got == want  # loss, prior_loss, val_loss: bitwise on the CPU


@pytest.mark.parametrize("flags, message", [
    (["--prior-loss-weight", "0.5"], "would be ignored without --class-prompt"),
    (["--class-data", "x"], "would be ignored without --class-prompt"),
    (["--class-prompt", "an emblem"], "needs --class-data"),
    (["--class-prompt", "a", "--class-data", "x", "--cache-latents"], "--cache-latents cannot be used"),
    (["--class-prompt", "a", "--class-data", "x", "--num-class-images", "0"], "--num-class-images must be"),
])
def test_dreambooth_flags_refused(tmp_path, dirs, capsys, flags, message):
    rc = train.main(FAST + ["--data", dirs[0], "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and message in err and "\n" not in err, err


# ------------------------------------------------------------------------------------------- --cuda-graph
DB = ["--instance-prompt", "a sks emblem", "--class-prompt", "an emblem", "--num-class-images", "4",
      "--prior-loss-weight", "0.3"]


def _wake_lora(t, seed=3):
    """LoRA B = 0 at init gives the down-weights no gradient: give the up-weights values, so every factor shows."""
    g0 = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in t.model.named_parameters():
            if n.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=g0) * 0.2)


def test_graphed_dreambooth_function_gives_the_eager_numbers(tmp_path, dirs):
    """`forward_backward(draw, mb, cb)` (what the GPU records) on the CPU: the loss, L_prior and every adapter
    gradient of micro_loss + backward bit for bit, from the same generator state, and the generator ends where the
    eager step leaves it (the instance draws, then the class draws, all from `draw`)."""
    inst, cls = dirs
    t = _trainer(tmp_path, inst, *DB, "--class-data", cls, "--min-snr-gamma", "5", "--noise-offset", "0.05",
                 "--grad-accum", "2", "--train-text-encoder")
    _wake_lora(t)
    batch = t.loader.next_batch()
    cls_state, gen = t.prior.loader.state_dict(), t.gen.get_state()
    loss = t.micro_loss(batch)
    (loss / 2).backward()
    want = [p.grad.clone() for p in t.params]
    want_prior, want_gen = t.prior.last, t.gen.get_state()
    assert all(g.abs().sum() > 0 for g in want[:2]) and t.te_layers  # down and up weights, text encoder too
    t.opt.zero_grad(set_to_none=True)
    t.gen.set_state(gen)
    t.prior.loader.load_state_dict(cls_state)
    cb = t.prior.class_batch(t)  # host side, before the recorded function
    got_loss, got_prior = t.forward_backward(Draws(t.gen, t.device), t.micro_batch(batch), cb)
    assert torch.equal(got_loss, loss.detach()) and torch.equal(got_prior, want_prior)
    assert got_loss.grad_fn is None and got_prior.grad_fn is None
    assert torch.equal(t.gen.get_state(), want_gen)
    for g, p in zip(want, t.params):
        assert torch.equal(p.grad, g)


def test_step_graph_over_dreambooth_steps(tmp_path, dirs, monkeypatch):
    """`Trainer.train_step` with a StepGraph (CudaGraph replaced by eager calls on copies of its inputs, as a replay
    reads its buffers) against the eager steps: 2 optimizer steps of 2 micro-steps (2 warm-up calls, 2 "replays")
    give the losses and prior terms bit for bit, the same adapters, and leave the run generator and the class
    loader where the eager steps leave them; the plan holds the instance draws, then the class draws."""
    monkeypatch.setattr(graphs, "CudaGraph", _EagerRecorder)
    inst, cls = dirs
    flags = [*DB, "--class-data", cls, "--min-snr-gamma", "5", "--noise-offset", "0.05", "--input-perturbation",
             "0.1", "--grad-accum", "2"]
    runs = {}
    for name in ("eager", "graph"):
        t = _trainer(tmp_path / name, inst, *flags)
        _wake_lora(t)
        if name == "graph":  # what Trainer builds with --cuda-graph on a CUDA device
            t.graph = graphs.StepGraph(t.forward_backward, t.gen, t.device, warmup=2)
        out = [(t.train_step(), t.prior.step_mean()) for _ in range(2)]
        runs[name] = out, t
    (want, te), (got, tg) = runs["eager"], runs["graph"]
    assert got == want, (got, want)
    assert all(prior > 0 and loss > prior * 0.3 for loss, prior in got)
    assert tg.graph.recorder.calls == 4 and tg.graph.plan is not None
    assert torch.equal(tg.gen.get_state(), te.gen.get_state())
    assert tg.prior.loader.state_dict() == te.prior.loader.state_dict()
    a, b = adapter_state_dict(te.model), adapter_state_dict(tg.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    B, C, h = 2, tg.model.cfg.unet.in_channels, 32 // tg.model.vae_scale   # --batch-size 2, --resolution 32
    T, f32 = tg.noise.num_train_timesteps, torch.float32
    one = [("randn", ((B, C, h, h), f32)), ("randint", (T, (B,))), ("randn", ((B, C, h, h), f32)),
           ("randn", ((B, C, 1, 1), f32)), ("randn", ((B, C, h, h), f32))]
    assert tg.graph.plan == one + one  # ε_z, t, ε, offset, ξ of the instance batch, then of the class batch


def test_step_graph_over_dreambooth_full_steps(tmp_path, dirs, monkeypatch):
    """The same with --method full (which takes --cuda-graph too): 2 optimizer steps through the StepGraph path give
    the eager losses, prior terms and UNet weights bit for bit."""
    monkeypatch.setattr(graphs, "CudaGraph", _EagerRecorder)
    inst, cls = dirs
    runs = {}
    for name in ("eager", "graph"):
        t = _trainer(tmp_path / name, inst, *DB, "--class-data", cls, "--method", "full", "--lr", "1e-3")
        if name == "graph":
            t.graph = graphs.StepGraph(t.forward_backward, t.gen, t.device, warmup=1)
        runs[name] = [(t.train_step(), t.prior.step_mean()) for _ in range(2)], t
    (want, te), (got, tg) = runs["eager"], runs["graph"]
    assert got == want and tg.graph.recorder.calls == 2, (got, want)
    a, b = te.model.unet.state_dict(), tg.model.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _trainer(tmp_path / "fresh", inst, *DB, "--class-data", cls,
                                                            "--method", "full").model.unet.state_dict().items())


def test_cuda_graph_with_class_prompt_refused_only_for_the_device(tmp_path, dirs, capsys):
    """--cuda-graph is no longer a DreamBooth refusal: on the CPU the one line is the device's."""
    inst, cls = dirs
    out = tmp_path / "r"
    rc = train.main(FAST + ["--data", inst, "--out", str(out), *DB, "--class-data", cls, "--cuda-graph",
                            "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --cuda-graph needs a CUDA device, not cpu", err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("flag, why", [("--cache-latents", "instance images only"),
                                       ("--cache-text", "instance captions only"), ("--buckets", "one shape")])
def test_other_dreambooth_refusals_still_one_line(tmp_path, dirs, capsys, flag, why):
    rc = train.main(FAST + ["--data", dirs[0], "--out", str(tmp_path / "r"), *DB, "--class-data", dirs[1], flag,
                            "--cuda-graph"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {flag} cannot be used with --class-prompt ({err.split('(', 1)[1]}", err
    assert why in err and "\n" not in err


@pytest.mark.gpu
def test_dreambooth_graph_run_equals_eager_run(tmp_path, dirs):
    """A DreamBooth LoRA run with --cuda-graph trains as an eager one: the tolerance reasoning of
    tests/test_train_graph.py `test_graph_run_equals_eager_run` (the GPU is not bitwise reproducible run to run,
    and AdamW turns that noise into lr-sized moves where a gradient is near zero, so the adapters are held to a
    second eager run's distance x 4 + 1 % of lr; losses within 1e-3 relative), for the loss and the prior term."""
    inst, cls = dirs
    lr = 1e-3                                                # TrainConfig's default
    flags = [*DB, "--class-data", cls, "--device", "cuda", "--mixed-precision", "bf16", "--max-steps", "6",
             "--save-every", "0", "--grad-accum", "2", "--min-snr-gamma", "5"]
    runs = {}
    for run in ("eager", "eager-again", "graph"):
        torch.manual_seed(0)
        t = _trainer(tmp_path / run, inst, *flags, *(["--cuda-graph"] if run == "graph" else []))
        t.run()
        runs[run] = t.losses, {k: v.float().cpu() for k, v in adapter_state_dict(t.model).items()}, t
    (eager, eager_ad, _), (_, again_ad, _), (graph, graph_ad, t) = runs.values()
    assert t.graph is not None and t.graph.graph is not None, "the graph was never recorded"
    assert len(graph) == 6 and all("prior_loss" in r for r in graph)
    for a, b in zip(eager, graph):
        for key in ("loss", "prior_loss"):
            assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, eager, graph)
    noise = max((eager_ad[k] - again_ad[k]).abs().max().item() for k in eager_ad)
    worst = max((eager_ad[k] - graph_ad[k]).abs().max().item() for k in eager_ad)
    assert worst <= 4 * noise + 0.01 * lr, f"graph vs eager {worst:.3g}, eager vs eager {noise:.3g}"
