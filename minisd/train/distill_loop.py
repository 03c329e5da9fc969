"""The distillation run (`train.py --distill small|tiny`): the fine-tuning loop of loop.py with a frozen teacher
beside a trainable student (minisd/train/distill.py has the recipes and the loss).

What changes against an adapter run, method by method of `Trainer`:

    build_model      the loaded model's UNet becomes the teacher (frozen, in the autocast dtype: bf16 on a GPU);
                     `self.model.unet` is the student built from its kept blocks, so sampling, validation grids
                     and the exported files all see the student; VAE and text encoders stay shared and frozen
    build_adapters   --distill-train full: every student weight trains, in fp32 (no adapters). adapters: the
                     student's weights freeze (in fp32: they are merged into at the end) and the loop's own
                     build_adapters puts the --network adapter into `self.model.unet`, the student
    micro_loss       `distill_loss`: task + output_weight · output + feature_weight · features (forward hooks)
    checkpoints      full: the student's state dict instead of the adapters'; adapters: the adapters, as an adapter
                     run's (the student's base is rebuilt from the teacher); exact resume either way
    write_outputs    student/ (minisd folder), student.safetensors (official single file), student-diffusers/
                     (diffusers folder, as segmind/small-sd is laid out), loss.png, loss.jsonl (+ the three terms);
                     adapters: the student with the adapters merged in, and lora.safetensors (minisd format), the
                     adapters of the unmerged student (the teacher's kept blocks)

Everything else - data, caches (the teacher's text states are the student's: --cache-text), 8-bit AdamW, EMA of the
student weights, LR schedule, grad scaler, RNG state - is the loop's own code.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .. import adapters
from ..formats import load_model
from ..formats.safe_write import atomic_path
from ..formats.export import export_diffusers, export_single_file
from ..formats.safe_write import MINISD, atomic_folder
from ..model import empty_weights, write_model_files
from ..perf.checkpoint import set_gradient_checkpointing
from ..trainer import Draws
from ..unet import UNetModel
from .distill import DistillWeights, FeatureHooks, build_student, distill_loss, explain
from .loop import Trainer, TrainError, draw_loss_curve


class DistillTrainer(Trainer):
    """Trainer whose trainable tensors are a block-removed student of the model's UNet (`cfg.distill` recipe), or,
    with --distill-train adapters, the adapters in that student."""

    def build_model(self) -> None:
        super().build_model()
        m, cfg = self.model, self.cfg
        self.teacher = m.unet.eval()                     # frozen (build_model froze it), in the autocast dtype
        # the student starts from the stored weights, not from a bf16 / fp16 copy of them: with autocast the teacher
        # was cast already, so its tensors are read once more from the file
        source = load_model(cfg.model).unet if self.amp_dtype is not None else self.teacher
        student, self.plan = build_student(source, cfg.distill)
        del source
        self.log(explain(self.teacher, self.plan))
        m.unet = student                                 # sampling, EMA, checkpoints and exports see the student
        m.cfg = dataclasses.replace(m.cfg, unet=self.plan.cfg)
        self.weights = DistillWeights(cfg.output_weight, cfg.feature_weight)
        self.terms = []                                  # per optimizer step: the mean of each loss term

    def build_adapters(self) -> None:
        cfg, m = self.cfg, self.model
        if cfg.distill_train == "adapters":
            # the student's own weights freeze, in fp32 (the files get W + ΔW of the stored W, not of a bf16 copy);
            # Trainer.build_adapters injects the adapters into m.unet - the student - and moves m to the device
            m.unet.float().requires_grad_(False)
            super().build_adapters()
        else:
            self.unet_layers, self.te_layers = [], []
            m.to(self.device)
            set_gradient_checkpointing(m.unet, cfg.gradient_checkpointing)
            self.unet_params = list(m.unet.parameters())
            for p in self.unet_params:                   # trainable tensors in fp32 whatever the autocast dtype
                p.data = p.data.float()
                p.requires_grad_(True)
            self.params = self.unet_params
        self.teacher.to(self.device)
        # the matched blocks' outputs; none needed when the feature term is off
        if cfg.gradient_checkpointing and cfg.feature_weight and any(s.count(".") > 1 for _, s in self.plan.features):
            # a module inside a recomputed block runs without grad in the forward: its output would train nothing
            inner = next(s for _, s in self.plan.features if s.count(".") > 1)
            raise ValueError(f"--gradient-checkpointing cannot be used with this recipe's feature loss (it reads "
                             f"{inner}, inside a recomputed block); use --feature-weight 0 or no checkpointing")
        self.hooks = FeatureHooks(self.teacher, m.unet, self.plan.features) if cfg.feature_weight else None

    def micro_loss(self, batch: dict) -> torch.Tensor:
        loss, terms = distill_loss(self.model, self.teacher, self.noise, self.micro_batch(batch),
                                   Draws(self.gen, self.device), self.hooks, self.weights,
                                   noise_offset=self.cfg.noise_offset, input_perturbation=self.cfg.input_perturbation,
                                   min_snr_gamma=self.cfg.min_snr_gamma, amp_dtype=self.amp_dtype)
        self._step_terms.append({k: v.item() for k, v in terms.items()})
        return loss

    def train_step(self) -> float:
        self._step_terms = []
        loss = super().train_step()
        n = len(self._step_terms)
        self.terms.append({k: sum(t[k] for t in self._step_terms) / n for k in self._step_terms[0]})
        return loss

    def append_loss(self, record: dict) -> None:
        # the loss.jsonl line gets the step's three terms (a resumed run rewrites the file from self.losses)
        record.update(self.terms[-1])
        super().append_loss(record)

    def trainable_summary(self, n_train: int) -> str:
        cfg = self.cfg
        n_teacher = sum(p.numel() for p in self.teacher.parameters())
        weights = f"output_weight {self.weights.output_weight}, feature_weight {self.weights.feature_weight}"
        if cfg.distill_train == "adapters":
            n_student = sum(p.numel() for p in self.model.unet.parameters()) - n_train
            return (f"distill {cfg.distill}: {cfg.network} rank {cfg.rank} alpha {cfg.alpha} on "
                    f"{len(self.unet_layers)} student layers ({cfg.targets}), {n_train:,} trainable parameters; "
                    f"student {n_student:,} (frozen), teacher {n_teacher:,} (frozen); {weights}")
        return (f"distill {cfg.distill}: student {n_train:,} parameters (all trainable), teacher {n_teacher:,} "
                f"(frozen); {weights}")

    # -------------------------------------------------------------------------------------- checkpoints, outputs
    def trainable_state(self) -> dict:
        if self.cfg.distill_train == "adapters":  # {"adapter": ...}, as an adapter run's
            return super().trainable_state()
        return {"student": {k: v.detach().clone() for k, v in self.model.unet.state_dict().items()}}

    def load_trainable_state(self, s: dict) -> None:
        if self.cfg.distill_train == "adapters":
            if "adapter" not in s:
                raise TrainError(f"{self.run_dir}: the checkpoint holds no adapters (another kind of run)")
            return super().load_trainable_state(s)
        if "student" not in s:
            raise TrainError(f"{self.run_dir}: the checkpoint holds no distillation student (another kind of run)")
        sd = s["student"]
        with torch.no_grad():  # in place: the optimizer and EMA hold these very tensors
            for k, v in self.model.unet.state_dict().items():
                v.copy_(sd[k])

    def write_outputs(self) -> dict:
        """The student three ways (module docstring), with the EMA weights if on; loss.jsonl, loss.png."""
        self.write_loss_log()
        draw_loss_curve([r["loss"] for r in self.losses], os.path.join(self.run_dir, "loss.png"))
        out = {"losses": [r["loss"] for r in self.losses], "student": os.path.join(self.run_dir, "student"),
               "single_file": os.path.join(self.run_dir, "student.safetensors"),
               "diffusers": os.path.join(self.run_dir, "student-diffusers")}
        meta = {"minisd.distill": self.cfg.distill, "minisd.steps": str(self.step)}
        trained = self.model.unet
        with self.eval_weights():
            # the frozen parts back to fp32 for the files (they may run in the autocast dtype)
            dtypes = [p.dtype for p in (next(te.parameters()) for te in self.model.text_encoders)]
            for te in self.model.text_encoders:
                te.float()
            try:
                if self.cfg.distill_train == "adapters":
                    out["lora"] = self.write_adapter(meta)
                    self.model.unet = merged_student(trained, self.plan.cfg)
                    meta = {**meta, "minisd.distill_train": "adapters (merged)"}
                # a resumed run writes them again: its earlier outputs in this (locked) run folder are replaced
                with atomic_folder(out["student"], overwrite=True, kind=MINISD) as tmp:
                    write_model_files(self.model, tmp, metadata=meta)
                export_single_file(self.model, None, out["single_file"], overwrite=True)
                export_diffusers(self.model, out["diffusers"], overwrite=True)
            finally:
                self.model.unet = trained
                for te, dt in zip(self.model.text_encoders, dtypes):
                    te.to(dt)
        return out

    def write_adapter(self, meta: dict) -> str:
        """lora.safetensors (minisd format): the student's adapters. They apply to the unmerged student - the
        teacher's kept blocks, `build_student(teacher, recipe)` - whose module names are not the teacher's, so no
        kohya file is written (A1111 / ComfyUI would put it onto the full model's blocks of the same index)."""
        path = os.path.join(self.run_dir, "lora.safetensors")
        meta = {**meta, "minisd.distill_train": "adapters",
                "minisd.train_config": json.dumps(self.cfg.public_dict(self.run_dir))}
        with atomic_path(path) as tmp:
            adapters.save_adapter(self.model, tmp, metadata=meta)
        return path


@torch.no_grad()
def merged_student(student: torch.nn.Module, cfg) -> UNetModel:
    """A plain UNet (no adapter layers, no hooks) holding the student with its adapters merged: W + ΔW in each
    adapted layer (`weight_delta`: multiplier · ΔW, e.g. LoRA's (α/r)·up@down; DoRA's rescaled W - W), every other
    tensor as it is. The trained student is left untouched (no merge / unmerge round-off)."""
    own = set(adapters.adapter_state_dict(student))
    sd = {k: v.detach().clone() for k, v in student.state_dict().items() if k not in own}
    for name, layer in adapters.adapter_layers(student):
        sd[name + ".weight"] = layer.weight + layer.weight_delta().to(layer.weight.dtype)
    with empty_weights():
        plain = UNetModel(cfg)
    plain.load_state_dict(sd, strict=True, assign=True)
    return plain.eval()
