"""Convert official Stable Diffusion / LDM checkpoints to minisd folders, and back.

    python convert.py SRC --out weights/NAME [--dtype fp16|bf16|fp32] [--family auto|sd1|sd2|sdxl|ldm]
                      [--prediction eps|v] [--ema|--no-ema] [--explain]
    python convert.py weights/NAME --to single-file OUT.safetensors
    python convert.py weights/NAME --to diffusers OUT_DIR

Adapters (LoRA tools; MODEL is any model minisd reads, needed for the module names and shapes):

    python convert.py MODEL --lora IN.safetensors --to lora-kohya OUT.safetensors     # change layout:
                      (lora-kohya: A1111 / ComfyUI / kohya; lora-diffusers: diffusers / PEFT; lora-minisd)
    python convert.py MODEL --lora a.safetensors:0.8 --lora b.safetensors:0.4 --to single-file baked.safetensors
                      ("bake": W + sum of w_i dW_i; also --out FOLDER for a minisd folder, --to diffusers DIR)
    python convert.py BASE --extract-from TUNED --rank 32 [--conv-rank 16] --to lora-kohya OUT.safetensors
    python convert.py MODEL --lora IN.safetensors --energy 0.9 --to lora-kohya SMALLER.safetensors   # resize
                      (--rank N or --energy F: the rank keeping a fraction F of the squared singular values;
                       each layer's relative error is printed)

SRC is an official single file (.safetensors, or .ckpt loaded with weights_only=True) or a diffusers
folder. `--explain` prints every source tensor -> minisd parameter (or "ignored: reason"). Output is
written to a temporary folder and renamed into place: a failed run leaves nothing at --out.
An existing destination is refused unless --overwrite is given; even then a folder is replaced only if it is an
earlier output of the same kind (minisd or diffusers folder, nothing else in it), never the source, a folder
holding the source, or the working directory (minisd/formats/safe_write.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LORA_FORMATS = ("lora-kohya", "lora-diffusers", "lora-minisd")


def split_spec(spec: str) -> tuple[str, float]:
    """'FILE:WEIGHT' -> (FILE, WEIGHT); an existing path or no ':' -> (spec, 1.0)."""
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or os.path.exists(spec):
        return spec, 1.0
    try:
        return path, float(tail)
    except ValueError:
        raise ValueError(f"{spec!r}: {tail!r} is not a number") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit code 2, as train.py and sample.py: no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description="Convert official SD checkpoints to minisd folders and back.",
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
    # safe by default (minisd/formats/safe_write.py): an existing destination is refused without this
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing destination: a file, or a folder that is an earlier minisd / diffusers "
                        "output of the same kind holding nothing else; never the source, a folder holding it, or "
                        "the working directory (default: refuse an existing destination)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="adapter file (any layout sample.py reads): with --to lora-*, the file to convert or "
                        "resize; with --out / --to single-file / --to diffusers, baked into the weights with "
                        "WEIGHT (default 1), repeatable")
    p.add_argument("--extract-from", metavar="TUNED", help="extract a LoRA of TUNED - SRC by SVD (--to lora-*)")
    p.add_argument("--rank", type=int, help="extract / resize: rank of every Linear and 1x1-conv layer")
    p.add_argument("--energy", type=float, help="extract / resize: per layer, the smallest rank keeping this "
                                                "fraction (0-1] of the squared singular values")
    p.add_argument("--conv-rank", type=int, help="extract: rank of the 3x3 convs (default: left out)")
    p.add_argument("--conv-energy", type=float, help="extract: energy fraction of the 3x3 convs")
    p.add_argument("--naming", choices=["sgm", "diffusers"], default=None,
                   help="lora-kohya UNet names (default: what kohya writes: diffusers paths for SD1/SD2, "
                        "official SGM paths for SDXL)")
    a = p.parse_args(argv)
    if bool(a.out) == bool(a.to):
        p.error("give exactly one of --out (import) or --to FORMAT DEST (export)")
    if a.to and a.to[0] not in ("single-file", "diffusers") + LORA_FORMATS:
        p.error(f"--to takes {', '.join(('single-file', 'diffusers') + LORA_FORMATS)}")
    lora_out = bool(a.to) and a.to[0] in LORA_FORMATS
    sizing = a.rank is not None or a.energy is not None
    if a.rank is not None and a.energy is not None:
        p.error("give --rank or --energy, not both")
    if a.energy is not None and not 0 < a.energy <= 1 or a.conv_energy is not None and not 0 < a.conv_energy <= 1:
        p.error("--energy / --conv-energy must be in (0, 1]")
    if any(v is not None and v < 1 for v in (a.rank, a.conv_rank)):
        p.error("--rank / --conv-rank must be at least 1")
    if lora_out and not (a.extract_from or len(a.lora) == 1):
        p.error(f"--to {a.to[0]} needs one --lora FILE (convert / resize) or --extract-from TUNED")
    if lora_out and a.extract_from and a.lora:
        p.error("--extract-from and --lora do not go together")
    if a.extract_from and not (sizing or a.conv_rank or a.conv_energy):
        p.error("--extract-from needs --rank or --energy")
    if (a.extract_from or sizing or a.conv_rank or a.conv_energy) and not lora_out:
        p.error("--extract-from / --rank / --energy write an adapter file: use --to lora-kohya|lora-diffusers|lora-minisd")
    if (a.conv_rank or a.conv_energy) and not a.extract_from:
        p.error("--conv-rank / --conv-energy apply to --extract-from (a resize keeps every layer the file has)")
    if a.naming and not (lora_out and a.to[0] == "lora-kohya"):
        p.error("--naming applies to --to lora-kohya")
    try:
        a.lora = [split_spec(s) for s in a.lora]
    except ValueError as e:
        p.error(f"--lora: {e}")
    if lora_out and a.lora and a.lora[0][1] != 1.0:
        p.error("--lora FILE:WEIGHT: a weight applies when baking; a converted file keeps its own strength")
    return a


def summary(model, src, ema_used, n_src, dtype_name) -> str:
    from minisd.model import text_encoder_name
    cfg = model.cfg
    lines = [f"{src}: {cfg.family} ({cfg.schedule.prediction_type}, {cfg.resolution}px, "
             f"EMA {'used' if ema_used else 'not used'})"]
    comps = [("unet", model.unet), ("vae", model.vae)] + [
        (text_encoder_name(i), te) for i, te in enumerate(model.text_encoders)]
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
    from minisd.formats.safe_write import MINISD, atomic_folder
    from minisd.formats.single_file import load_single_file
    from minisd.model import ModelError, is_minisd_folder, write_model_files

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
        from minisd.formats.images import check_regular
        try:
            check_regular(src)  # a FIFO or a device would block the read
        except ValueError as e:
            raise ModelError(f"{src}: {e}") from None
        model, split = load_single_file(src, a.family, a.prediction, a.ema)
        extras, trace, ema_used, source = model.extras, model.trace, split.ema_used, model.source
        n_src = model.n_source
    if a.explain:
        for k, dest in trace:
            print(f"{k} -> {dest}")
    dtype = getattr(torch, DTYPES[a.dtype]) if a.dtype else None
    dtype_name = a.dtype or "source dtype"
    print(summary(model, src, ema_used, n_src, dtype_name), file=sys.stderr)
    with atomic_folder(a.out, a.overwrite, MINISD, protect=inputs(a)) as tmp:
        write_model_files(model, tmp, dtype=dtype, extras=extras, source=source,
                          metadata={"minisd_source": os.path.basename(os.path.normpath(src))})
    print(f"wrote {a.out}", file=sys.stderr)


def export_model(a):
    from minisd.formats.export import export_diffusers, export_single_file
    from minisd.model import UNET_FILE, ModelError, is_minisd_folder, load_minisd_folder

    if not is_minisd_folder(a.src):
        raise ModelError(f"{a.src}: not a minisd folder (config.json + {UNET_FILE})")
    model = load_minisd_folder(a.src)
    fmt, dest = a.to
    if a.dtype:
        import torch
        model.to(getattr(torch, DTYPES[a.dtype]))
    if fmt == "single-file":
        export_single_file(model, a.src, dest, overwrite=a.overwrite, protect=inputs(a))
    else:
        export_diffusers(model, dest, folder=a.src, overwrite=a.overwrite, protect=inputs(a))
    print(f"wrote {dest}", file=sys.stderr)


def write_adapter(model, fmt: str, dest: str, naming: str | None, metadata: dict, a=None) -> None:
    """Write `model`'s adapters in layout `fmt`; warn where the layout loses something."""
    from minisd import adapters
    from minisd.formats.lora_files import dora_warning, save_diffusers, save_kohya
    from minisd.formats.safe_write import atomic_path, check_file_dest
    warning = dora_warning(model, fmt)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if a is not None:
        check_file_dest(dest, a.overwrite, protect=inputs(a))
    with atomic_path(dest) as tmp:
        if fmt == "lora-kohya":
            save_kohya(model, tmp, metadata=metadata, naming=naming)
        elif fmt == "lora-diffusers":
            save_diffusers(model, tmp, metadata=metadata)
        else:
            adapters.save_adapter(model, tmp, metadata=metadata)


def adapter_tool(a):
    """--to lora-*: convert, resize (--rank/--energy) or extract (--extract-from) an adapter file."""
    from minisd.adapters.mix import apply_adapters
    from minisd.adapters.svd import extract, format_report, resize
    from minisd.formats import load_model
    from minisd.formats.lora_read import AdapterError, read_adapter_file
    from minisd.model import ModelError
    model = load_model(a.src, sampling=False)  # the scheduler is not used here
    fmt, dest = a.to
    if a.extract_from:
        tuned = load_model(a.extract_from, sampling=False)
        if tuned.cfg.family != model.cfg.family:
            raise ModelError(f"{a.extract_from} is {tuned.cfg.family}, {a.src} is {model.cfg.family}")
        try:
            sd, report = extract(model, tuned, a.rank, a.energy, a.conv_rank, a.conv_energy)
        except ValueError as e:
            raise ModelError(str(e)) from None
        if not sd:
            raise ModelError(f"{a.extract_from} and {a.src} have the same weights: nothing to extract")
        modules, ranks, what = _group(sd), {}, f"extracted from {a.extract_from} - {a.src}"
    else:
        f = read_adapter_file(model, a.lora[0][0])
        modules, ranks, what = f.modules, f.ranks, f"{a.lora[0][0]} ({'/'.join(sorted(f.layouts))} layout)"
        if a.rank is not None or a.energy is not None:
            try:
                sd, report = resize(model, modules, ranks, a.rank, a.energy)
            except ValueError as e:
                raise AdapterError(str(e)) from None
            modules, ranks, what = _group(sd), {}, what + " resized"
        else:
            report = None
    try:
        apply_adapters(model, [(modules, ranks, 1.0, what)])
        write_adapter(model, fmt, dest, a.naming, {"minisd.source": what}, a)
    except ValueError as e:  # e.g. LoHa / LoKr into the diffusers layout
        raise AdapterError(str(e)) from None
    if report is not None:
        print(format_report(report), file=sys.stderr)
    print(f"wrote {dest} ({fmt}): {what}", file=sys.stderr)


def _group(sd: dict) -> dict:
    from minisd.adapters import group_by_module
    return group_by_module(sd)


def bake(a):
    """--lora with --out / --to single-file / --to diffusers: W + sum of w_i dW_i, written as a model."""
    from minisd.adapters.mix import apply_adapters
    from minisd.formats import load_model
    from minisd.formats.export import export_diffusers, export_single_file
    from minisd.formats.lora_read import AdapterError, read_adapter_file
    from minisd.formats.safe_write import MINISD, atomic_folder
    from minisd.model import is_minisd_folder, write_model_files
    model = load_model(a.src, sampling=False)  # the scheduler is carried over as it is
    items = []
    for path, weight in a.lora:
        f = read_adapter_file(model, path)
        items.append((f.modules, f.ranks, weight, path))
        print(f"bake {path} x {weight:g}: {len(f.modules)} layers", file=sys.stderr)
    try:
        apply_adapters(model, items, merge=True)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if a.dtype:
        import torch
        model.to(getattr(torch, DTYPES[a.dtype]))
    folder = a.src if os.path.isdir(a.src) and is_minisd_folder(a.src) else None
    if a.out:
        with atomic_folder(a.out, a.overwrite, MINISD, protect=inputs(a)) as tmp:
            write_model_files(model, tmp, metadata={"minisd_baked": ",".join(f"{p}:{w:g}" for p, w in a.lora)})
        dest = a.out
    elif a.to[0] == "single-file":
        export_single_file(model, folder, a.to[1], overwrite=a.overwrite, protect=inputs(a))
        dest = a.to[1]
    else:
        export_diffusers(model, a.to[1], folder=folder, overwrite=a.overwrite, protect=inputs(a))
        dest = a.to[1]
    print(f"wrote {dest}: {a.src} with {len(a.lora)} adapter(s) baked in", file=sys.stderr)


def inputs(a) -> list[str]:
    """What this command reads: never overwritten, never inside a replaced folder."""
    return [a.src, a.extract_from, *(path for path, _ in a.lora)]


def check_destination(a) -> None:
    """Before any work (safe_write.py): the destination is free, or --overwrite may replace it."""
    from minisd.formats.safe_write import DIFFUSERS, MINISD, check_file_dest, check_folder_dest
    if a.out:
        check_folder_dest(a.out, a.overwrite, MINISD, protect=inputs(a))
    elif a.to[0] == "diffusers":
        check_folder_dest(a.to[1], a.overwrite, DIFFUSERS, protect=inputs(a))
    else:
        check_file_dest(a.to[1], a.overwrite, protect=inputs(a))


def main(argv=None) -> int:
    a = parse_args(argv)
    from minisd.formats.safe_write import WriteError
    from minisd.model import ModelError
    t0 = time.time()
    lora_out = a.to and a.to[0] in LORA_FORMATS
    try:
        check_destination(a)
        (adapter_tool if lora_out else bake if a.lora else export_model if a.to else import_model)(a)
    except (ModelError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: {a.src}: unexpected checkpoint layout ({e.args[0] if e.args else e})", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
