"""The benchmark cases of issue 6: one row per (case, implementation) in BENCHMARKS.md.

Every training case uses the same recipe on both sides (bench/train_bench.py): frozen base in bf16, LoRA rank 16
alpha 16 on the UNet's attn1/attn2 to_q, to_k, to_v, to_out.0, bf16 autocast, fp32 VAE encode and the text
encoder(s) inside the step (or, `cached`, precomputed latents and text states so the step is the UNet alone), ε-MSE
loss, backward, fused torch AdamW. Sampling is 30 DDIM steps with classifier-free guidance 7.5 (a batch-2 UNet call
per step), bf16 UNet and text encoders, fp32 VAE decode. The optimizer case steps a parameter set shaped like the
SD1.5 UNet with three AdamW variants.

`impls` are the rows of a case; `reference` is the one the minisd row is divided by ("ratio" in the report), using
the case's `headline` metric (higher is better for all three).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

TRAIN_IMPLS = ("minisd", "diffusers")
OPTIM_IMPLS = ("minisd", "bnb", "torch")   # minisd AdamW8bit, bitsandbytes AdamW8bit, torch AdamW (fused)


@dataclass(frozen=True)
class Target:
    """A goal of the issue, checked on the minisd row: `metric op value`. metric "ratio" is minisd / reference of
    the case's headline metric; any other name is a field of the minisd row's JSON."""
    metric: str
    op: str        # ">=" or "<="
    value: float

    def label(self, headline: str) -> str:
        op = {">=": "≥", "<=": "≤"}[self.op]
        if self.metric == "ratio":
            return f"{op} {self.value:g}× {headline}"
        return f"{self.metric} {op} {self.value:g}"

    def met(self, v: float | None) -> bool | None:
        if v is None:
            return None
        return v >= self.value if self.op == ">=" else v <= self.value


@dataclass(frozen=True)
class Case:
    name: str
    group: str                  # the report's table
    kind: str                   # "train" | "sample" | "optim"
    family: str                 # "sd15" | "sdxl" | "ldm" (minisd presets SD15, SDXL_BASE, LDM_256)
    resolution: int = 512       # image side in pixels (the latent is resolution / 8)
    batch: int = 1              # images per step (sampling: per prompt; the UNet sees 2x for CFG)
    checkpointing: bool = False
    cached: bool = False        # latents and text states precomputed: the step is the UNet alone
    full_ft: bool = False       # every UNet parameter trains (fp32 weights), instead of a LoRA
    optimizer: str = "adamw"    # "adamw" (torch, fused where available) | "adamw8bit"
    steps: int = 30             # sampling steps
    cfg_scale: float = 7.5
    warmup: int = 3
    iters: int = 10
    targets: tuple = ()

    @property
    def impls(self) -> tuple:
        return OPTIM_IMPLS if self.kind == "optim" else TRAIN_IMPLS

    @property
    def reference(self) -> str:
        return "bnb" if self.kind == "optim" else "diffusers"

    @property
    def headline(self) -> str:
        return {"train": "images_per_s", "sample": "unet_it_s", "optim": "steps_per_s"}[self.kind]


G_TRAIN = "LoRA training: VAE encode + text encoders inside the step"
G_CACHED = "LoRA training: cached latents and text embeddings (UNet only)"
G_FULL = "Full fine-tune: SD1.5, 8-bit AdamW"
G_SAMPLE = "Sampling: DDIM 30 steps, CFG 7.5"
G_OPTIM = "Optimizer step: SD1.5 UNet parameter set (fp32 parameters and gradients)"
GROUPS = (G_TRAIN, G_CACHED, G_FULL, G_SAMPLE, G_OPTIM)

SD15_BS8 = (Target("ratio", ">=", 2.5),)
SDXL_BS1 = (Target("ratio", ">=", 3.0), Target("peak_reserved_gib", "<=", 12.0))


def _lora(family, res, batch, gc, cached=False, targets=()):
    name = f"{family}-lora-{res}-bs{batch}" + ("-gc" if gc else "") + ("-cached" if cached else "")
    return Case(name, G_CACHED if cached else G_TRAIN, "train", family, res, batch, checkpointing=gc,
                cached=cached, targets=targets)


CASES = [
    *[_lora("sd15", 512, b, gc, targets=SD15_BS8 if b == 8 else ()) for b in (1, 4, 8) for gc in (False, True)],
    _lora("sdxl", 1024, 1, False, targets=SDXL_BS1),
    _lora("sdxl", 1024, 1, True, targets=SDXL_BS1),
    _lora("sdxl", 1024, 4, True),
    _lora("ldm", 256, 32, False),
    _lora("sd15", 512, 8, False, cached=True, targets=SD15_BS8),
    _lora("sd15", 512, 8, True, cached=True, targets=SD15_BS8),
    _lora("sdxl", 1024, 1, False, cached=True, targets=SDXL_BS1),
    _lora("sdxl", 1024, 1, True, cached=True, targets=SDXL_BS1),
    # issue 5's memory goal: SD1.5 full fine-tune at 512 within 16 GiB
    Case("sd15-full-512-bs1-gc", G_FULL, "train", "sd15", 512, 1, checkpointing=True, full_ft=True,
         optimizer="adamw8bit", targets=(Target("peak_reserved_gib", "<=", 16.0),)),
    Case("sample-sd15-512", G_SAMPLE, "sample", "sd15", 512, 1, warmup=1, iters=3,
         targets=(Target("ratio", ">=", 2.0),)),
    Case("sample-sdxl-1024", G_SAMPLE, "sample", "sdxl", 1024, 1, warmup=1, iters=3,
         targets=(Target("ratio", ">=", 2.0),)),
    Case("optim-sd15", G_OPTIM, "optim", "sd15", warmup=3, iters=20,
         targets=(Target("state_bytes_per_param", "<=", 2.1), Target("ratio", ">=", 1.0))),
]
BY_NAME = {c.name: c for c in CASES}


def select(patterns: list[str] | None) -> list[Case]:
    """Cases whose name matches any shell pattern ("sd15-lora-*"), or "@targets" for every case with a target;
    all cases when `patterns` is empty. Table order is kept."""
    if not patterns:
        return list(CASES)
    out = []
    for c in CASES:
        if any((p == "@targets" and c.targets) or fnmatch.fnmatchcase(c.name, p) for p in patterns):
            out.append(c)
    return out
