"""sample.py shows progress (a tqdm bar over the steps, one per prompt of --prompts) on a terminal, and for a large
request first prints its estimated cost (minisd/perf/estimate.py), then the bars and the start of the VAE decode;
a small request whose stderr is not a terminal stays quiet. The estimate's FLOPs equal a count made on a real CPU
run (attention in PyTorch's unfused math, whose matmuls the counter sees), and its memory the peak measured on a
real run with the fused kernel."""
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from minisd.config import TINY
from minisd.model import StableDiffusion
from minisd.perf.estimate import _Live, _measure, estimate

torch.set_num_threads(1)
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
SAMPLE = [sys.executable, os.path.join(ROOT, "sample.py"), "a red circle", "--model", "tiny-random", "--steps", "3"]


def _run_on_terminal(args, cwd) -> str:
    """sample.py with stderr on a pseudo-terminal (as in a shell); returns what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns (a new pty has 0)
    proc = subprocess.Popen(args, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_bar_over_steps_on_a_terminal(tmp_path):
    shown = _run_on_terminal(SAMPLE + ["--out", str(tmp_path / "a.png")], tmp_path)
    assert re.search(r"sampling: 100%.*3/3", shown), shown
    assert "estimate:" not in shown  # a small request: no estimate
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    shown = _run_on_terminal(SAMPLE[:2] + ["--prompts", str(tmp_path / "p.txt")] + SAMPLE[3:]
                             + ["--out", str(tmp_path / "b.png")], tmp_path)
    for i in (1, 2):  # one bar per prompt, named by its place
        assert re.search(rf"prompt {i}/2: 100%.*3/3", shown), shown


def test_quiet_when_small_and_not_a_terminal(tmp_path):
    r = subprocess.run(SAMPLE + ["--out", str(tmp_path / "a.png")], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sampling" not in r.stderr and "estimate:" not in r.stderr, r.stderr
    assert r.stdout.strip() == str(tmp_path / "a.png")


def test_large_request_says_its_cost_then_shows_progress(tmp_path):
    # tiny-random draws at 64 px: 192x112 is more than 4 images' worth of pixels, so a large request
    r = subprocess.run(SAMPLE + ["--steps", "2", "--width", "192", "--height", "112", "--out", str(tmp_path / "a.png")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("estimate: "))
    assert re.match(r"estimate: 2 UNet calls of [0-9.e+-]+ TFLOP and a VAE decode of [0-9.e+-]+ TFLOP; at this "
                    r"device's \d+ GFLOP/s \(fp32 matmul\) at least \d+ s; memory about [0-9.]+ GiB", lines[first])
    rest = "\n".join(lines[first + 1:])
    assert re.search(r"sampling: 100%.*2/2", rest) and "VAE decode of 1 image(s) 192x112..." in rest, r.stderr


def test_estimate_matches_a_real_run():
    torch.manual_seed(0)
    model = StableDiffusion(TINY).eval()
    W, H, images = 96, 40, 2                      # non-square; guided: a UNet batch of 4
    e = estimate(model, W, H, images, steps=5, guided=True, flops_per_s=1e9)
    f, cfg = model.vae_scale, model.cfg
    x = torch.randn(2 * images, cfg.unet.in_channels, H // f, W // f)
    t = torch.full((2 * images,), 500.0)
    ctx = torch.randn(2 * images, 77, cfg.unet.context_dim)
    z = torch.randn(images, cfg.vae.embed_dim, H // f, W // f)
    with torch.no_grad():
        # FLOPs: attention unfused, so the counter sees its two matmuls
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model.unet(x, t, ctx)
        assert e.unet_flops == fc.get_total_flops(), (e.unet_flops, fc.get_total_flops())
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model.vae.decode(z)
        assert e.decode_flops == fc.get_total_flops(), (e.decode_flops, fc.get_total_flops())
        # memory: the real run with the fused CPU kernel, as sampling runs it
        live = _Live()
        with live:
            model.unet(x, t, ctx)
        unet_real = live.peak
        live = _Live()
        with live:
            model.vae.decode(z)
    print("estimated / real peak bytes: unet", e.unet_peak, unet_real, "decode", e.decode_peak, live.peak)
    assert e.unet_peak == unet_real and e.decode_peak == live.peak
    assert e.seconds == (5 * e.unet_flops + e.decode_flops) / 1e9
    weights = sum(p.numel() * 4 for p in [*model.unet.parameters(), *model.vae.parameters()])
    assert e.peak == weights + max(e.unet_peak, e.decode_peak)


def test_live_bytes_by_hand():
    def work():
        a = torch.empty(100, device="meta")                  # 400 bytes
        b = torch.empty(50, dtype=torch.float64, device="meta")  # 400 more: 800 live
        del a                                               # 400
        c = b.view(5, 10) + 1                               # a view adds nothing, the sum 400 more: 800
        return c.sum()                                      # 8 more while c lives: 808
    flops, peak = _measure(work)
    assert peak == 808 and flops == 0
    q = torch.empty(2, 3, 50, 8, device="meta")
    k = torch.empty(2, 3, 20, 8, device="meta")
    v = torch.empty(2, 3, 20, 4, device="meta")
    flops, peak = _measure(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * 6 * 50 * 20 * (8 + 4)                # QKᵀ: 2·N·M·hd, then ·V: 2·N·M·hdv, per head
    assert peak == 6 * 50 * 4 * 4 + 6 * 50 * 4              # output (B, nh, N, hdv) and the fp32 log-sum-exp


def test_ctrl_c_is_one_line(tmp_path):
    proc = subprocess.Popen(SAMPLE + ["--steps", "900", "--width", "192", "--height", "112", "--out",
                                      str(tmp_path / "a.png")], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the estimate comes before the steps
            if line.startswith("estimate: "):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "error: stopped by SIGINT", err
    assert out == "" and not (tmp_path / "a.png").exists()
