"""Training steps of issue 20's method rows, built on training.py's recipe (frozen bf16 base, bf16 autocast, fp32 VAE
encode and the text encoder in the step, ε-MSE loss, fused torch AdamW lr 1e-4 unless said otherwise):

    ti            textual inversion of one new token (one vector per text encoder), the rest frozen.
                  minisd: the product's own mechanism (minisd/train/textual_inversion.py): the token table grows by
                  one frozen row (`adapters.embeddings._extend_embedding`) and a forward hook (`_splice`) puts the
                  fp32 trainable vector at the new id's positions; the optimizer sees only that vector.
                  diffusers (examples/textual_inversion/textual_inversion.py): `resize_token_embeddings(+1)`, the
                  whole token table trains (its text encoder stays fp32, the UNet / VAE in the weight dtype), and
                  after each step every row but the new one is written back from a copy.
                  The prompt's 6th token is the new id; gradients flow through the frozen text encoder.
    dreambooth    LoRA (training.py's adapter) + prior preservation, λ = 1: every step sees B instance and B class
                  images (images/s counts both: 2B per step). Both sides as their trainers do it: instance and class
                  rows laid end to end, one forward of the 2B batch, the prediction chunked in two,
                  L = L_inst + λ·L_prior, one backward (minisd/train/dreambooth.py; diffusers'
                  train_dreambooth_lora.py --with_prior_preservation). --cuda-graph (minisd) records that step with
                  `minisd.perf.graphs.CudaGraph` as for the other rows (train.py --cuda-graph --class-prompt does it
                  too); the rows' index lives on the device, so the recording copies nothing from the host.
    hypernetwork  minisd only (no diffusers trainer): A1111's hypernetwork on the cross-attention width,
                  layer structure 1-2-1, linear, no dropout (minisd/adapters/hypernetwork.py `attach`); the MLPs in
                  fp32 are the only trainable tensors.
    distill       minisd only (minisd/train/distill.py, BK-SDM): recipe "small" / "tiny": the student (built from
                  the teacher by `build_student`, fp32 master weights, every weight trains) against the frozen bf16
                  teacher: L = L_task + ‖ε_S − ε_T‖² + Σ_l ‖f_S^l − f_T^l‖² (weights 1 / 1, `FeatureHooks` over
                  the plan's matched blocks), teacher forward without grad. Recipe "teacher": the teacher's own full
                  fine-tune (task loss) with the same optimizer: the step time the students are compared with.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.harness import Options, Workload
from bench.models import building
from bench.training import DiffusersTrain, MinisdTrain

PRIOR_WEIGHT = 1.0
TI_POSITION = 5          # the new token's position in every prompt


def _take(cond, sel):
    ctx, pooled = cond
    return ctx[sel], None if pooled is None else pooled[sel]


class _NewToken:
    """Both sides of TI: the prompts carry the new id (the first id after each table)."""
    text_grad = True

    def make_inputs(self):
        super().make_inputs()
        self.ids[:, TI_POSITION] = self.new_id


class MinisdTI(_NewToken, MinisdTrain):
    def trainable(self) -> list:
        from minisd.adapters.embeddings import _extend_embedding
        from minisd.train.textual_inversion import _splice
        params = []
        for te in self.parts.text_encoders:
            emb = te.text_model.embeddings.token_embedding
            self.new_id = emb.weight.shape[0]
            init = emb.weight.detach()[[self.new_id - 1]].float()                    # (1, D)
            _extend_embedding(te, init, [self.new_id])
            vec = nn.Parameter(init.clone())                                          # (1, D) fp32, trainable
            te.text_model.embeddings.token_embedding.register_forward_hook(_splice(vec, self.new_id, 1))
            params.append(vec)
        return params


class DiffusersTI(_NewToken, DiffusersTrain):
    text_dtype = torch.float32   # textual_inversion.py casts only the UNet and VAE to the weight dtype

    def trainable(self) -> list:
        self.tables = []
        for te in self.parts.text_encoders:
            self.new_id = te.get_input_embeddings().weight.shape[0]
            te.resize_token_embeddings(self.new_id + 1, mean_resizing=False)   # the script overwrites the row
            w = te.get_input_embeddings().weight.requires_grad_(True)                # (V + 1, D)
            keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            keep[self.new_id] = False
            self.tables.append((w, w.detach().clone(), keep))
        return [w for w, _, _ in self.tables]

    def step(self, n=None, replay=True):
        loss = super().step(n, replay)
        with torch.no_grad():   # "Let's make sure we don't update any embedding weights besides the newly added"
            for w, orig, keep in self.tables:
                w[keep] = orig[keep]
        return loss


class _Prior:
    """DreamBooth's doubled batch: rows 0..B-1 instance images, B..2B-1 class images."""

    def make_inputs(self):
        b = self.B
        self.B = 2 * b
        try:
            super().make_inputs()
        finally:
            self.B = b
        self.row_index = {}
        self.rows(b)

    def rows(self, n: int) -> torch.Tensor:
        """The rows of a step on n images of each kind, on the device: instance 0..n-1, then class B..B+n-1. Made
        once per n, eagerly: a copy from the host inside a CUDA graph recording would synchronise the stream (an
        error while capturing) and replay a stale host buffer."""
        if n not in self.row_index:
            self.row_index[n] = torch.cat([torch.arange(n), torch.arange(self.B, self.B + n)]).to(self.device)
        return self.row_index[n]

    def workload(self) -> Workload:
        wl = super().workload()
        wl.images = 2 * self.B
        wl.info["class_images_per_step"] = self.B
        return wl

    def forward_backward(self, n: int) -> torch.Tensor:
        """Both sides as their trainers do it (minisd/train/dreambooth.py since 2026-12-06, diffusers' DreamBooth
        script): instance and class rows laid end to end, one UNet call of 2n rows, the two losses from its halves."""
        z0, cond = self.inputs(self.rows(n))                               # (2n, 4, h, h)
        t = torch.randint(0, 1000, (2 * n,), device=self.device)
        noise = torch.randn_like(z0)
        zt = self.add_noise(z0, noise, t).contiguous(memory_format=self.memory_format)
        with self.autocast():
            pred = self.unet_forward(zt, t, cond)
        pred_i, pred_c = pred.float().chunk(2)
        noise_i, noise_c = noise.float().chunk(2)
        loss = F.mse_loss(pred_i, noise_i) + PRIOR_WEIGHT * F.mse_loss(pred_c, noise_c)
        loss.backward()
        return loss.detach()


class MinisdDreamBooth(_Prior, MinisdTrain):
    pass


class DiffusersDreamBooth(_Prior, DiffusersTrain):
    pass


class MinisdHypernetwork(MinisdTrain):
    def trainable(self) -> list:
        from minisd.adapters.hypernetwork import Hypernetwork, attach
        unet = self.parts.unet
        torch.manual_seed(0)
        with building(self.device, torch.float32):   # built where it runs, fp32
            self.hn = Hypernetwork([self.cfg.unet.context_dim], (1, 2, 1), "linear", "Normal")
        self.hooked = attach(unet, self.hn)
        return [p.requires_grad_(True) for p in self.hn.parameters()]

    def workload(self) -> Workload:
        wl = super().workload()
        wl.info["hooked_attention_layers"] = len(self.hooked)
        return wl


class MinisdDistill(MinisdTrain):
    """The teacher is built in bf16 (recipe "teacher": fp32, it trains); `trainable` swaps the fp32 student in as
    `parts.unet` (what TrainStep checkpoints, compiles and steps) and keeps the frozen teacher beside it."""

    def unet_dtype(self) -> torch.dtype:
        return torch.float32 if self.case.recipe == "teacher" else torch.bfloat16   # a student's teacher: frozen

    def trainable(self) -> list:
        teacher = self.parts.unet
        self.teacher, self.hooks = None, None
        if self.case.recipe == "teacher":
            return [p.requires_grad_(True) for p in teacher.parameters()]
        from minisd.train.distill import FeatureHooks, build_student
        student, plan = build_student(teacher, self.case.recipe)      # fp32 copies of the kept blocks, on the CPU
        if self.device.type != "cpu":
            student.to(self.device)
        self.teacher = teacher.eval().requires_grad_(False)
        self.parts.unet = student
        self.hooks = FeatureHooks(self.teacher, student, plan.features)
        self.teacher_params = sum(p.numel() for p in teacher.parameters())
        return [p.requires_grad_(True) for p in student.parameters()]

    def loss(self, z0, cond) -> torch.Tensor:
        if self.teacher is None:
            return super().loss(z0, cond)
        n = len(z0)
        t = torch.randint(0, 1000, (n,), device=self.device)
        noise = torch.randn_like(z0)
        zt = self.add_noise(z0, noise, t).contiguous(memory_format=self.memory_format)
        with self.autocast():
            with torch.no_grad():
                pred_t = self.unet_forward(zt, t, cond, self.teacher)           # (n, 4, h, h)
            pred = self.unet_forward(zt, t, cond)
        h = self.hooks
        feature = sum(F.mse_loss(h.student[s].float(), h.teacher[tn].float()) for tn, s in h.pairs)
        return (F.mse_loss(pred.float(), noise.float()) + F.mse_loss(pred.float(), pred_t.float())
                + feature)

    def unet_forward(self, zt, t, cond, unet=None):
        if unet is None:
            return super().unet_forward(zt, t, cond)
        keep, self.unet = self.unet, unet
        try:
            return super().unet_forward(zt, t, cond)
        finally:
            self.unet = keep

    def workload(self) -> Workload:
        wl = super().workload()
        wl.info["recipe"] = self.case.recipe
        if self.teacher is not None:
            wl.info["teacher_params"] = self.teacher_params
        return wl


CLASSES = {("ti", "minisd"): MinisdTI, ("ti", "diffusers"): DiffusersTI,
           ("dreambooth", "minisd"): MinisdDreamBooth, ("dreambooth", "diffusers"): DiffusersDreamBooth,
           ("hypernetwork", "minisd"): MinisdHypernetwork, ("distill", "minisd"): MinisdDistill}


def build_method(case, impl: str, tiny: bool, device: torch.device, opts: Options) -> Workload:
    cls = CLASSES.get((case.method, impl))
    if cls is None:
        raise ValueError(f"no {impl} step for method {case.method!r}")
    return cls(case, impl, tiny, device, opts).workload()
