"""`python sample.py` (no arguments) against diffusers doing the same work, on the CPU, whole processes.

Both sides read the same minisd-tiny weights: minisd from weights/minisd-tiny, diffusers from a copy exported to its
layout by `convert.py weights/minisd-tiny --to diffusers DIR` (DDIMScheduler swapped in from its config). Both do
sample.py's default job: the 8 held-out world prompts of its grid, DDIM 12 steps, guidance 3, seed 0, 64 px, fp32,
the same CPU thread count (the one sample.py picks from the load, read from its PNG), and write a PNG grid.

    A  `python sample.py --out A.png`               the command a user types (captioned grid)
    B  `python bench/startup.py --child diffusers`  StableDiffusionPipeline.from_pretrained(DIR) + the same call
    C  `python bench/startup.py --child minisd`     sample.py's grid with the phases timed (import, load, sample)

Each round runs A, B, C in fresh processes, one after the other, so a drift of the machine's speed hits both sides;
the ratio A/B is taken within each round and its median reported, with the medians of wall and CPU (user + sys)
seconds and the 1-minute load average before each run (on a shared machine say how busy it was). One warm-up round
is not counted (page cache). B's and C's images are compared pixel by pixel: the same work, not just similar.

    python bench/startup.py                         # 5 rounds; writes bench/results/startup-cpu.md
    python bench/startup.py --rounds 3 --write -    # print only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "weights", "minisd-tiny")


def plain_grid(images, cols: int = 4):
    """Images side by side, `cols` per row, no captions (what both children write)."""
    from PIL import Image
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, -(-len(images) // cols) * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def child(side: str, job: dict) -> None:
    """One side's job in this process, phases timed from the first import of torch; prints them as JSON."""
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(job["threads"])
    if side == "minisd":
        sys.path.insert(0, ROOT)
        from minisd.formats import load_model
        from minisd.pipeline import Pipeline
        t1 = time.perf_counter()
        pipe = Pipeline(load_model(MODEL), device="cpu")
        t2 = time.perf_counter()
        images = pipe(job["prompts"], steps=job["steps"], sampler="ddim", cfg_scale=job["cfg"], seed=job["seed"])
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        t1 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(job["diffusers"], torch_dtype=torch.float32,
                                                       safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        t2 = time.perf_counter()
        images = pipe(job["prompts"], num_inference_steps=job["steps"], guidance_scale=job["cfg"],
                      generator=torch.Generator().manual_seed(job["seed"])).images
    t3 = time.perf_counter()
    plain_grid(images).save(job["out_" + side])
    t4 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "load": t2 - t1, "sample": t3 - t2, "save": t4 - t3}))


def timed_run(cmd: list[str]) -> dict:
    """Wall and CPU (user + sys, from the OS's accounting of the finished child) seconds of one process."""
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load, "stdout": p.stdout}


def med(xs):
    return statistics.median(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides (default: A runs as a user types it, picking its own count from "
                        "the machine's load, and B and C then use the count A wrote into its PNG)")
    p.add_argument("--write", default=os.path.join(ROOT, "bench", "results", "startup-cpu.md"),
                   help="results file ('-': print only)")
    p.add_argument("--child", choices=["minisd", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        with open(a.job) as f:
            child(a.child, json.load(f))
        return 0
    if a.rounds < 1 or (a.threads is not None and a.threads < 1):
        p.error("--rounds and --threads must be at least 1")

    sys.path.insert(0, ROOT)
    import sample
    from minisd.world.fidelity import grid_prompts
    tmp = tempfile.mkdtemp(prefix="minisd-startup-")
    exported = os.path.join(tmp, "minisd-tiny-diffusers")
    subprocess.run([sys.executable, "convert.py", MODEL, "--to", "diffusers", exported], cwd=ROOT, check=True,
                   capture_output=True)
    job = {"prompts": grid_prompts(sample.GRID_PROMPTS), "steps": sample.GRID_STEPS, "cfg": sample.GRID_CFG,
           "seed": 0, "threads": a.threads, "diffusers": exported,
           "out_minisd": os.path.join(tmp, "C.png"), "out_diffusers": os.path.join(tmp, "B.png")}
    job_file = os.path.join(tmp, "job.json")
    with open(job_file, "w") as f:
        json.dump(job, f)
    cmds = {"A": [sys.executable, "sample.py", "--out", os.path.join(tmp, "A.png"), "--overwrite"]
                 + (["--threads", str(a.threads)] if a.threads else []),
            "B": [sys.executable, "bench/startup.py", "--child", "diffusers", "--job", job_file],
            "C": [sys.executable, "bench/startup.py", "--child", "minisd", "--job", job_file]}
    runs = {k: [] for k in cmds}
    picked = []  # the thread count A used in each counted round (sample.py writes it into the PNG)
    for r in range(a.rounds + 1):                       # round 0 warms the page cache and is not counted
        for k, cmd in cmds.items():
            res = timed_run(cmd)
            if k == "A":
                from PIL import Image
                text = Image.open(os.path.join(tmp, "A.png")).text.get("parameters", "")
                job["threads"] = int(text.rsplit("Threads: ", 1)[1].split(",")[0])
                with open(job_file, "w") as f:
                    json.dump(job, f)
                if r:
                    picked.append(job["threads"])
            if r:
                runs[k].append(res)
        print(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(
            f"{k} {runs[k][-1]['wall']:.1f} s" if r else k for k in cmds), file=sys.stderr)

    import numpy as np
    from PIL import Image
    diff = np.abs(np.asarray(Image.open(job["out_minisd"])).astype(int)
                  - np.asarray(Image.open(job["out_diffusers"])).astype(int)).max()
    phases = {k: {ph: med([json.loads(x["stdout"])[ph] for x in runs[k]]) for ph in ("import", "load", "sample")}
              for k in ("B", "C")}
    ratio = [x["wall"] / y["wall"] for x, y in zip(runs["A"], runs["B"])]
    cpu_ratio = [x["cpu"] / y["cpu"] for x, y in zip(runs["A"], runs["B"])]
    loads = [x["load"] for k in runs for x in runs[k]]
    import diffusers
    import torch
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    lines = [
        "# `python sample.py` start-up and grid vs diffusers (bench/startup.py)", "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit}; {cpu_model}, {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"thread count per round (A's own pick from the load, B and C the same): {picked}; {a.rounds} rounds after "
        "a warm-up.",
        f"1-minute load average before the runs: min {min(loads):.1f}, median {med(loads):.1f}, max {max(loads):.1f} "
        f"(on {os.cpu_count()} CPUs: {'idle' if max(loads) < 0.5 else 'shared with other work, wall times inflated'})."
        , "",
        "| process | wall s (median, min-max) | CPU s user+sys (median) |", "|---|---|---|"]
    names = {"A": "A `python sample.py` (minisd)", "B": "B diffusers, same job", "C": "C minisd, same job, phases"}
    for k in cmds:
        w = [x["wall"] for x in runs[k]]
        lines.append(f"| {names[k]} | {med(w):.2f} ({min(w):.2f}-{max(w):.2f}) | {med([x['cpu'] for x in runs[k]]):.2f} |")
    lines += ["", f"A / B wall: median {med(ratio):.2f} (min {min(ratio):.2f}, max {max(ratio):.2f}); "
                  f"A / B CPU: median {med(cpu_ratio):.2f}.", "",
              "| phase, median wall s | minisd (C) | diffusers (B) |", "|---|---|---|"]
    for ph, what in (("import", "import torch + library"), ("load", "build + load weights"),
                     ("sample", "8 prompts x 12 steps + decode")):
        lines.append(f"| {what} | {phases['C'][ph]:.2f} | {phases['B'][ph]:.2f} |")
    lines += ["", f"Images of B and C: max pixel difference {diff} (0: identical)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write != "-":
        os.makedirs(os.path.dirname(os.path.abspath(a.write)), exist_ok=True)
        with open(a.write, "w") as f:
            f.write(text)
        print(f"wrote {a.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
