"""Textual inversion of a concept minisd-tiny can draw: does a new token learn "heart"? (README, "Textual inversion")

    python tools/ti_known_concept.py OUT [train.py flags...]     e.g. --ti-norm-weight 0.01 --lr 0.02

Writes OUT/data: 200 world training images whose shape is a heart, their captions with "<sks>" in place of "heart"
("a small red <sks> at the top left on a blue background"); trains `--method ti` (init: circle) on minisd-tiny; draws
32 held-out heart prompts, again with "<sks>" for "heart", before and after, and prints what the probe reads: the
fraction drawn as hearts (shape), the colour and position accuracy, and the vectors' norm against the vocabulary's.
OUT/ti_known.json keeps the numbers.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str]) -> None:
    import torch
    from minisd import world
    from minisd.train.cli import parse_config
    from minisd.train.loop import Trainer
    from minisd.train.validation import sampling
    from minisd.world.probe import score
    torch.set_num_threads(1)
    out, flags = argv[0], argv[1:]
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    train = [p for p in world.sample(4000, seed=0, split="train") if p[0].shape == "heart"][:200]
    for i, (attrs, text) in enumerate(train):
        world.render(attrs).save(os.path.join(data, f"{i:05d}.png"))
        with open(os.path.join(data, f"{i:05d}.txt"), "w") as f:
            f.write(text.replace(" heart", " <sks>") + "\n")
    held = [p for p in world.sample(4000, seed=10_000, split="heldout") if p[0].shape == "heart"][:32]
    attrs, prompts = [a for a, _ in held], [t.replace(" heart", " <sks>") for _, t in held]
    cfg, _ = parse_config(["--model", os.path.join(ROOT, "weights", "minisd-tiny"), "--method", "ti", "--data", data,
                           "--out", out, "--no-samples", "--no-progress", "--lr", "5e-3", "--max-steps", "300"]
                          + flags)
    t = Trainer(cfg, out)

    def evaluate(tag: str) -> dict:
        images = []
        with sampling(t) as pipe:
            for i in range(0, len(prompts), 8):
                images += pipe(prompts[i:i + 8], steps=15, cfg_scale=5.0, seed=i)
        res = score(images, attrs)
        v = t.method.params[0].detach()
        res["norm"], res["mu"] = v.norm(dim=1).mean().item(), t.method.mu[0]
        print(f"{tag}: heart {100 * res['shape']:.0f} %, colour {100 * res['colour']:.0f} %, position "
              f"{100 * res['position']:.0f} %, |v| {res['norm']:.2f} (vocabulary mean {res['mu']:.2f})", flush=True)
        return res

    before = evaluate("before")
    t.run()
    after = evaluate("after")
    with open(os.path.join(out, "ti_known.json"), "w") as f:
        json.dump({"flags": flags, "before": before, "after": after}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
