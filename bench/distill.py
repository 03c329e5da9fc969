"""Knowledge distillation on the embedded world (docs/DISTILL.md): minisd-tiny (the teacher) into its `small` and
`tiny` students, each trained twice for the same steps from the same start - with the distillation terms
(`train.py --distill R`, output and feature weights 1 / 1) and without them (weights 0 / 0: the ablation, plain
training of the same student on the task loss alone, the same data, draws and optimizer) - then one table:

    parameters, UNet file size (fp16 safetensors, as weights/minisd-tiny stores it), CPU seconds per image (the same
    sampler, steps and guidance for every model), probe fidelity on held-out prompts (shape, colour, size, position,
    background, all five), seconds per training step, and each student before training (the teacher's blocks only).

    python bench/distill.py                                     # CPU, 150 steps a run, writes bench/results/distill-cpu.md
    python bench/distill.py --steps 2000 --device cuda --n-eval 256 --write bench/results/distill-gpu.md

Every training run is a `python train.py` process (the command in the table's notes), so the table measures the
shipped code path; the runs go to --work (kept, so `sample.py --model WORK/small-distill/student` draws with them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEACHER = os.path.join(ROOT, "weights", "minisd-tiny")


def train_command(a, recipe: str, distil: bool, data: str, out: str) -> list:
    cmd = [sys.executable, "train.py", "--distill", recipe, "--model", TEACHER, "--data", data, "--out", out,
           "--max-steps", str(a.steps), "--batch-size", str(a.batch), "--lr", str(a.lr), "--caption-dropout", "0.1",
           "--cache-latents", "--cache-text", "--no-samples", "--save-every", "0", "--threads", str(a.threads),
           "--device", a.device, "--no-progress"]
    if not distil:
        cmd += ["--output-weight", "0", "--feature-weight", "0"]
    return cmd


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: on a shared machine the honest measure."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def unet_fp16_bytes(model) -> int:
    import torch
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "unet.safetensors")
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.unet.state_dict().items()}, path)
        return os.path.getsize(path)


def measure(model, a) -> dict:
    """Parameters, fp16 UNet file size, seconds per image and probe fidelity of one model."""
    import torch
    from minisd.world.fidelity import heldout_prompts, generate
    from minisd.world.probe import load_probe, score
    model = model.float().eval()
    pairs = heldout_prompts(a.n_eval, a.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    images = generate(model, [c for _, c in pairs], a.sample_steps, a.cfg, a.seed, a.device, batch=a.sample_batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = score(images, [x for x, _ in pairs], load_probe(device="cpu"))
    return {"params": sum(p.numel() for p in model.unet.parameters()), "file": unet_fp16_bytes(model),
            "s_per_image": wall / len(images), "cpu_s_per_image": cpu / len(images),
            **{k: res[k] for k in ("shape", "colour", "size", "position", "background", "all")},
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every training run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n-images", type=int, default=2000, help="plain world training images (written once)")
    p.add_argument("--n-eval", type=int, default=64, help="held-out prompts scored by the probe per model")
    p.add_argument("--sample-steps", type=int, default=15, help="DDIM steps, every model")
    p.add_argument("--sample-batch", type=int, default=8, help="prompts per sampling call")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipes", default="small,tiny")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench-distill"))
    p.add_argument("--write", default=os.path.join(ROOT, "bench", "results", "distill-cpu.md"), help="'-': print only")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from minisd import world
    from minisd.formats import load_model
    from minisd.train.distill import build_student

    os.makedirs(a.work, exist_ok=True)
    data = os.path.join(a.work, "data")
    if not os.path.isfile(os.path.join(data, "attributes.jsonl")):
        print(f"writing {a.n_images} plain world images to {data}", flush=True)
        world.write_folder(data, a.n_images, seed=0, split="train")
    load_before = os.getloadavg()
    rows = {}
    teacher = load_model(TEACHER)
    rows["teacher (minisd-tiny)"] = measure(teacher, a)
    print("teacher", rows["teacher (minisd-tiny)"], flush=True)
    commands = []
    for recipe in a.recipes.split(","):
        m = load_model(TEACHER)
        m.unet, _ = build_student(m.unet.float(), recipe)
        rows[f"{recipe}, teacher blocks, untrained"] = measure(m, a)
        for distil in (True, False):
            name = f"{recipe}-{'distill' if distil else 'plain'}"
            out = os.path.join(a.work, name)
            cmd = train_command(a, recipe, distil, data, out)
            commands.append(" ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]))
            t0, c0 = time.perf_counter(), children_cpu()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            train_s, train_cpu = time.perf_counter() - t0, children_cpu() - c0
            steps = [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))]
            row = measure(load_model(os.path.join(out, "student")), a)
            row.update(train_s=train_s, s_per_step=train_s / a.steps, cpu_s_per_step=train_cpu / a.steps,
                       final_task=sum(r["task"] for r in steps[-20:]) / len(steps[-20:]))
            rows[f"{recipe}, {'distilled' if distil else 'task loss only (ablation)'}"] = row
            print(name, row, flush=True)
    # seconds per training step of the teacher itself on the same batch: one full-weight step (fwd, bwd, AdamW)
    rows_step = step_times(a)
    load_after = os.getloadavg()
    text = table(rows, rows_step, a, commands, load_before, load_after)
    print(text)
    if a.write != "-":
        os.makedirs(os.path.dirname(a.write), exist_ok=True)
        with open(a.write, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.write)[0] + ".json", "w") as f:
            json.dump({"rows": rows, "step_s": rows_step, "args": vars(a)}, f, indent=2)
    return 0


def step_times(a, n: int = 10) -> dict:
    """Seconds per full-weight training step (forward, backward, AdamW) of teacher and students alone, on random
    16x16 latents and text states of the batch size, median of n after 2 warm-up steps."""
    import statistics
    import torch
    from minisd.formats import load_model
    from minisd.train.distill import build_student
    out = {}
    teacher = load_model(TEACHER).unet.float()
    nets = {"teacher": teacher}
    for r in a.recipes.split(","):
        nets[r], _ = build_student(teacher, r)
    g = torch.Generator().manual_seed(0)
    cfg = teacher.cfg
    x = torch.randn(a.batch, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(a.batch, 77, cfg.context_dim, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)
    for name, net in nets.items():
        net = net.to(a.device).train().requires_grad_(True)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        times, cpu = [], []
        for i in range(n + 2):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = net(x.to(a.device), t.to(a.device), ctx.to(a.device)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if a.device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        out[name] = {"wall": statistics.median(times), "cpu": statistics.median(cpu)}
    return out


def table(rows, step_s, a, commands, load_before, load_after) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}"  # noqa: E731
    lines = [f"# Distillation of minisd-tiny on the embedded world ({a.device}, {a.threads} thread(s))", "",
             f"Training: {a.steps} steps, batch {a.batch}, AdamW lr {a.lr}, captions dropped 10 %, plain world "
             f"({a.n_images} images). Sampling: DDIM {a.sample_steps} steps, guidance {a.cfg}, {a.n_eval} held-out "
             f"prompts (seed {a.seed}), batches of {a.sample_batch}. Probe fidelity in %.", "",
             "| model | UNet params | UNet fp16 file | s / image (wall) | CPU s / image | shape | colour | size | "
             "position | background | all 5 | train.py CPU s / step (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['params']:,} | {r['file'] / 1e6:.2f} MB | {r['s_per_image']:.3f} | "
                     f"{r['cpu_s_per_image']:.3f} | {pct(r['shape'])} | {pct(r['colour'])} | {pct(r['size'])} | "
                     f"{pct(r['position'])} | {pct(r['background'])} | {pct(r['all'])} | "
                     + (f"{r['cpu_s_per_step']:.2f} ({r['s_per_step']:.2f})" if "s_per_step" in r else "-") + " |")
    lines += ["", "Seconds per full-weight training step of the UNet alone (forward, backward, AdamW; batch "
              f"{a.batch}, 16x16 latents, median of 10), CPU (wall): "
              + ", ".join(f"{k} {v['cpu']:.3f} ({v['wall']:.3f})" for k, v in step_s.items())
              + ". A distillation step adds the teacher's forward to the student's step. The `train.py` column "
              "divides whole processes by the steps: start-up, caches and the final export included. On a shared "
              "machine the CPU seconds are the comparable numbers; wall seconds grow with the load.", "",
              f"Machine load (1/5/15-minute load average): before {load_before[0]:.1f}/{load_before[1]:.1f}/"
              f"{load_before[2]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}.", "",
              "Training commands (from the repository root):", ""]
    lines += [f"    python {c}" for c in commands]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
