"""Convert official Stable Diffusion / LDM checkpoints to minisd folders, and back.

    python convert.py SRC --out weights/NAME [--dtype fp16|bf16|fp32] [--family auto|sd1|sd2|sdxl|ldm]
                      [--prediction eps|v] [--ema|--no-ema] [--explain]
    python convert.py weights/NAME --to single-file OUT.safetensors
    python convert.py weights/NAME --to diffusers OUT_DIR

SRC is an official single file (.safetensors, or .ckpt loaded with weights_only=True) or a diffusers
folder. `--explain` prints every source tensor -> minisd parameter (or "ignored: reason"). Output is
written to a temporary folder and renamed into place: a failed run leaves nothing at --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Convert official SD checkpoints to minisd folders and back.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", help="single file (.safetensors/.ckpt), diffusers folder, or minisd folder (with --to)")
    p.add_argument("--out", help="minisd folder to write (import)")
    p.add_argument("--to", nargs=2, metavar=("FORMAT", "DEST"),
                   help="export a minisd folder: 'single-file OUT.safetensors' or 'diffusers DIR'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written tensors (default: keep the source's)")
    p.add_argument("--family", choices=["auto", "sd1", "sd2", "sdxl", "ldm"], default="auto",
                   help="the source's family (default: detected from the keys or the folder's components). A "
                        "diffusers folder cannot tell SD1 from SD2 for sure (only the text encoder's activation "
                        "does): sd1/sd2 decides it. A family the source contradicts is an error")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="override the prediction type (SD2 files cannot tell; default: 768-v)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="use the EMA UNet copy of a full SD1/SD2 file (default when present)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw (non-EMA) UNet weights")
    p.add_argument("--explain", action="store_true", help="print every source tensor -> minisd parameter")
    a = p.parse_args(argv)
    if bool(a.out) == bool(a.to):
        p.error("give exactly one of --out (import) or --to FORMAT DEST (export)")
    if a.to and a.to[0] not in ("single-file", "diffusers"):
        p.error("--to takes 'single-file' or 'diffusers'")
    return a


def summary(model, src, ema_used, n_src, dtype_name) -> str:
    cfg = model.cfg
    lines = [f"{src}: {cfg.family} ({cfg.schedule.prediction_type}, {cfg.resolution}px, "
             f"EMA {'used' if ema_used else 'not used'})"]
    comps = [("unet", model.unet), ("vae", model.vae)] + [
        (f"text_encoder{'' if i == 0 else f'_{i + 1}'}", te) for i, te in enumerate(model.text_encoders)]
    for name, m in comps:
        sd = m.state_dict()
        params = sum(v.numel() for v in sd.values())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
        lines.append(f"  {name:15s} {len(sd):5d} tensors {params / 1e6:9.1f}M params  {'/'.join(dtypes)}")
    lines.append(f"  {n_src} source tensors; written as {dtype_name}")
    return "\n".join(lines)


def import_model(a):
    import torch

    from minisd.formats import is_diffusers_folder, load_diffusers_folder
    from minisd.model import ModelError, is_minisd_folder, save_model
    from minisd.formats.single_file import load_single_file

    src = a.src
    extras, trace, ema_used, source = {}, [], False, {}
    if os.path.isdir(src):
        if is_minisd_folder(src):
            raise ModelError(f"{src}: already a minisd folder (use --to to export it)")
        if not is_diffusers_folder(src):
            raise ModelError(f"{src}: not a diffusers folder (no model_index.json)")
        if a.ema:
            raise ModelError("--ema applies to single files only")
        model = load_diffusers_folder(src, a.family)
        trace, extras, source = model.trace, model.extras, model.source
        n_src = len(trace)
        if a.prediction:
            model.cfg.schedule.prediction_type = {"eps": "epsilon", "v": "v_prediction"}[a.prediction]
    else:
        model, split = load_single_file(src, a.family, a.prediction, a.ema)
        extras, trace, ema_used, source = model.extras, model.trace, split.ema_used, model.source
        n_src = model.n_source
    if a.explain:
        for k, dest in trace:
            print(f"{k} -> {dest}")
    dtype = getattr(torch, DTYPES[a.dtype]) if a.dtype else None
    dtype_name = a.dtype or "source dtype"
    print(summary(model, src, ema_used, n_src, dtype_name), file=sys.stderr)
    save_model(model, a.out, dtype=dtype, extras=extras, source=source,
               metadata={"minisd_source": os.path.basename(os.path.normpath(src))})
    print(f"wrote {a.out}", file=sys.stderr)


def export_model(a):
    from minisd.formats.export import export_diffusers, export_single_file
    from minisd.model import ModelError, is_minisd_folder, load_minisd_folder

    if not is_minisd_folder(a.src):
        raise ModelError(f"{a.src}: not a minisd folder (config.json + unet.safetensors)")
    model = load_minisd_folder(a.src)
    fmt, dest = a.to
    if a.dtype:
        import torch
        model.to(getattr(torch, DTYPES[a.dtype]))
    if fmt == "single-file":
        export_single_file(model, a.src, dest)
    else:
        export_diffusers(model, dest, folder=a.src)
    print(f"wrote {dest}", file=sys.stderr)


def main(argv=None) -> int:
    a = parse_args(argv)
    from minisd.model import ModelError
    t0 = time.time()
    try:
        (export_model if a.to else import_model)(a)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: {a.src}: unexpected checkpoint layout ({e.args[0] if e.args else e})", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
