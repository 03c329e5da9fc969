"""Turn a folder of bench results (OUT/CASE.IMPL.json) into BENCHMARKS.md: one table per group of cases, with the
ratio of minisd to the reference measured in the same run and whether each goal of issue 6 is met.

    python bench/report.py bench-out > BENCHMARKS.md
    python bench/report.py bench-out --write BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench.cases import BY_NAME, CASES, GROUPS  # noqa: E402
from bench.harness import Options  # noqa: E402

RECIPE = """\
Every row is one process (`bench/case.py`), run one after another by `bench/run.py`; "ratio" divides the minisd row
by the reference row of the same case from the same results folder. Random weights with the official shapes (minisd
presets SD15 / SDXL_BASE / LDM_256; diffusers and transformers models from the official configs).

- Training, both sides: frozen base in bf16 (UNet, text encoders), LoRA rank 16 alpha 16 on every attn1/attn2
  to_q, to_k, to_v, to_out.0 with fp32 adapter weights (minisd `adapters.inject`; peft `LoraConfig` +
  `unet.add_adapter` + `cast_training_params`), bf16 autocast, VAE encode in the dtype the row's flags name
  (`--vae-dtype bfloat16`, else fp32: minisd's train.py does with `--vae-dtype bf16` / `auto`; diffusers' SD1 LoRA
  script casts its VAE to the weight dtype, bf16, its SDXL script keeps the VAE in fp32) and the
  text encoder(s) inside the step, ε-MSE loss, backward, torch AdamW (fused), zero_grad. "cached" rows feed
  precomputed latents and text states: the step is the UNet alone. Checkpointing: minisd
  `minisd.perf.checkpoint.set_gradient_checkpointing(unet, True)`, diffusers `unet.enable_gradient_checkpointing()`.
- Full fine-tune: every UNet weight trains in fp32 (master weights) under bf16 autocast, checkpointing on; minisd
  `AdamW8bit` vs `bitsandbytes.optim.AdamW8bit`.
- Sampling: 30 DDIM steps, CFG 7.5 (one batch-2 UNet call per step), bf16 UNet and text encoders, fp32 VAE decode;
  minisd's DDIM loop vs `StableDiffusion(XL)Pipeline(..., output_type="latent")` with precomputed embeddings.
  UNet it/s = 30 / loop time (UNet + guidance + scheduler step); images/s counts text encode + loop + decode.
- Optimizer: one step over fp32 tensors shaped like the SD1.5 UNet (686 tensors, 860M parameters);
  bytes/param = optimizer state bytes / parameters.
- step ms: median of the timed iterations, `torch.cuda.synchronize()` around each. Peak GiB: max allocated / reserved
  over the whole process. MFU: matmul + conv + attention FLOPs of one step (FlopCounterMode, without checkpointing's
  recomputation) per second, over the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s).
- Allocator: `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` for every row (set by run.py).
- diffusers-compiled (the fair rival, issue 20): the diffusers row plus what diffusers' docs recommend for speed:
  UNet and VAE in channels-last, inductor conv_1x1_as_mm, no epilogue fusion (not coordinate-descent tuning: with it the compile ran past 540 s),
  `torch.compile(unet, fullgraph=True)` and the VAE encoder compiled, TF32 on (bench/training.py
  `compile_reference`). Its ratio column divides the same minisd row.
- 8-bit base rows: minisd's frozen UNet and text encoders quantized after the LoRA goes in
  (`minisd.perf.quant.quantize_frozen`, train.py --base-dtype int8 / fp8); diffusers + peft over bf16.
- Full fine-tune with the memory tools: as above plus minisd's fused backward (`minisd.train.fused`,
  train.py --fused-backward); diffusers' row is train_text_to_image's (bitsandbytes AdamW8bit, checkpointing).
- Methods (bench/methods.py): textual inversion (minisd: one spliced vector per encoder; diffusers: the whole
  token table trains, other rows restored after each step), DreamBooth LoRA + prior preservation (B instance +
  B class images per step, images/s counts both), hypernetwork and distillation (minisd only; the "teacher" row
  is the teacher's own full fine-tune, the students' step time is read against it).
"""


def load(folder: str) -> tuple[dict, list]:
    rows = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.basename(path) == "run.json":
            continue
        with open(path) as f:
            r = json.load(f)
        rows[(r["case"], r["impl"])] = r
    runs_file = os.path.join(folder, "run.json")
    runs = json.load(open(runs_file)) if os.path.isfile(runs_file) else []
    return rows, runs


def fmt(v, digits: int = 1, suffix: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:.0f}{suffix}"
    return f"{v:.{digits}f}{suffix}"


def flags(r: dict) -> str:
    """The non-default speed options of a row, as case.py flags."""
    opts, default = r.get("options") or {}, vars(Options())
    out = []
    for k, v in opts.items():
        if k in default and v != default[k]:
            name = "--" + k.replace("_", "-")
            out.append(name if v is True else f"--no-{k.replace('_', '-')}" if v is False else f"{name} {v}")
    return " ".join(out)


def ratio(rows: dict, case, ref: str | None = None) -> float | None:
    """minisd / `ref` (default: the case's first reference) of the headline metric, both rows ok."""
    ref = ref or case.reference
    a, b = rows.get((case.name, "minisd")), rows.get((case.name, ref))
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    x, y = a.get(case.headline), b.get(case.headline)
    return x / y if x and y else None


def versus(rows: dict, case) -> float | None:
    """The minisd row of `case` over the minisd row of `case.versus` (headline metric), both ok."""
    a, b = rows.get((case.name, "minisd")), rows.get((case.versus, "minisd"))
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    x, y = a.get(case.headline), b.get(case.headline)
    return x / y if x and y else None


def goals(rows: dict, case, r: dict) -> tuple[str, str]:
    """(targets, met) cells of the minisd row."""
    if r["impl"] != "minisd" or not case.targets:
        return "", ""
    labels, met = [], []
    for t in case.targets:
        v = ratio(rows, case, t.ref) if t.metric == "ratio" else (r.get(t.metric) if r.get("status") == "ok" else None)
        ok = t.met(v)
        labels.append(t.label(case.headline, case.reference))
        met.append("–" if ok is None else ("yes" if ok else "**no**"))
    return "; ".join(labels), "; ".join(met)


COLUMNS = {
    "train": [("step ms", lambda r: fmt(r.get("step_ms"))), ("images/s", lambda r: fmt(r.get("images_per_s"), 2)),
              ("peak alloc GiB", lambda r: fmt(r.get("peak_alloc_gib"), 2)),
              ("peak reserved GiB", lambda r: fmt(r.get("peak_reserved_gib"), 2)),
              ("MFU", lambda r: fmt(None if r.get("mfu") is None else 100 * r["mfu"], 1, " %"))],
    "sample": [("UNet it/s", lambda r: fmt(r.get("unet_it_s"), 2)), ("text ms", lambda r: fmt(r.get("text_ms"))),
               ("loop ms", lambda r: fmt(r.get("loop_ms"))), ("decode ms", lambda r: fmt(r.get("decode_ms"))),
               ("images/s", lambda r: fmt(r.get("images_per_s"), 3)),
               ("peak alloc GiB", lambda r: fmt(r.get("peak_alloc_gib"), 2)),
               ("peak reserved GiB", lambda r: fmt(r.get("peak_reserved_gib"), 2)),
               ("MFU", lambda r: fmt(None if r.get("mfu") is None else 100 * r["mfu"], 1, " %"))],
    "optim": [("ms/step", lambda r: fmt(r.get("step_ms"), 2)),
              ("state bytes/param", lambda r: fmt(r.get("state_bytes_per_param"), 3)),
              ("state GiB", lambda r: fmt(r.get("state_gib"), 2)),
              ("peak alloc GiB", lambda r: fmt(r.get("peak_alloc_gib"), 2))],
}
RATIO_OF = {"train": "images/s", "sample": "UNet it/s", "optim": "steps/s"}


def table(rows: dict, group: str) -> list[str]:
    cases = [c for c in CASES if c.group == group and any((c.name, i) in rows for i in c.impls)]
    if not cases:
        return []
    kind = cases[0].kind
    cols = COLUMNS[kind]
    # one ratio column per reference of the group (issue 20: plain and compiled diffusers side by side)
    refs = []
    for c in cases:
        refs += [x for x in c.references if x not in refs]
    ratio_head = ([f"ratio ({RATIO_OF[kind]})"] if len(refs) <= 1 else
                  [f"ratio vs {x} ({RATIO_OF[kind]})" for x in refs])
    head = ["case", "impl", *[name for name, _ in cols], *ratio_head, "target", "met", "flags"]
    out = [f"## {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        for impl in c.impls:
            r = rows.get((c.name, impl))
            if r is None:
                continue
            if r.get("status") == "ok":
                cells = [f(r) for _, f in cols]
            else:
                cells = [f"{r.get('status')}: {r.get('error') or ''}".replace("|", "/")] + ["–"] * (len(cols) - 1)
            qs = [ratio(rows, c, x) if impl == "minisd" and x in c.references else None for x in refs or [None]]
            qs = ["" if q is None else f"{q:.2f}×" for q in qs]
            if impl == "minisd" and c.versus:   # a minisd-only row read against another minisd row (distillation)
                q = versus(rows, c)
                qs[0] = "" if q is None else f"{q:.2f}× {c.versus}"
            target, met = goals(rows, c, r)
            out.append("| " + " | ".join([c.name, impl, *cells, *qs,
                                          target, met, flags(r)]) + " |")
    return out + [""]


def header(rows: dict, runs: list) -> list[str]:
    def values(get):
        vs = []
        for r in rows.values():
            v = get(r)
            if v and v not in vs:
                vs.append(v)
        return " / ".join(str(v) for v in vs) or "?"
    ver = lambda k: values(lambda r: (r.get("versions") or {}).get(k))
    dates = sorted(r["date"] for r in rows.values() if r.get("date"))
    lines = ["# Benchmarks: minisd vs diffusers + peft", "",
             f"- GPU: {values(lambda r: r.get('device'))}",
             f"- torch {ver('torch')} (CUDA {ver('cuda')}, cuDNN {ver('cudnn')}), diffusers {ver('diffusers')}, "
             f"peft {ver('peft')}, transformers {ver('transformers')}, bitsandbytes {ver('bitsandbytes')}, "
             f"python {ver('python')}",
             f"- minisd commit: {ver('minisd')}",
             f"- measured: {dates[0] if dates else '?'} … {dates[-1] if dates else '?'} (UTC)", "",
             "Reproduce (from the repository root; the run.py invocations that produced this folder):", "", "```"]
    for run in runs:
        pp = f"PYTHONPATH={run['pythonpath']} " if run.get("pythonpath") else ""
        lines.append(pp + run["command"])
    lines += ["python bench/report.py OUT --write BENCHMARKS.md", "```", "",
              "Each row's own command is the `command` field of its JSON (e.g. `python bench/case.py "
              "sd15-lora-512-bs8 --impl minisd --out OUT`).", "", "### How it is measured", "", RECIPE]
    tiny = [r for r in rows.values() if r.get("tiny")]
    if tiny:
        lines += ["**These are --tiny smoke-test numbers (tiny models, CPU): they say nothing about speed.**", ""]
    return lines


def render(folder: str) -> str:
    rows, runs = load(folder)
    lines = header(rows, runs)
    for g in GROUPS:
        lines += table(rows, g)
    unknown = sorted({case for case, _ in rows if case not in BY_NAME})
    if unknown:
        lines += [f"Results of cases no longer in bench/cases.py (not shown): {', '.join(unknown)}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="results folder of bench/run.py")
    p.add_argument("--write", default=None, help="write the markdown to this file instead of stdout")
    p.add_argument("--commit", default=None, help="the minisd commit measured, when the results do not know it")
    p.add_argument("--notes", default=None, help="a markdown file appended at the end (findings, profiles)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.folder):
        print(f"error: {a.folder}: no such folder", file=sys.stderr)
        return 2
    text = render(a.folder)
    if a.commit:
        text = re.sub(r"(?m)^- minisd commit: .*$", f"- minisd commit: {a.commit}", text)
    if a.notes:
        with open(a.notes) as f:
            text += "\n" + f.read()
    if a.write:
        with open(a.write + ".tmp", "w") as f:
            f.write(text)
        os.replace(a.write + ".tmp", a.write)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
