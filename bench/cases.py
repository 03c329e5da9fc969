"""The benchmark cases of issue 6: one row per (case, implementation) in BENCHMARKS.md.

Every training case uses the same recipe on both sides (bench/train_bench.py): frozen base in bf16, LoRA rank 16
alpha 16 on the UNet's attn1/attn2 to_q, to_k, to_v, to_out.0, bf16 autocast, fp32 VAE encode and the text
encoder(s) inside the step (or, `cached`, precomputed latents and text states so the step is the UNet alone), ε-MSE
loss, backward, fused torch AdamW. Sampling is 30 DDIM steps with classifier-free guidance 7.5 (a batch-2 UNet call
per step), bf16 UNet and text encoders, fp32 VAE decode. The optimizer case steps a parameter set shaped like the
SD1.5 UNet with three AdamW variants.

`impls` are the rows of a case; `refs` the references the minisd row is divided by (one "ratio" column each in the
report), using the case's `headline` metric (higher is better for all three). `reference` is the first of them.

Issue 20's rows (training.py / methods.py say each recipe in full):
- "diffusers-compiled": the fair rival, diffusers + peft as a performance-minded user runs it (diffusers' docs,
  "Accelerate inference" / torch.compile: UNet in channels-last, inductor's conv_1x1_as_mm and coordinate-descent
  tuning, `torch.compile(unet, fullgraph=True)`; TF32 on, the training scripts' --allow_tf32). On the headline rows
  (SD1.5 LoRA bs8, SDXL LoRA bs1) beside plain diffusers, so one table shows both ratios.
- `base_dtype` int8 / fp8: the frozen UNet and text encoders of the minisd row stored in 8 bits
  (`minisd.perf.quant.quantize_frozen`, as train.py --base-dtype applies it after the adapters); the reference row
  is diffusers + peft over a bf16 base.
- `fused_backward`: buckets of tensors (2²⁵ values each) stepped inside the backward (`minisd.train.fused.
  FusedBackward`, train.py --fused-backward); diffusers' train_text_to_image.py has no such option, its row is the
  plain step.
- `method`: "ti" (textual inversion), "dreambooth" (LoRA + prior preservation: a class batch beside every instance
  batch), "hypernetwork", "distill" (BK-SDM student of `recipe`): methods.py; "lora" / "full" as before.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

TRAIN_IMPLS = ("minisd", "diffusers")
COMPILED = "diffusers-compiled"             # the fair rival (training.compile_reference)
OPTIM_IMPLS = ("minisd", "bnb", "torch")   # minisd AdamW8bit, bitsandbytes AdamW8bit, torch AdamW (fused)


@dataclass(frozen=True)
class Target:
    """A goal of the issue, checked on the minisd row: `metric op value`. metric "ratio" is minisd / reference of
    the case's headline metric; any other name is a field of the minisd row's JSON."""
    metric: str
    op: str        # ">=" or "<="
    value: float
    ref: str | None = None   # metric "ratio": the reference row divided by (None: the case's first reference)

    def label(self, headline: str, reference: str | None = None) -> str:
        op = {">=": "≥", "<=": "≤"}[self.op]
        if self.metric == "ratio":
            return f"{op} {self.value:g}× {self.ref or reference or 'reference'} {headline}"
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
    # issue 20 (see the module docstring)
    refs: tuple = ("diffusers",)  # reference rows beside minisd's; () = a minisd-only row
    base_dtype: str = "auto"      # "auto" (bf16) | "int8" | "fp8": minisd's frozen base
    fused_backward: bool = False  # minisd: the optimizer step inside the backward
    method: str = "lora"          # "lora" | "ti" | "dreambooth" | "hypernetwork" | "distill" (full FT: full_ft)
    recipe: str = ""              # distill: the student (minisd.train.distill.RECIPES)
    versus: str = ""              # a minisd-only row: the case whose minisd row it is divided by (distill: teacher)

    @property
    def impls(self) -> tuple:
        return OPTIM_IMPLS if self.kind == "optim" else ("minisd", *self.refs)

    @property
    def reference(self) -> str | None:
        return "bnb" if self.kind == "optim" else (self.refs[0] if self.refs else None)

    @property
    def references(self) -> tuple:
        return ("bnb",) if self.kind == "optim" else self.refs

    @property
    def headline(self) -> str:
        return {"train": "images_per_s", "sample": "unet_it_s", "optim": "steps_per_s"}[self.kind]


G_TRAIN = "LoRA training: VAE encode + text encoders inside the step"
G_CACHED = "LoRA training: cached latents and text embeddings (UNet only)"
G_FULL = "Full fine-tune: SD1.5, 8-bit AdamW"
G_SAMPLE = "Sampling: DDIM 30 steps, CFG 7.5"
G_OPTIM = "Optimizer step: SD1.5 UNet parameter set (fp32 parameters and gradients)"
G_QUANT = "LoRA over an 8-bit frozen base (minisd --base-dtype) vs diffusers + peft over bf16"
G_FULL2 = "Full fine-tune with the memory tools: 8-bit AdamW, checkpointing, fused backward"
G_METHODS = "Other methods: textual inversion, DreamBooth + prior, hypernetwork, distillation"
GROUPS = (G_TRAIN, G_CACHED, G_FULL, G_FULL2, G_QUANT, G_METHODS, G_SAMPLE, G_OPTIM)

SD15_BS8 = (Target("ratio", ">=", 2.5),)
SDXL_BS1 = (Target("ratio", ">=", 3.0), Target("peak_reserved_gib", "<=", 12.0))
# issue 20: minisd's best against both the plain and the compiled reference, and 40 % MFU
SD15_BS8_FAIR = (Target("ratio", ">=", 2.5), Target("ratio", ">=", 1.5, ref=COMPILED), Target("mfu", ">=", 0.40))
SDXL_INT8 = (Target("peak_reserved_gib", "<=", 8.0), Target("ratio", ">=", 3.0))
FAIR = ("diffusers", COMPILED)


def _lora(family, res, batch, gc, cached=False, targets=(), refs=("diffusers",)):
    name = f"{family}-lora-{res}-bs{batch}" + ("-gc" if gc else "") + ("-cached" if cached else "")
    return Case(name, G_CACHED if cached else G_TRAIN, "train", family, res, batch, checkpointing=gc,
                cached=cached, targets=targets, refs=refs)


CASES = [
    *[_lora("sd15", 512, b, gc, targets=(SD15_BS8_FAIR if b == 8 and not gc else SD15_BS8 if b == 8 else ()),
            refs=FAIR if b == 8 else ("diffusers",)) for b in (1, 4, 8) for gc in (False, True)],
    _lora("sdxl", 1024, 1, False, targets=SDXL_BS1, refs=FAIR),
    _lora("sdxl", 1024, 1, True, targets=SDXL_BS1, refs=FAIR),
    _lora("sdxl", 1024, 4, True),
    _lora("ldm", 256, 32, False),
    _lora("sd15", 512, 8, False, cached=True, targets=SD15_BS8),
    _lora("sd15", 512, 8, True, cached=True, targets=SD15_BS8),
    _lora("sdxl", 1024, 1, False, cached=True, targets=SDXL_BS1),
    _lora("sdxl", 1024, 1, True, cached=True, targets=SDXL_BS1),
    # issue 5's memory goal: SD1.5 full fine-tune at 512 within 16 GiB
    Case("sd15-full-512-bs1-gc", G_FULL, "train", "sd15", 512, 1, checkpointing=True, full_ft=True,
         optimizer="adamw8bit", targets=(Target("peak_reserved_gib", "<=", 16.0),)),
    # issue 20: the memory tools
    Case("sd15-full-512-bs1-gc-fused", G_FULL2, "train", "sd15", 512, 1, checkpointing=True, full_ft=True,
         optimizer="adamw8bit", fused_backward=True, targets=(Target("peak_reserved_gib", "<=", 10.0),)),
    Case("sdxl-full-1024-bs1-gc-fused", G_FULL2, "train", "sdxl", 1024, 1, checkpointing=True, full_ft=True,
         optimizer="adamw8bit", fused_backward=True, warmup=2, iters=5,
         targets=(Target("peak_reserved_gib", "<=", 24.0),)),
    *[Case(f"sdxl-lora-1024-bs1-gc-{q}", G_QUANT, "train", "sdxl", 1024, 1, checkpointing=True, base_dtype=q,
           targets=SDXL_INT8) for q in ("int8", "fp8")],
    Case("sdxl-lora-1024-bs1-int8", G_QUANT, "train", "sdxl", 1024, 1, base_dtype="int8",
         targets=(Target("ratio", ">=", 3.0),)),
    # issue 20: the other methods (methods.py)
    Case("sd15-ti-512-bs1", G_METHODS, "train", "sd15", 512, 1, method="ti"),
    Case("sd15-dreambooth-prior-512-bs1", G_METHODS, "train", "sd15", 512, 1, method="dreambooth"),
    Case("sd15-hypernetwork-512-bs1", G_METHODS, "train", "sd15", 512, 1, method="hypernetwork", refs=()),
    Case("sd15-distill-teacher-512-bs1", G_METHODS, "train", "sd15", 512, 1, full_ft=True, method="distill",
         recipe="teacher", refs=()),
    *[Case(f"sd15-distill-{r}-512-bs1", G_METHODS, "train", "sd15", 512, 1, full_ft=True, method="distill",
           recipe=r, refs=(), versus="sd15-distill-teacher-512-bs1") for r in ("small", "tiny")],
    Case("sample-sd15-512", G_SAMPLE, "sample", "sd15", 512, 1, warmup=1, iters=3,
         targets=(Target("ratio", ">=", 2.0),)),
    Case("sample-sdxl-1024", G_SAMPLE, "sample", "sdxl", 1024, 1, warmup=1, iters=3,
         targets=(Target("ratio", ">=", 2.0), Target("s_per_image", "<=", 1.3))),
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
