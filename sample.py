"""Make images with minisd: text -> image, or image -> image with --init.

    python sample.py                                   # the embedded default model, a captioned grid
    python sample.py "a small red star at the center on a blue background" --batch 4
    python sample.py "a red circle" --model weights/sd15 --steps 30 --sampler dpmpp_2m --karras
    python sample.py "a cat" --model weights/sd15 --lora style.safetensors:0.8 --lora detail.safetensors:-0.3

The initial noise comes from a CPU generator seeded with --seed (fp32, B x 4 x H/8 x W/8), exactly
as diffusers draws it, so the same weights, seed, sampler and steps give diffusers' image. The prompt
and settings are written into the PNG as an A1111-style `parameters` text chunk.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler a",
                 "dpmpp_2m": "DPM++ 2M"}
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "minisd-tiny")
# minisd-tiny draws a prompt right when it names all five attributes of its world (size, colour, shape, position,
# background; tools/check_prompts.py: 24 of 24 images each, 6 seeds x 4, DDIM 30, cfg 7.5), and reads prompts that
# leave some out (each named attribute 98-100 %, a colour on the wrong object in about 1 %: the model card).
DEFAULT_PROMPT = "a small red star at the center on a blue background"
EXAMPLES = """examples:
  python sample.py                      # minisd-tiny: a captioned grid of 8 held-out world prompts
  python sample.py "a small red star at the center on a blue background" --batch 4
  python sample.py "a large yellow star at the top left on a purple background"
  python sample.py "a small white heart at the bottom right on a green background" --seed 3
minisd-tiny reads captions of its world: size, colour, shape, position, background (docs/WORLD.md), whole or
with words left out ("a red circle on a blue background"; a colour lands on the wrong object in about 1 %:
weights/minisd-tiny/README.md)."""
# The grid of `python sample.py`: 8 held-out world prompts, DDIM 12 steps, guidance 3 (minisd-tiny scores 100 %
# shape and colour by the probe there; at 7.5 a little less). --steps / --cfg override these when given.
GRID_PROMPTS, GRID_STEPS, GRID_CFG = 8, 12, 3.0
# Defaults with a prompt. The flags default to None, so an explicit `--steps 30` is told apart from no flag.
STEPS, CFG, DTYPE, STRENGTH, ETA = 30, 7.5, "fp32", 0.8, 0.0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones: those flags say in their help what they default to."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


class _HelpFormatter(_Help, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help (not None ones), and the epilog's lines as written."""


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="Generate images with minisd (text-to-image or img2img).", formatter_class=_HelpFormatter)
    p.add_argument("prompt", nargs="?", default=None,
                   help="what to draw (none, with minisd-tiny: a captioned grid of held-out world prompts; "
                        f"none, with another model: {DEFAULT_PROMPT!r})")
    p.add_argument("--model", default=None,
                   help="minisd folder, diffusers folder, or 'tiny-random' "
                        "(default: weights/minisd-tiny if present, else tiny-random)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: {STEPS}; the no-prompt grid: {GRID_STEPS})")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLER_NAMES))
    p.add_argument("--karras", action="store_true", help="Karras sigma spacing (euler, dpmpp_2m)")
    p.add_argument("--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale >= 0, at most 1 = off (default: {CFG}; the no-prompt "
                        f"grid: {GRID_CFG})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of the model's latent factor (8 for "
                                                          "SD); a size whose decode cannot fit in free memory is "
                                                          "refused (default: the model's resolution, or the --init "
                                                          "image's size; not for the no-prompt grid, which draws "
                                                          "at the model's resolution)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's resolution; as --width)")
    p.add_argument("--negative", default="", help="negative prompt (the grid: the same for every image)")
    p.add_argument("--batch", type=int, default=None,
                   help="images for the prompt, drawn as one batch from --seed: each PNG records its `Batch pos`, "
                        "which with the seed and batch size reproduces it (default: 1; not for the grid, one image "
                        "per prompt)")
    p.add_argument("--init", default=None, help="init image for img2img (PNG, JPEG, WebP, ...; 16-bit grey read as "
                                                 "such; regular files only, at most 2^28 pixels; read by "
                                                 "minisd/formats/images.py, as train.py's data)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"img2img: how much of the init image to redraw (default: {STRENGTH}; needs --init)")
    p.add_argument("--eta", type=float, default=None,
                   help=f"DDIM eta in [0, 1], 0 = deterministic (default: {ETA}; --sampler ddim only)")
    p.add_argument("--out", default="sample.png", help="output PNG (with --batch N: OUT-0.png ... OUT-(N-1).png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output PNGs (default: an existing file at an output name is refused "
                        "before any work; an input file is never overwritten)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu",
                   help="cpu, cuda, cuda:N or mps; one this machine does not have is refused")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores other processes left free while this command "
                        "started, read from the kernel's counters over its first second or so, at least 1; "
                        "minisd/perf/threads.py). Not torch's one per core whatever the load: a busy core stalls "
                        "every op of the others at its join (2-core VM under load: 20 training steps took 24 s "
                        "with 1 thread, 562 s with 2). The count used is written into the PNG (Threads: N): it "
                        "can change the last bit of a pixel")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help=f"UNet / text-encoder precision (default: {DTYPE}; the VAE stays fp32 where it overflows)")
    p.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="precision of the VAE (the decode, and the encode of --init). auto: fp32 where the VAE overflows in fp16 (SDXL's; its "
                        "config's force_upcast), else --dtype. bf16 never overflows (fp32's exponent range) and "
                        "runs on the tensor cores: SDXL 1024 px decodes in a fraction of fp32's time and memory "
                        "(minisd-tiny's pixels: at most 6/255 from fp32's, 0.2/255 on average); written into the PNG "
                        "when not auto")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the UNet call from a CUDA graph (minisd/perf/graphs.py; recorded at the second "
                        "step): the same image, "
                        "faster where kernel launches dominate, i.e. small batches and images with many steps "
                        "(SD1.5 512 px batch 1 on an H100: 2.4x UNet it/s); costs one UNet forward's activations "
                        "of GPU memory; needs a CUDA --device")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each UNet block (minisd/perf/compile.py; fuses the elementwise work, "
                        "changing only rounding order; with --cuda-graph the fastest "
                        "path on a GPU: SDXL 1024 px on an H100 23 -> 28 UNet it/s). The first image compiles "
                        "(about a minute for SDXL); worth it for many images")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply an adapter file at strength SCALE (default 1; negative allowed), repeatable to mix "
                        "several: LoRA / DoRA / LoHa / LoKr / LoCon in minisd, kohya / A1111 (SD1, SD2, SDXL, both "
                        "UNet namings, text-encoder parts included) or diffusers / PEFT layout. Applied beside the "
                        "base weights, which stay as stored; a key naming no module of the model is an error. "
                        "DoRA at SCALE s is PEFT's / diffusers' (s scales the update inside the norm; ComfyUI "
                        "and A1111 blend instead, README)")
    p.add_argument("--lora-merge", action="store_true",
                   help="fold the --lora adapters into the weights once (W + sum of scale x dW, in fp32): the base "
                        "model's speed, same image up to rounding")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding, repeatable: A1111 .safetensors / .pt (read with "
                        "weights_only=True), SDXL files with clip_l + clip_g, diffusers learned_embeds.safetensors. "
                        "TOKEN (default: the file name without extension) in a prompt stands for its vectors")
    p.add_argument("--hypernetwork", default=None, metavar="FILE[:STRENGTH]",
                   help="apply a hypernetwork (A1111 / NovelAI; issue 17) at STRENGTH (default 1): minisd's "
                        ".safetensors from train.py --method hypernetwork, or A1111's .pt (read with "
                        "weights_only=True). Its MLPs rewrite the inputs of the attention keys and values of every "
                        "width they have (minisd/adapters/hypernetwork.py)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt per line (blank lines and lines starting with # skipped); line i is drawn with "
                        "seed --seed + i into OUT-i.png, and each PNG records the prompt and seed that reproduce it")
    p.epilog = EXAMPLES + "\n" + textwrap.fill(
        "Prompts longer than CLIP's 77-token window are read as A1111 does: split into chunks of 75 tokens, each "
        "encoded on its own (with start and end tokens) and the results concatenated, so every token counts; a "
        "prompt up to 75 tokens is encoded exactly as diffusers does. LDM-256's BERT encoder has one window: a "
        "longer prompt is cut there, with a warning naming the dropped words.", 100) + "\n" + textwrap.fill(
        "Progress: a bar over the steps on stderr when it is a terminal. A large request (more pixels than 4 images "
        "at the model's resolution, or a UNet over 50M parameters on a CPU) first prints its estimated FLOPs, time "
        "and memory, then shows the bars anyway.", 100)
    a = p.parse_args(argv)
    if a.prompts and a.prompt is not None:
        p.error("give a prompt or --prompts FILE, not both")
    a.embedding = [split_spec(s) for s in a.embedding]
    if a.hypernetwork:
        try:
            a.hypernetwork = split_spec(a.hypernetwork, float)
        except ValueError as e:
            p.error(f"--hypernetwork: {e}")
    if a.lora_merge and not a.lora:
        p.error("--lora-merge needs at least one --lora")
    try:
        a.lora = [split_spec(s, float) for s in a.lora]
    except ValueError as e:
        p.error(f"--lora: {e}")
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be at least 1")
    if a.batch is not None and a.batch < 1:
        p.error("--batch must be at least 1")
    # no flag is a silent no-op
    if a.strength is not None and not a.init:
        p.error("--strength applies to img2img: give --init IMAGE too")
    if a.eta is not None and a.sampler != "ddim":
        p.error(f"--eta is DDIM's eta; --sampler {a.sampler} has none")
    a.strength, a.eta = STRENGTH if a.strength is None else a.strength, ETA if a.eta is None else a.eta
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be at least 1, got {a.threads}")
    if not 0.0 < a.strength <= 1.0:
        p.error("--strength must be in (0, 1]")
    if a.karras and a.sampler not in ("euler", "dpmpp_2m"):
        p.error("--karras applies to --sampler euler or dpmpp_2m (as in diffusers)")
    # values: finite and in range where they enter (minisd/formats/checks.py), not a black picture later
    from minisd.formats.checks import check_device, number
    try:
        if a.cfg is not None:
            number("--cfg", a.cfg, lo=0)
        number("--eta", a.eta, lo=0, hi=1)
        number("--strength", a.strength, lo=0, hi=1, lo_open=True)
        for flag, v in (("--width", a.width), ("--height", a.height)):
            if v is not None and v <= 0:
                raise ValueError(f"{flag} must be positive, got {v}")
        if not -2**63 <= a.seed < 2**64:
            raise ValueError(f"--seed must fit in 64 bits, got {a.seed}")
        a.device = check_device(a.device)
    except ValueError as e:
        p.error(str(e))
    return a


def make_pipeline(model, a, **kw):
    """The Pipeline, with --compile and --cuda-graph applied from minisd/perf (lazily: compiled at the first call of
    each block, recorded at the second step)."""
    from minisd.perf.compile import compile_unet_blocks
    from minisd.perf.graphs import use_cuda_graph
    from minisd.pipeline import Pipeline

    import torch
    vae = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.vae_dtype]
    pipe = Pipeline(model, device=a.device, vae_dtype=vae, **kw)
    if a.threads is None:  # the default: the cores left free by others while we started (perf/threads.py)
        a.threads = a.load_window.threads() if hasattr(a, "load_window") else 1
        torch.set_num_threads(a.threads)
    if a.compile:
        compile_unet_blocks(pipe.model.unet)
    if a.cuda_graph:
        use_cuda_graph(pipe)
    return pipe


def split_spec(spec: str, convert=str, default=None) -> tuple:
    """'FILE:VALUE' -> (FILE, convert(VALUE)); a spec that is an existing path, or has no ':', is (spec, default).
    (The last ':' splits, so Windows drive letters and paths with ':' stay whole.)"""
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or os.path.exists(spec):
        return spec, (1.0 if convert is float else default)
    try:
        return path, convert(tail)
    except ValueError:
        raise ValueError(f"{spec!r}: {tail!r} is not a number") from None


def apply_adapter_flags(a, model) -> str:
    """--embedding, then --lora: read every file (each key placed or an AdapterError), then apply the LoRAs
    together. Returns the PNG settings text that names them."""
    text = ""
    if a.embedding:
        from minisd.adapters.embeddings import load_embedding
        names = []
        for path, token in a.embedding:
            token, n = load_embedding(model, path, token)
            print(f"embedding {path}: token {token!r}, {n} vector(s) per text encoder", file=sys.stderr)
            names.append(token)
        text = f", TI: {' '.join(names)}"
    if a.hypernetwork:  # issue 17
        from minisd.adapters.hypernetwork import load_hypernetwork
        path, strength = a.hypernetwork
        hn, hooked = load_hypernetwork(model, path, strength)
        print(f"hypernetwork {path}: widths {', '.join(hn.layers)} on {len(hooked)} attention layers, strength "
              f"{strength}", file=sys.stderr)
        # A1111's infotext names the hypernetwork by its file's stem
        text += f", Hypernet: {os.path.splitext(os.path.basename(path))[0]}, Hypernet strength: {strength}"
    if not a.lora:
        return text
    from minisd.adapters.mix import apply_adapters
    from minisd.formats.lora_read import read_adapter_file
    items, parts = [], []
    for path, scale in a.lora:
        f = read_adapter_file(model, path)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(f.kinds().items()))
        te = sum(1 for p in f.modules if p.startswith("text_encoders."))
        print(f"lora {path}: {'/'.join(sorted(f.layouts))} layout, {kinds} modules "
              f"({len(f.modules) - te} UNet, {te} text encoder), strength {scale:g}", file=sys.stderr)
        items.append((f.modules, f.ranks, scale, path))
        parts.append(f"{os.path.splitext(os.path.basename(path))[0]}:{scale:g}")
    try:
        apply_adapters(model, items, merge=a.lora_merge)
    except ValueError as e:
        from minisd.formats.lora_read import AdapterError
        raise AdapterError(str(e)) from None
    return text + f", Lora: {' '.join(parts)}" + (" (merged)" if a.lora_merge else "")


def read_prompts(path: str) -> list[str]:
    """--prompts: the non-blank lines that do not start with #."""
    from minisd.formats.images import read_text_file
    try:  # a regular UTF-8 file (a FIFO would block the read)
        lines = [line.strip() for line in read_text_file(path).splitlines()]
    except ValueError as e:
        raise ValueError(f"{path}: cannot read the prompts file ({e})") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompt in the file")
    return prompts


def warn_cut(model, prompts: list[str]) -> None:
    """A text encoder with one window (BERT) cuts long prompts: say which words are lost."""
    from minisd.tokenizer import encode_whole
    for tok in model.tokenizers:
        if hasattr(tok, "chunk_ids"):
            continue
        for p in prompts:
            enc = encode_whole(tok.tokenizer, p)
            keep = tok.max_length - 2
            if len(enc.ids) > keep:
                cut = p[enc.offsets[keep][0]:]
                print(f"warning: prompt longer than {keep} tokens, cut before: {cut!r}", file=sys.stderr)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def parameters_text(a, width: int, height: int, seed: int, model_name: str, extra: str = "", pos: int = 0) -> str:
    """The A1111 `parameters` chunk: prompt, negative prompt, then one line of settings (`extra`: the adapters).
    Every image of a batch is drawn from one generator seeded `seed` (the initial noise is one (batch, C, h, w)
    draw, as in diffusers), so an image is reproduced by the seed, the batch size and its position: A1111's
    `Batch size` / `Batch pos` fields."""
    sampler = SAMPLER_NAMES[a.sampler] + (" Karras" if a.karras else "")
    lines = [a.prompt]
    if a.negative:
        lines.append(f"Negative prompt: {a.negative}")
    settings = f"Steps: {a.steps}, Sampler: {sampler}, CFG scale: {a.cfg}, Seed: {seed}, " \
               f"Size: {width}x{height}, Model: {model_name}"
    if a.batch > 1:
        settings += f", Batch size: {a.batch}, Batch pos: {pos}"
    if a.device == "cpu":  # the CPU thread count can change the last bit
        settings += f", Threads: {a.threads}"
    if a.init:
        settings += f", Denoising strength: {a.strength}"
    if getattr(a, "vae_dtype", "auto") != "auto":
        settings += f", VAE dtype: {a.vae_dtype}"
    lines.append(settings + extra)
    return "\n".join(lines)


def main(argv=None) -> int:
    from minisd.perf.threads import LoadWindow
    window = LoadWindow()  # how busy the machine is while torch imports and the model loads (--threads default)
    a = parse_args(argv)
    import torch
    previous = torch.get_num_threads()
    try:
        return run(a, window)
    finally:  # main() called in-process (a script, a test) leaves the caller's thread count as it was
        torch.set_num_threads(previous)


def run(a, window) -> int:
    """The command, from its parsed flags; `window` measures the load for the --threads default."""
    import torch
    torch.set_num_threads(a.threads or 1)
    a.load_window = window
    from PIL import PngImagePlugin

    from minisd.formats import TINY_RANDOM, load_model
    from minisd.model import ModelError

    if a.cuda_graph and not a.device.startswith("cuda"):
        print(f"error: --cuda-graph needs a CUDA device, not --device {a.device}", file=sys.stderr)
        return 2
    model_path = a.model or (DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else TINY_RANDOM)
    stem, ext = os.path.splitext(a.out)
    if a.prompts:  # (prompt, seed, output stem) per line
        try:
            jobs = [(p, a.seed + i, f"{stem}-{i}") for i, p in enumerate(read_prompts(a.prompts))]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        if a.prompt is None:
            if os.path.basename(os.path.normpath(model_path)) == "minisd-tiny" and not a.init:
                return grid(a, model_path)
            a.prompt = DEFAULT_PROMPT
        jobs = [(a.prompt, a.seed, stem)]
    a.steps, a.cfg = a.steps or STEPS, CFG if a.cfg is None else a.cfg
    a.batch, a.dtype = a.batch or 1, a.dtype or DTYPE
    outputs = [out_stem + (ext or ".png") if a.batch == 1 else f"{out_stem}-{i}{ext or '.png'}"
               for _, _, out_stem in jobs for i in range(a.batch)]
    if check_outputs(a, outputs, model_path):
        return 2
    init = None
    if a.init:  # the reader train.py's data uses: 16-bit grey, regular files only, no decompression bombs
        from minisd.formats.images import read_image
        try:
            init = read_image(a.init)
        except ValueError as e:
            print(f"error: --init {a.init}: {e}", file=sys.stderr)
            return 2
    try:
        t0 = time.time()
        model = load_model(model_path)
        extra = apply_adapter_flags(a, model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_cut(model, [j[0] for j in jobs] + [a.negative])
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    pipe = make_pipeline(model, a, dtype=dtype)
    f = model.vae_scale
    if init and (a.width is None and init.width < f or a.height is None and init.height < f):
        print(f"error: --init {a.init} is {init.width}x{init.height} px, smaller than this model's {f}-px latent "
              "cell: give --width and --height (the image is resized to them)", file=sys.stderr)
        return 2
    width = a.width or (init.width // f * f if init else model.cfg.resolution)
    height = a.height or (init.height // f * f if init else model.cfg.resolution)
    from minisd.formats.checks import check_size
    try:  # a multiple of the latent factor, and a decode that fits in memory: said now, not after the sampling
        check_size(width, height, f, model.cfg.vae, a.batch, a.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {model_path} ({model.cfg.family}) loaded in {time.time() - t0:.1f}s; "
          f"{a.batch * len(jobs)} image(s) {width}x{height}, {a.sampler}{' karras' if a.karras else ''}, "
          f"{a.steps} steps, cfg {a.cfg}, seed {a.seed}{', CUDA graph' if a.cuda_graph else ''}"
          f"{', compiled' if a.compile else ''}", file=sys.stderr)
    show = progress_plan(a, model, pipe, width, height, len(jobs))
    for n, (prompt, seed, out_stem) in enumerate(jobs):
        bar = (f"prompt {n + 1}/{len(jobs)}" if len(jobs) > 1 else True) if show else False  # over steps, per image
        try:
            images = pipe(prompt, negative=a.negative or None, steps=a.steps, sampler=a.sampler,
                          karras=a.karras, cfg_scale=a.cfg, seed=seed, width=width, height=height,
                          batch=a.batch, init_image=init, strength=a.strength, eta=a.eta, progress=bar)
        except ValueError as e:  # e.g. img2img strength so low that no step is left
            print(f"error: {e}", file=sys.stderr)
            return 2
        a.prompt = prompt  # what parameters_text records: this line's prompt and seed reproduce this PNG
        outs = [out_stem + (ext or ".png")] if len(images) == 1 else \
            [f"{out_stem}-{i}{ext or '.png'}" for i in range(len(images))]
        for pos, (img, path) in enumerate(zip(images, outs)):
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", parameters_text(a, width, height, seed, os.path.basename(
                os.path.normpath(model_path)), extra, pos))
            if save_png(img, path, info):
                return 2
            print(path)
    return 0


def check_outputs(a, paths: list[str], model_path: str) -> bool:
    """Before any work: every output name is free (or --overwrite) and no input (safe_write.py). True: refused."""
    from minisd.formats.safe_write import WriteError, check_file_dest
    inputs = [model_path, a.init, a.prompts] + [p for p, _ in a.lora] + [p for p, _ in a.embedding]
    try:
        for path in paths:
            check_file_dest(path, a.overwrite, protect=inputs)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False


def save_png(img, path: str, info) -> bool:
    """Write a PNG through a fresh private temporary file renamed into place (safe_write.py): never through a
    planted link, never half-written. True: failed (one error line printed)."""
    from minisd.formats.safe_write import WriteError, atomic_path
    try:
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", pnginfo=info)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False


def progress_plan(a, model, pipe, width: int, height: int, batches: int) -> bool:
    """Whether to show progress (a tqdm bar over the steps of each prompt, on stderr): when stderr is a terminal, or
    when the request is large: more pixels than 4 images at the model's resolution, or a UNet of over 50M
    parameters on a CPU. A large request first prints its estimated cost (minisd/perf/estimate.py: FLOPs, a lower
    bound on the time, memory) and says when its VAE decode begins, which takes long too."""
    res = model.cfg.resolution
    big = width * height * a.batch > 4 * res * res or (
        a.device == "cpu" and sum(p.numel() for p in model.unet.parameters()) > 50e6)
    if not big:
        return sys.stderr.isatty()
    from minisd.perf.estimate import estimate
    e = estimate(model, width, height, a.batch, a.steps, a.cfg > 1.0, a.device, pipe.dtype, batches)
    print(e.line() + (" (img2img runs fewer steps)" if a.init else ""), file=sys.stderr, flush=True)
    decode = pipe.decode

    def decode_said(latents):
        print(f"VAE decode of {len(latents)} image(s) {width}x{height}...", file=sys.stderr, flush=True)
        return decode(latents)
    pipe.decode = decode_said
    return True


def grid(a, model_path: str) -> int:
    """No prompt, minisd-tiny: draw held-out world prompts (compositions it never saw) as a captioned grid.
    --steps, --cfg, --sampler, --seed, --negative and --dtype given explicitly are honoured; --batch, --width and
    --height are refused (one image per prompt, at the model's resolution, which the grid's cells assume)."""
    import torch
    from PIL import PngImagePlugin

    from minisd.formats import load_model
    from minisd.model import ModelError
    from minisd.world.fidelity import caption_grid, grid_prompts

    refused = [f for f, v in (("--batch", a.batch), ("--width", a.width), ("--height", a.height)) if v is not None]
    if refused:
        verb = "needs" if len(refused) == 1 else "need"
        print(f"error: {'/'.join(refused)} {verb} a prompt: the no-prompt grid draws one image per held-out prompt "
              "at the model's resolution", file=sys.stderr)
        return 2
    if check_outputs(a, [a.out], model_path):
        return 2
    t0 = time.time()
    try:
        model = load_model(model_path)
        extra = apply_adapter_flags(a, model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = GRID_STEPS if a.steps is None else a.steps    # None: the flag was not given
    cfg = GRID_CFG if a.cfg is None else a.cfg
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype or DTYPE]
    prompts = grid_prompts(GRID_PROMPTS)
    pipe = make_pipeline(model, a, dtype=dtype)
    try:
        images = pipe(prompts, negative=a.negative or None, steps=steps, sampler=a.sampler, karras=a.karras,
                      cfg_scale=cfg, seed=a.seed, eta=a.eta,
                      progress=sys.stderr.isatty())
    except ValueError as e:  # e.g. more steps than the schedule's grid holds, or a non-finite result
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampler = SAMPLER_NAMES[a.sampler] + (" Karras" if a.karras else "")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "\n".join(prompts + ([f"Negative prompt: {a.negative}"] if a.negative else []))
                  + f"\nSteps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {a.seed}, "
                  f"Model: {os.path.basename(os.path.normpath(model_path))}"
                  + (f", Threads: {a.threads}" if a.device == "cpu" else "")
                  + (f", VAE dtype: {a.vae_dtype}" if a.vae_dtype != "auto" else "") + extra)
    if save_png(caption_grid(images, prompts), a.out, info):
        return 2
    print(f"{len(prompts)} held-out world prompts, {steps} steps, cfg {cfg}, seed {a.seed}: "
          f"{time.time() - t0:.1f}s", file=sys.stderr)
    print(a.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (a PNG only ever appears whole, by a rename)
        print("error: stopped by SIGINT", file=sys.stderr)
        sys.exit(130)
