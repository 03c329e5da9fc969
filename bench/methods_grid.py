"""The fine-tuning method grid on the embedded world (issue 17): train each cell for several seeds, draw held-out
prompts with the result, read them with the probe, and tabulate mean ± spread.

    python bench/methods_grid.py --out out/methods                           # every cell, 3 seeds, CPU
    python bench/methods_grid.py --cells lora-attn-te0-do0,full --seeds 0 --steps 20 --jobs 2
    python bench/methods_grid.py --list                                      # the cells and their flags

Two tasks, both on weights/minisd-tiny and data from the world generator (minisd/world/__init__.py):

  style    the "outlined" style (train.py's default run): --n-images world images in the style. Scored on
           --n-eval held-out prompts in the style (style adoption; shape / colour / position / all-attribute
           accuracy) and --n-eval held-out plain prompts (style leak: plain prompts drawn outlined).
  subject  the subject `sks emblem` (a teal crescent with a pink dot): --n-subject images of it. Scored on held-out
           subject prompts (subject fidelity: read as the subject; size / position / background accuracy), plain
           held-out prompts (subject leak into ordinary prompts; shape / colour accuracy) and the class prompt
           "an emblem" (class leak: the DreamBooth language drift prior preservation is meant to prevent).

Cells: seed-002's LoRA grid on the style (UNet targets attn1 / attn / attn-mlp / full × text-encoder LoRA yes/no ×
LoRA dropout 0/0.5; DoRA + Prodigy; LoHa; LoKr) and seed-004's methods on the subject (LoRA, full fine-tune,
DreamBooth with and without prior preservation, with LoRA and with full; textual inversion with and without the norm
regulariser; hypernetwork). A cell is a list of train.py flags (`CELLS`); one whose flags train.py refuses (e.g. a
method this checkout lacks) is recorded with its error line and the grid goes on. How a run's files are loaded for
sampling is `LOADERS`: model/ (full), lora.safetensors (adapters), an embedding file, a hypernetwork file.

Every (cell, seed) runs in its own process (`--jobs N` at once), writes OUT/runs/CELL/seed_S/result.json and is
skipped when that file exists, so an interrupted grid continues. Recorded per run: the probe's fractions, trainable
parameters (train.py's count), output file size, seconds per step (training only), the last loss. At the end:
OUT/results.json (every run and the per-cell mean / standard deviation) and OUT/results.md (the table).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STYLE_BASE = ["--lr", "3e-3", "--lr-scheduler", "cosine", "--targets", "full"]  # train.py's default world recipe
SUBJECT_PROMPT, CLASS_PROMPT = "a sks emblem", "an emblem"


def _style_cells() -> dict:
    cells = {}
    for targets in ("attn1", "attn", "attn-mlp", "full"):
        for te in (0, 1):
            for dropout in (0, 5):
                flags = STYLE_BASE[:-1] + [targets, "--dropout", f"0.{dropout}"]
                flags += ["--train-text-encoder", "--te-lr", "3e-4"] if te else []
                cells[f"lora-{targets}-te{te}-do{dropout}"] = ("style", flags)
    cells["dora-prodigy"] = ("style", ["--network", "dora", "--optimizer", "prodigy", "--lr", "1",
                                       "--lr-scheduler", "cosine", "--targets", "full"])
    cells["loha"] = ("style", STYLE_BASE + ["--network", "loha"])
    cells["lokr"] = ("style", STYLE_BASE + ["--network", "lokr"])
    return cells


def _subject_cells() -> dict:
    prior = ["--class-prompt", CLASS_PROMPT, "--class-data", "{class_data}", "--num-class-images", "{n_class}"]
    full = ["--method", "full", "--lr", "1e-4", "--lr-scheduler", "cosine"]  # train.py's world default; not tuned
    lora = ["--lr", "3e-3", "--lr-scheduler", "cosine", "--targets", "full"]
    ti = ["--method", "ti", "--ti-token", "<sks>", "--ti-init", "circle", "--lr", "5e-3"]
    return {
        "subject-lora": ("subject", lora),
        "subject-full": ("subject", full),
        "db-full-noprior": ("subject", full + ["--instance-prompt", SUBJECT_PROMPT]),
        "db-full-prior": ("subject", full + ["--instance-prompt", SUBJECT_PROMPT] + prior),
        "db-lora-noprior": ("subject", lora + ["--instance-prompt", SUBJECT_PROMPT]),
        "db-lora-prior": ("subject", lora + ["--instance-prompt", SUBJECT_PROMPT] + prior),
        # textual inversion / hypernetworks: train.py flags of the `ti` branch (issue 17; refused where absent). A
        # TI token must be a new word, so its cells' subject data and prompts say "<sks> emblem" (`TOKENS`)
        "ti": ("subject", ti),
        "ti-normreg": ("subject", ti + ["--ti-norm-weight", "0.01"]),
        "hypernetwork": ("subject", ["--method", "hypernetwork", "--lr", "1e-3", "--lr-scheduler", "cosine"]),
    }


CELLS = {**_style_cells(), **_subject_cells()}
TOKENS = {"ti": "<sks>", "ti-normreg": "<sks>"}  # the subject's word in a cell's data and prompts (default sks)


# ------------------------------------------------------------------------------------------- one run
def load_result_model(run: str, base: str):
    """The model a run produced, ready to sample: the first of LOADERS that finds its file. Returns
    (model, main output file)."""
    from minisd.formats import load_model
    for pattern, apply in LOADERS:
        found = sorted(glob.glob(os.path.join(run, pattern)))
        if found:
            return apply(found[0], base, load_model), found[0]
    raise FileNotFoundError(f"{run}: no output file of a known method ({', '.join(p for p, _ in LOADERS)})")


def _full(path, base, load_model):
    return load_model(os.path.dirname(path))


def _lora(path, base, load_model):
    from minisd.adapters.mix import apply_adapters
    from minisd.formats.lora_read import read_adapter_file
    model = load_model(base)
    f = read_adapter_file(model, path)
    apply_adapters(model, [(f.modules, f.ranks, 1.0, path)])
    return model


def _embedding(path, base, load_model, token="<sks>"):
    from minisd.adapters.embeddings import load_embedding
    model = load_model(base)
    load_embedding(model, path, token)
    return model


def _hypernetwork(path, base, load_model):  # the `ti` branch's reader (ImportError where absent)
    from minisd.adapters.hypernetwork import load_hypernetwork
    model = load_model(base)
    load_hypernetwork(model, path)
    return model


# (glob in the run folder, loader); model/ first: a full fine-tune's folder holds the whole model
LOADERS = [("model/config.json", _full), ("lora.safetensors", _lora), ("hypernetwork.safetensors", _hypernetwork),
           ("embedding.safetensors", _embedding), ("learned_embeds.safetensors", _embedding)]


def _draw(model, prompts, args, device) -> list:
    import torch
    from minisd.pipeline import Pipeline
    pipe = Pipeline(model, device=device, dtype=torch.float32)
    images = []
    for i in range(0, len(prompts), 8):  # chunks of 8 prompts bound the attention memory, as train.py's grids
        images += pipe(prompts[i:i + 8], steps=args.sample_steps, cfg_scale=args.sample_cfg, seed=1000 + i)
    return images


def score_run(run: str, task: str, seed: int, args, device: str) -> dict:
    """Draw the task's held-out prompts with the run's result and read them with the probe."""
    from minisd import world
    from minisd.world.probe import frac, load_probe, read, score
    model, main_file = load_result_model(run, args.model)
    token = TOKENS.get(os.path.basename(os.path.dirname(run)), world.SUBJECT_TOKEN)
    probe = load_probe()
    n, out = args.n_eval, {}
    plain = world.sample(n, seed=20_000 + seed, split="heldout")
    res = score(_draw(model, [c for _, c in plain], args, device), [a for a, _ in plain], probe)
    if task == "style":
        styled = world.sample(n, seed=10_000 + seed, split="heldout", style="outlined")
        got = score(_draw(model, [c for _, c in styled], args, device), [a for a, _ in styled], probe)
        out.update({k: got[k] for k in ("style_adoption", "shape", "colour", "position", "all")})
        out.update({"leak": res["style_leak"], "plain_shape": res["shape"], "plain_colour": res["colour"]})
    else:
        subj = world.sample(n, seed=10_000 + seed, split="heldout", subject=True, token=token)
        got = score(_draw(model, [c for _, c in subj], args, device), [a for a, _ in subj], probe)
        out.update({"subject": got["subject"], "size": got["size"], "position": got["position"],
                    "background": got["background"]})
        out.update({"leak": res["subject_leak"], "plain_shape": res["shape"], "plain_colour": res["colour"]})
        cls = read(_draw(model, [CLASS_PROMPT] * n, args, device), probe)
        out["class_leak"] = frac([p.subject for p in cls])
    out["file_mb"] = os.path.getsize(main_file) / 1e6 if os.path.isfile(main_file) else _folder_mb(
        os.path.dirname(main_file))
    if main_file.endswith("config.json"):  # the full fine-tune: the official single file beside the folder
        single = os.path.join(run, "model.safetensors")
        out["file_mb"] = os.path.getsize(single) / 1e6 if os.path.isfile(single) else out["file_mb"]
    return out


def _folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1e6


def make_data(args, task: str, token: str = "sks") -> str:
    """The task's training folder under OUT/data (written once; world.write_folder is a pure function of its seed)."""
    from minisd import world
    folder = os.path.join(args.out, "data", task if token == world.SUBJECT_TOKEN or task == "style"
                          else f"{task}-{token.strip('<>')}-token")
    if not os.path.isfile(os.path.join(folder, "attributes.jsonl")):
        tmp = folder + f".tmp{os.getpid()}"
        if task == "style":
            world.write_folder(tmp, args.n_images, seed=0, split="train", style="outlined")
        else:
            world.write_folder(tmp, args.n_subject, seed=0, split="train", subject=True, token=token)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def run_one(cell: str, seed: int, args) -> dict:
    """Train (cell, seed) with train.py in a subprocess, score it here; the result dict (also result.json)."""
    task, flags = CELLS[cell]
    run = os.path.join(args.out, "runs", cell, f"seed_{seed}")
    done = os.path.join(run, "result.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    subs = {"class_data": os.path.join(args.out, "data", "class-images"), "n_class": str(args.n_class)}
    flags = [f.format(**subs) for f in flags]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", args.model, "--data", make_data(args, task, TOKENS.get(cell, "sks")),
           "--out", run, "--seed", str(seed), "--max-steps", str(args.steps), "--no-samples", "--no-progress",
           "--threads", str(args.threads), "--device", args.device, "--save-every", "0", *flags]
    os.makedirs(run, exist_ok=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    with open(os.path.join(run, "train.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    result = {"cell": cell, "seed": seed, "task": task, "flags": flags, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        result["error"] = err[-1] if err else (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        print(f"{cell} seed {seed}: {result['error']}", flush=True)
        return result  # not written: a later run with the method present retries it
    m = re.search(r"([\d,]+) trainable parameters", proc.stdout)
    result["trainable_params"] = int(m.group(1).replace(",", "")) if m else None
    m = re.search(r"trained \d+ steps in ([\d.]+) s", proc.stdout)
    result["s_per_step"] = float(m.group(1)) / args.steps if m else None
    losses = [json.loads(line) for line in open(os.path.join(run, "loss.jsonl"))]
    result["final_loss"] = statistics.fmean(r["loss"] for r in losses[-10:])
    result.update(score_run(run, task, seed, args, args.device if args.device != "auto" else "cpu"))
    with open(done + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(done + ".tmp", done)
    print(f"{cell} seed {seed}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()
                                              if isinstance(v, float)), flush=True)
    return result


# ------------------------------------------------------------------------------------------- the grid
METRICS = {"style": ["style_adoption", "shape", "colour", "position", "all", "leak", "plain_shape", "plain_colour"],
           "subject": ["subject", "size", "position", "background", "leak", "class_leak", "plain_shape",
                       "plain_colour"]}
COSTS = ["trainable_params", "file_mb", "s_per_step", "final_loss"]


def aggregate(results: list[dict]) -> dict:
    """{cell: {metric: [mean, standard deviation, n]}} over the seeds that finished."""
    out = {}
    for cell in dict.fromkeys(r["cell"] for r in results):
        rows = [r for r in results if r["cell"] == cell and "error" not in r]
        errors = sorted({r["error"] for r in results if r["cell"] == cell and "error" in r})
        task = CELLS[cell][0]
        agg = {"task": task, "seeds": len(rows), "errors": errors}
        for k in METRICS[task] + COSTS:
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                agg[k] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)]
        out[cell] = agg
    return out


def table(agg: dict, task: str) -> str:
    """A Markdown table of one task's cells: percentages as mean ± standard deviation over the seeds."""
    cells = {c: a for c, a in agg.items() if a["task"] == task}
    if not cells:
        return ""
    cols = METRICS[task] + COSTS
    lines = ["| cell | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for cell, a in cells.items():
        row = []
        for k in cols:
            if k not in a:
                row.append("-")
            elif k in METRICS[task]:
                row.append(f"{100 * a[k][0]:.0f} ± {100 * a[k][1]:.0f} %")
            elif k == "trainable_params":
                row.append(f"{a[k][0]:,.0f}")
            else:
                row.append(f"{a[k][0]:.3g}")
        note = f" ({a['errors'][0]})" if a["errors"] and not a["seeds"] else ""
        lines.append(f"| {cell}{note} | {a['seeds']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/methods_grid.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/methods", help="results folder (default out/methods)")
    p.add_argument("--cells", default=None, help="comma-separated cell names (default: all; --list shows them)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every cell (default 300)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--jobs", type=int, default=1, help="(cell, seed) runs at once, each its own process (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--model", default=os.path.join(ROOT, "weights", "minisd-tiny"), help="base model")
    p.add_argument("--n-images", type=int, default=400, help="style training images (default 400)")
    p.add_argument("--n-subject", type=int, default=24, help="subject training images (default 24)")
    p.add_argument("--n-class", type=int, default=48, help="DreamBooth class images (default 48)")
    p.add_argument("--n-eval", type=int, default=32, help="held-out prompts per kind (default 32)")
    p.add_argument("--sample-steps", type=int, default=15, help="DDIM steps of the scored images (default 15)")
    p.add_argument("--sample-cfg", type=float, default=5.0, help="guidance of the scored images (default 5)")
    p.add_argument("--list", action="store_true", help="print the cells and their flags, then exit")
    p.add_argument("--report", action="store_true", help="run nothing: tabulate the runs already finished in --out "
                                                         "(e.g. after a time limit stopped the grid)")
    p.add_argument("--worker", nargs=2, metavar=("CELL", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.cells = list(CELLS) if a.cells is None else [c.strip() for c in a.cells.split(",") if c.strip()]
    unknown = [c for c in a.cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cell(s) {', '.join(unknown)} (--list shows them)")
    try:
        a.seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if a.steps < 1 or a.jobs < 1 or a.n_eval < 1:
        p.error("--steps, --jobs and --n-eval must be >= 1")
    a.out = os.path.abspath(a.out)
    a.model = a.model if not os.path.exists(a.model) else os.path.abspath(a.model)
    return a


def _worker_cmd(args, cell: str, seed: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", cell, str(seed), "--out", args.out,
            "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads), "--model",
            args.model, "--n-images", str(args.n_images), "--n-subject", str(args.n_subject), "--n-class",
            str(args.n_class), "--n-eval", str(args.n_eval), "--sample-steps", str(args.sample_steps),
            "--sample-cfg", str(args.sample_cfg)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for cell, (task, flags) in CELLS.items():
            print(f"{cell:22s} {task:8s} {shlex.join(flags)}")
        return 0
    if args.worker:  # one (cell, seed), in this process
        import torch
        torch.set_num_threads(args.threads)
        result = run_one(args.worker[0], int(args.worker[1]), args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    for task, token in dict.fromkeys((CELLS[c][0], TOKENS.get(c, "sks")) for c in args.cells):
        if not args.report:
            make_data(args, task, token)  # data first, once, before the parallel runs
    jobs = [(c, s) for c in args.cells for s in args.seeds]
    print(f"{len(jobs)} runs ({len(args.cells)} cells x {len(args.seeds)} seeds), {args.jobs} at a time, "
          f"{args.steps} steps each, on {args.device}; results in {args.out}", flush=True)

    def launch(job):
        proc = subprocess.run(_worker_cmd(args, *job), capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"cell": job[0], "seed": job[1], "task": CELLS[job[0]][0], "error": f"worker failed: {tail}"}
        return json.loads(line[len("RESULT "):])

    from tqdm import tqdm
    results = []
    if args.report:  # only what finished: result.json of each (cell, seed) run
        for cell, seed in jobs:
            done = os.path.join(args.out, "runs", cell, f"seed_{seed}", "result.json")
            if os.path.isfile(done):
                with open(done) as f:
                    results.append(json.load(f))
        print(f"{len(results)} of {len(jobs)} runs finished", flush=True)
        jobs = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in tqdm(pool.map(launch, jobs), total=len(jobs), desc="grid", unit="run"):
            results.append(r)
            if "error" in r:
                print(f"  {r['cell']} seed {r['seed']}: {r['error']}", flush=True)
    agg = aggregate(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "list", "report")},
                   "cells": agg, "runs": results}, f, indent=2)
    md = [f"# Method grid ({args.steps} steps, seeds {', '.join(map(str, args.seeds))}, {args.n_eval} held-out "
          f"prompts per kind, DDIM {args.sample_steps} cfg {args.sample_cfg}, {args.device})", ""]
    for task in ("style", "subject"):
        t = table(agg, task)
        if t:
            md += [f"## {task}", "", t, ""]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
