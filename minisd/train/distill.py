"""Knowledge distillation by block removal (BK-SDM, Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version
of Stable Diffusion"; Segmind's SD-Small / SD-Tiny follow it): build a smaller UNet from a teacher by removing
blocks, start it from the teacher's weights of the blocks it keeps, and train it to imitate the teacher.

The recipes (`plan_student`), in the official block names of the teacher (unet.py's table for SD1.5):

    small   every down level keeps its first ResBlock (+ attention) of num_res_blocks; every up level keeps the
            first and the last of its num_res_blocks + 1 (the middle ones go; the last carries the Upsample);
            the middle block stays. SD1.5 (859.5 M) -> SD-Small / BK-SDM-Small, 579.4 M.
    tiny    as small, without the middle block, and without the deepest level when it has the width of the level
            above (SD1.5: the attention-free 8x8 level at 1280 channels; its up level goes too, and the new deepest
            level loses its Downsample) -> SD-Tiny / BK-SDM-Tiny, 323.4 M. Where the deepest level is wider
            (minisd-tiny: 64 -> 128 channels) the blocks of the level above could not keep their shapes without it,
            so the level stays and tiny = small without the middle block.

Kept blocks keep their shapes because each up ResBlock's input is (the block below's output, the skip it pops), and
the skips the student pops are exactly those its teacher block popped (SD1.5 up level 3: teacher output_blocks 0 and
2 pop input_blocks 11 and 9, student output_blocks 0 and 1 pop the student's copies of input_blocks 10 and 9).

The loss (BK-SDM Eq. 1-3; Segmind's distill_training.py does the same):

    L = L_task + output_weight · ‖ε_S(z_t, t, c) − ε_T(z_t, t, c)‖² + feature_weight · Σ_l ‖f_S^l − f_T^l‖²

each ‖·‖² a mean over elements (F.mse_loss), L_task the trainer's usual ε / v loss (Min-SNR-γ weighted if asked),
f^l the output of the l-th matched block (`features`): each down level's and each up level's last block, as BK-SDM
hooks `down_blocks.i` / `up_blocks.i`; after a removed level the new deepest down level has no Downsample, so its
match is the attention's `proj_out` of the last kept ResBlock (BK-SDM's `down_blocks.2.attentions.{1,0}.proj_out`).
BK-SDM's and Segmind's code default to weights 1 / 1 (Segmind's SD-Small run used 0.5 / 0.5).

    python -m minisd.train.distill weights/minisd-tiny small      # which teacher block fills which student block
    python -m minisd.train.distill sd15 tiny                      # SD1.5's shape on meta tensors (no weights)
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import UNetConfig
from ..trainer import Draws, MicroBatch, min_snr_weight, noised
from ..unet import Downsample, ResBlock, UNetModel, Upsample, sdxl_vector_cond
from ..vae import DiagonalGaussian

RECIPES = ("small", "tiny")
SHARED = ("time_embed", "label_emb", "out")  # outside the U: always kept as they are


@dataclass
class StudentPlan:
    """What a recipe makes of a teacher: the student's config, which teacher block fills each student block
    (official module names, e.g. ("output_blocks.1", "output_blocks.2")), the teacher blocks left out, and the
    (teacher module, student module) pairs whose outputs the feature loss compares."""
    recipe: str
    cfg: UNetConfig
    blocks: list
    dropped: list
    features: list


def teacher_layout(cfg: UNetConfig):
    """Per level: (indices of its input ResBlocks, index of its Downsample or None) and (indices of its output
    blocks), in the order UNetModel builds them."""
    levels, i = len(cfg.channel_mult), 1  # input_blocks[0] is conv_in
    down = []
    for lvl in range(levels):
        res = list(range(i, i + cfg.num_res_blocks[lvl]))
        i += cfg.num_res_blocks[lvl]
        ds = None if lvl == levels - 1 else i
        i += ds is not None
        down.append((res, ds))
    up, j = {}, 0
    for lvl in reversed(range(levels)):
        up[lvl] = list(range(j, j + cfg.num_res_blocks[lvl] + 1))
        j += cfg.num_res_blocks[lvl] + 1
    return down, up


def plan_student(teacher: UNetConfig, recipe: str) -> StudentPlan:
    """The student of `teacher` under `recipe` (module docstring). ValueError for an unknown recipe or a teacher
    the recipe does not fit (one level, no middle block, a level with fewer than 1 ResBlock)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown distillation recipe {recipe!r} (one of {', '.join(RECIPES)})")
    if not teacher.mid_block:
        raise ValueError("the teacher has no middle block: it is block-removed already")
    if min(teacher.num_res_blocks) < 1:
        raise ValueError(f"teacher num_res_blocks {teacher.num_res_blocks}: every level needs a ResBlock")
    mult = teacher.channel_mult
    drop = recipe == "tiny" and len(mult) >= 2 and mult[-1] == mult[-2]
    keep = len(mult) - drop
    cfg = dataclasses.replace(
        teacher, channel_mult=tuple(mult[:keep]), num_res_blocks=(1,) * keep,
        transformer_depth=tuple(teacher.transformer_depth[:keep]), mid_block=recipe == "small",
        transformer_depth_middle=teacher.transformer_depth_middle if recipe == "small" else 0)
    down, up = teacher_layout(teacher)

    blocks, feats = [("input_blocks.0", "input_blocks.0")], []
    s = 1
    for lvl in range(keep):
        res, ds = down[lvl]
        blocks.append((f"input_blocks.{s}", f"input_blocks.{res[0]}"))
        last = lvl == keep - 1
        if not last:
            s += 1
            blocks.append((f"input_blocks.{s}", f"input_blocks.{ds}"))
            feats.append((f"input_blocks.{ds}", f"input_blocks.{s}"))                  # down level output
        elif not drop:
            feats.append((f"input_blocks.{res[-1]}", f"input_blocks.{s}"))            # deepest level output
        else:  # the teacher's output here went through a Downsample the student lacks: BK-SDM's proj_out pair
            attn = ".1.proj_out" if teacher.transformer_depth[lvl] else ""
            feats.append((f"input_blocks.{res[-1]}{attn}", f"input_blocks.{s}{attn}"))
        s += 1
    if cfg.mid_block:
        blocks.append(("middle_block", "middle_block"))
    s = 0
    for lvl in reversed(range(keep)):
        first, last = up[lvl][0], up[lvl][-1]
        blocks += [(f"output_blocks.{s}", f"output_blocks.{first}"), (f"output_blocks.{s + 1}", f"output_blocks.{last}")]
        feats.append((f"output_blocks.{last}", f"output_blocks.{s + 1}"))             # up level output
        s += 2
    used = {t for _, t in blocks}
    every = ([f"input_blocks.{i}" for i in range(1 + sum(teacher.num_res_blocks) + len(mult) - 1)] + ["middle_block"]
             + [f"output_blocks.{j}" for j in range(sum(teacher.num_res_blocks) + len(mult))])
    return StudentPlan(recipe, cfg, blocks, [b for b in every if b not in used], feats)


def student_state_dict(teacher_sd: dict, plan: StudentPlan) -> dict:
    """The student's initial weights: each student block's tensors are its teacher block's, renamed; the layers
    outside the U (time_embed, label_emb, out) as they are. Every teacher tensor of a dropped block is left out."""
    rename = [(t + ".", s + ".") for s, t in plan.blocks] + [(p + ".", p + ".") for p in SHARED]
    out = {}
    for key, value in teacher_sd.items():
        for t, s in rename:
            if key.startswith(t):
                out[s + key[len(t):]] = value.detach().clone()
                break
    return out


def build_student(teacher: UNetModel, recipe: str) -> tuple[UNetModel, StudentPlan]:
    """A student UNet (fp32, on the CPU) started from the teacher's kept blocks, loaded strictly (a recipe that
    left a student tensor unfilled, or filled one with a wrong shape, fails here)."""
    plan = plan_student(teacher.cfg, recipe)
    student = UNetModel(plan.cfg)
    student.load_state_dict({k: v.float().cpu() for k, v in student_state_dict(teacher.state_dict(), plan).items()},
                            strict=True)
    return student, plan


def describe(block) -> str:
    """A block's contents in the unet.py table's letters: R=ResBlock, A=SpatialTransformer, D/U=down/up-sampling."""
    if block is None:
        return "-"
    letters = {ResBlock: "R", Downsample: "D", Upsample: "U"}
    return "+".join(letters.get(type(m), "A" if hasattr(m, "transformer_blocks") else "conv") for m in block)


def explain(teacher: UNetModel, plan: StudentPlan) -> str:
    """Which teacher block fills which student block, what is dropped, what the feature loss compares."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    t_mod = dict(teacher.named_modules())
    lines = [f"recipe {plan.recipe}: student channel_mult {plan.cfg.channel_mult}, num_res_blocks "
             f"{plan.cfg.num_res_blocks}, middle block {'kept' if plan.cfg.mid_block else 'removed'}"]
    for s, t in plan.blocks:
        lines.append(f"  student {s:<16} <- teacher {t:<16} {describe(t_mod[t]):<8} {count(t_mod[t]):>12,} params")
    for s in SHARED:
        if getattr(teacher, s) is not None:
            lines.append(f"  student {s:<16} <- teacher {s:<16} {'':<8} {count(t_mod[s]):>12,} params")
    for t in plan.dropped:
        lines.append(f"  dropped {'':<16}    teacher {t:<16} {describe(t_mod[t]):<8} {count(t_mod[t]):>12,} params")
    n_s = sum(count(t_mod[t]) for _, t in plan.blocks) + sum(count(t_mod[s]) for s in SHARED if t_mod.get(s))
    lines.append(f"  parameters: teacher {count(teacher):,}, student {n_s:,} ({100 * n_s / count(teacher):.1f} %)")
    lines += [f"  feature loss: teacher {t} <-> student {s}" for t, s in plan.features]
    return "\n".join(lines)


class FeatureHooks:
    """Forward hooks on the matched blocks of teacher and student (`plan.features`): after a forward of each,
    `.teacher[name]` / `.student[name]` hold the latest output of every hooked module; `pairs` says which go
    together. `remove()` takes the hooks out again."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, pairs: list):
        self.pairs, self.teacher, self.student, self.handles = list(pairs), {}, {}, []
        for net, names, store in ((teacher, [t for t, _ in pairs], self.teacher),
                                  (student, [s for _, s in pairs], self.student)):
            modules = dict(net.named_modules())
            for n in names:
                if n not in modules:
                    raise ValueError(f"no module named {n} to hook")
                self.handles.append(modules[n].register_forward_hook(self._keep(store, n)))

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(module, args, output):
            store[name] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class DistillWeights:
    output_weight: float = 1.0    # BK-SDM's / Segmind's code default
    feature_weight: float = 1.0


def distill_loss(model, teacher: UNetModel, noise, batch: MicroBatch, draw: Draws, hooks: FeatureHooks | None,
                 weights: DistillWeights, *, noise_offset: float = 0.0, input_perturbation: float = 0.0,
                 min_snr_gamma: float = 0.0, amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """(L, {"task", "output", "feature"}) of one micro-batch: the module docstring's equation. `model` holds the
    student as `model.unet` (and the frozen VAE and text encoders); `hooks`: FeatureHooks over `plan.features`.
    The draws are those of trainer.training_loss, in its order (ε_z, t, ε, ...), so a run with both weights 0 is
    plain training of the student (the teacher is not even run then)."""
    # 1-2. clean latents and the noised input, exactly as the plain step draws them
    with torch.no_grad():
        if batch.moments is not None:
            x, posterior = batch.moments, DiagonalGaussian(batch.moments)
        else:
            x, posterior = batch.pixels, model.vae.encode(batch.pixels)
        eps_z = draw.randn(posterior.mean.shape, x.dtype)
        z0 = (posterior.mean + posterior.std * eps_z).float() * model.cfg.vae.scale_factor       # (B, C, h, w)
    zt, t, target = noised(noise, z0, draw, noise_offset, input_perturbation)
    use_teacher = weights.output_weight != 0 or weights.feature_weight != 0
    with torch.autocast(z0.device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        if batch.context is not None:  # --cache-text: the (shared, frozen) text encoder ran once
            ctx, pooled = batch.context, batch.pooled
        else:
            with torch.no_grad():
                ctx, pooled = model.encode_text(batch.ids)                                   # (B, T, D), (B, P)
        y = None
        if batch.time_ids is not None:
            y = sdxl_vector_cond(pooled.float(), batch.time_ids, embed_dim=model.cfg.unet.addition_time_embed_dim)
        # 3. the teacher's answer and block outputs (no grad: it is frozen), then the student's
        if use_teacher:
            with torch.no_grad():
                pred_t = teacher(zt, t, ctx, y=y)                                            # (B, C, h, w)
        pred = model.unet(zt, t, ctx, y=y)                                                   # (B, C, h, w)
    # 4. the three terms, in fp32
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))     # (B,)
    if min_snr_gamma > 0:
        ab = noise._at(noise.alphas_cumprod, t, per)
        per = per * min_snr_weight(ab / (1 - ab), min_snr_gamma, noise.prediction_type)
    terms = {"task": per.mean()}
    zero = torch.zeros((), device=pred.device)
    terms["output"] = F.mse_loss(pred.float(), pred_t.float()) if use_teacher else zero
    feat = zero
    if use_teacher and hooks is not None and weights.feature_weight != 0:
        feat = sum(F.mse_loss(hooks.student[sn].float(), hooks.teacher[tn].float()) for tn, sn in hooks.pairs)
    terms["feature"] = feat
    loss = terms["task"] + weights.output_weight * terms["output"] + weights.feature_weight * terms["feature"]
    return loss, terms


def main(argv: list | None = None) -> int:
    """Print a recipe's plan for a model (a path load_model reads, or a preset name: built on meta, no weights)."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m minisd.train.distill",
                                description="Which teacher block fills which student block of a distillation recipe.")
    p.add_argument("model", help="minisd / diffusers folder or single file, or a preset name (sd15: no weights read)")
    p.add_argument("recipe", choices=RECIPES)
    a = p.parse_args(argv)
    from ..config import PRESETS
    from ..model import ModelError, empty_weights
    try:
        if a.model in PRESETS:
            with empty_weights():
                teacher = UNetModel(PRESETS[a.model].unet)
        else:
            from ..formats import load_model
            teacher = load_model(a.model).unet
        print(explain(teacher, plan_student(teacher.cfg, a.recipe)))
    except (ValueError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
