"""Which example prompts does minisd-tiny draw right? Generate each with sample.py's settings and read the images
with the probe (minisd/world/probe.py).

    python tools/check_prompts.py                            # the prompts below, 8 images each (seeds 0, 1 x 4)
    python tools/check_prompts.py "a large red circle at the center on a blue background" --seeds 0 1 2

A prompt in the world's words ("a {size} {colour} {shape} at the {position} on a {background} background", or the
other three templates of minisd/world) is scored on all five attributes; a partial one ("a red circle on a blue
background") on the words it has: the attributes named in PARTIAL below. Settings are those of
`python sample.py "PROMPT" --batch 4`: DDIM 30 steps, guidance 7.5, 64 px, 1 thread; each seed is one batch of 4.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# partial prompts: what they name (the probe reads the rest too, but the prompt leaves it free)
PARTIAL = {
    "a red circle on a blue background": dict(shape="circle", colour="red", background="blue"),
    "a red circle": dict(shape="circle", colour="red"),
    "a yellow star on a purple background": dict(shape="star", colour="yellow", background="purple"),
}
FULL = [
    "a large red circle at the center on a blue background",
    "a small red star at the center on a blue background",
    "a large yellow star at the top left on a purple background",
    "a small white heart at the bottom right on a green background",
    "a blue background with a large red circle at the center",
    "a large green triangle at the center on a black background",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompts", nargs="*", help="prompts to check (default: the lists above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one batch of --batch images per seed")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.5)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from minisd import world
    from minisd.formats import load_model
    from minisd.pipeline import Pipeline
    from minisd.world.probe import load_probe

    pipe = Pipeline(load_model(os.path.join(ROOT, "weights", "minisd-tiny")), device="cpu")
    probe = load_probe(os.path.join(ROOT, "weights", "probe.safetensors"))
    prompts = a.prompts or list(PARTIAL) + FULL
    print(f"DDIM {a.steps} steps, cfg {a.cfg}, seeds {a.seeds} x batch {a.batch}")
    print(f"{'prompt':<62} {'right':>7}  what the probe read, when wrong")
    for prompt in prompts:
        want = PARTIAL.get(prompt)
        if want is None:
            want = {k: v for k, v in world.parse_caption(prompt).items()
                    if k in ("shape", "colour", "size", "position", "background")}
        images = []
        for seed in a.seeds:
            images += pipe(prompt, steps=a.steps, sampler="ddim", cfg_scale=a.cfg, seed=seed, batch=a.batch)
        read = probe.predict(images)
        wrong = [r for r in read if any(getattr(r, k) != v for k, v in want.items())]
        seen = sorted({f"{r.colour} {r.shape} on {r.background}" for r in wrong})
        print(f"{prompt:<62} {len(read) - len(wrong):>3} / {len(read)}  {'; '.join(seen)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
