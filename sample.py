"""Make images with minisd: text -> image, or image -> image with --init.

    python sample.py                                   # the embedded default model, a captioned grid
    python sample.py "a small red star at the center on a blue background" --batch 4
    python sample.py "a red circle" --model weights/sd15 --steps 30 --sampler dpmpp_2m --karras

The initial noise comes from a CPU generator seeded with --seed (fp32, B x 4 x H/8 x W/8), exactly
as diffusers draws it, so the same weights, seed, sampler and steps give diffusers' image. The prompt
and settings are written into the PNG as an A1111-style `parameters` text chunk.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler a",
                 "dpmpp_2m": "DPM++ 2M"}
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "minisd-tiny")
# minisd-tiny draws a prompt right when it names all five attributes of its world (size, colour, shape, position,
# background; tools/check_prompts.py: 24 of 24 images each, 6 seeds x 4, DDIM 30, cfg 7.5). Leave some out and it
# can swap the shape's and the background's colours ("a red circle on a blue background": a blue circle on red in
# 8 of 8), so the examples are whole world captions.
DEFAULT_PROMPT = "a small red star at the center on a blue background"
EXAMPLES = """examples:
  python sample.py                      # minisd-tiny: a captioned grid of 8 held-out world prompts
  python sample.py "a small red star at the center on a blue background" --batch 4
  python sample.py "a large yellow star at the top left on a purple background"
  python sample.py "a small white heart at the bottom right on a green background" --seed 3
minisd-tiny reads whole captions of its world: size, colour, shape, position, background (docs/WORLD.md).
With words left out ("a red circle on a blue background") it may swap the shape's and the background's
colours (weights/minisd-tiny/README.md, "Limits")."""
# The grid of `python sample.py`: 8 held-out world prompts, DDIM 12 steps, guidance 3 (minisd-tiny scores 100 %
# shape and colour by the probe there; at 7.5 a little less). --steps / --cfg override these when given.
GRID_PROMPTS, GRID_STEPS, GRID_CFG = 8, 12, 3.0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the examples' lines as written."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate images with minisd (text-to-image or img2img).",
                                epilog=EXAMPLES, formatter_class=_HelpFormatter)
    p.add_argument("prompt", nargs="?", default=None,
                   help="what to draw (none, with minisd-tiny: a captioned grid of held-out world prompts; "
                        f"none, with another model: {DEFAULT_PROMPT!r})")
    p.add_argument("--model", default=None,
                   help="minisd folder, diffusers folder, or 'tiny-random' "
                        "(default: weights/minisd-tiny if present, else tiny-random)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLER_NAMES))
    p.add_argument("--karras", action="store_true", help="Karras sigma spacing (euler, dpmpp_2m)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's resolution)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--batch", type=int, default=1, help="images for the prompt")
    p.add_argument("--init", default=None, help="init image for img2img")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the init image to redraw")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--out", default="sample.png", help="output PNG (with --batch N: OUT-0.png ... OUT-(N-1).png)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads. Default 1, not torch's one per core: minisd-tiny's ops are too small "
                        "to gain much from more, a busy core stalls every op of the others at its join (2-core VM "
                        "under load: 20 training steps took 24 s with 1 thread, 562 s with 2), and the image does "
                        "not depend on the machine's load (the thread count can change the last bit). On an idle "
                        "machine with a larger model, set it to the number of free cores")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="UNet / text-encoder precision (the VAE stays fp32 where it overflows)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the UNet call from a CUDA graph (recorded at the second step): the same image, "
                        "faster where kernel launches dominate, i.e. small batches and images with many steps "
                        "(SD1.5 512 px batch 1 on an H100: 2.4x UNet it/s); costs one UNet forward's activations "
                        "of GPU memory; needs a CUDA --device")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each UNet block (fuses the elementwise work; with --cuda-graph the fastest "
                        "path on a GPU: SDXL 1024 px on an H100 23 -> 28 UNet it/s). The first image compiles "
                        "(about a minute for SDXL); worth it for many images")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be at least 1")
    if a.batch < 1:
        p.error("--batch must be at least 1")
    if a.threads < 1:
        print(f"error: --threads must be at least 1, got {a.threads}", file=sys.stderr)
        sys.exit(2)
    if not 0.0 < a.strength <= 1.0:
        p.error("--strength must be in (0, 1]")
    if a.karras and a.sampler not in ("euler", "dpmpp_2m"):
        p.error("--karras applies to --sampler euler or dpmpp_2m (as in diffusers)")
    return a


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def parameters_text(a, width: int, height: int, seed: int, model_name: str) -> str:
    """The A1111 `parameters` chunk: prompt, negative prompt, then one line of settings."""
    sampler = SAMPLER_NAMES[a.sampler] + (" Karras" if a.karras else "")
    lines = [a.prompt]
    if a.negative:
        lines.append(f"Negative prompt: {a.negative}")
    settings = f"Steps: {a.steps}, Sampler: {sampler}, CFG scale: {a.cfg}, Seed: {seed}, " \
               f"Size: {width}x{height}, Model: {model_name}"
    if a.init:
        settings += f", Denoising strength: {a.strength}"
    lines.append(settings)
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from PIL import Image, PngImagePlugin, UnidentifiedImageError

    from minisd.formats import TINY_RANDOM, load_model
    from minisd.model import ModelError
    from minisd.pipeline import Pipeline

    if a.cuda_graph and not a.device.startswith("cuda"):
        print(f"error: --cuda-graph needs a CUDA device, not --device {a.device}", file=sys.stderr)
        return 2
    model_path = a.model or (DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else TINY_RANDOM)
    if a.prompt is None:
        if os.path.basename(os.path.normpath(model_path)) == "minisd-tiny" and not a.init:
            return grid(a, model_path)
        a.prompt = DEFAULT_PROMPT
    init = None
    if a.init:
        try:
            init = Image.open(a.init)
            init.load()
            init = init.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            print(f"error: {a.init}: not a readable image ({e})", file=sys.stderr)
            return 2
    try:
        t0 = time.time()
        model = load_model(model_path)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    pipe = Pipeline(model, device=a.device, dtype=dtype, cuda_graph=a.cuda_graph, compile=a.compile)
    f = model.vae_scale
    width = a.width or (init.width // f * f if init else model.cfg.resolution)
    height = a.height or (init.height // f * f if init else model.cfg.resolution)
    if width % f or height % f:
        print(f"error: --width/--height must be multiples of {f} for this model", file=sys.stderr)
        return 2
    print(f"model {model_path} ({model.cfg.family}) loaded in {time.time() - t0:.1f}s; "
          f"{a.batch} image(s) {width}x{height}, {a.sampler}{' karras' if a.karras else ''}, "
          f"{a.steps} steps, cfg {a.cfg}, seed {a.seed}{', CUDA graph' if a.cuda_graph else ''}"
          f"{', compiled' if a.compile else ''}", file=sys.stderr)
    try:
        images = pipe(a.prompt, negative=a.negative or None, steps=a.steps, sampler=a.sampler,
                      karras=a.karras, cfg_scale=a.cfg, seed=a.seed, width=width, height=height,
                      batch=a.batch, init_image=init, strength=a.strength, eta=a.eta, progress=True)
    except ValueError as e:  # e.g. img2img strength so low that no step is left
        print(f"error: {e}", file=sys.stderr)
        return 2

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(a, width, height, a.seed, os.path.basename(
        os.path.normpath(model_path))))
    stem, ext = os.path.splitext(a.out)
    outs = [a.out] if len(images) == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(len(images))]
    for img, path in zip(images, outs):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        img.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)  # never leave a half-written PNG behind
        print(path)
    return 0


def grid(a, model_path: str) -> int:
    """No prompt, minisd-tiny: draw held-out world prompts (compositions it never saw) as a captioned grid."""
    from PIL import PngImagePlugin

    from minisd.formats import load_model
    from minisd.model import ModelError
    from minisd.pipeline import Pipeline
    from minisd.world.pretrain import caption_grid, grid_prompts

    t0 = time.time()
    try:
        model = load_model(model_path)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = GRID_STEPS if a.steps == 30 else a.steps      # 30 and 7.5 are the flags' defaults
    cfg = GRID_CFG if a.cfg == 7.5 else a.cfg
    prompts = grid_prompts(GRID_PROMPTS)
    pipe = Pipeline(model, device=a.device, cuda_graph=a.cuda_graph, compile=a.compile)
    images = pipe(prompts, steps=steps, sampler=a.sampler, karras=a.karras, cfg_scale=cfg, seed=a.seed, eta=a.eta)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "\n".join(prompts) + f"\nSteps: {steps}, Sampler: {SAMPLER_NAMES[a.sampler]}, "
                  f"CFG scale: {cfg}, Seed: {a.seed}, Model: {os.path.basename(os.path.normpath(model_path))}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    caption_grid(images, prompts).save(a.out + ".tmp", format="PNG", pnginfo=info)
    os.replace(a.out + ".tmp", a.out)
    print(f"{len(prompts)} held-out world prompts, {steps} steps, cfg {cfg}, seed {a.seed}: "
          f"{time.time() - t0:.1f}s", file=sys.stderr)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
