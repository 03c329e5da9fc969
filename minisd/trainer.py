"""The training step: the loss of one micro-batch, for adapters (LoRA, DoRA, LoHa, LoKr) on a frozen Stable Diffusion.

What is frozen, and why. The VAE is frozen and run in fp32 without gradients: it only maps images to the latent
space the UNet was trained in, and changing it would move that space under the UNet (the SDXL VAE also overflows
in fp16). The base weights of the UNet and the text encoder(s) are frozen: only the small adapter matrices beside
them train, so the optimizer state is tiny, the file is a few MB, and the base model is untouched (the adapter can
be removed, scaled or mixed). Text-encoder adapters are optional, with their own learning rate, because the text
encoder overfits faster than the UNet.

The loss of B images (Ho et al. 2020, Eq. 14, plus the usual recipe), `training_loss` below, top to bottom:

    z_0 = VAE.encode(x).sample() · scale_factor                 fp32, no grad (--cache-latents: encoded once)
    t ~ U{0..T−1},  ε ~ N(0, I) (+ noise_offset · N(0, I) per channel: lets the model shift the mean brightness)
    z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·(ε + γ·ξ)                         `noised`; γ = --input-perturbation, usually 0
    target = ε (eps models) or v = √ᾱ_t·ε − √(1−ᾱ_t)·z_0 (v models)
    c = TextEncoders(caption)                                   context (B, T, D); SDXL: + pooled (B, P)
    L = mean_b w_b · ‖UNet(z_t, t, c) − target‖² / (C·h·w)
    w_b = min(SNR_t, γ)/SNR_t (eps; 1 at SNR 0) or min(SNR_t, γ)/(SNR_t + 1) (v): Min-SNR-γ, Hang et al. 2023, Eq. 9-10

An optimizer step backpropagates grad_accum such losses (each divided by grad_accum) into the adapters, clips the
gradient norm and steps the optimizer; the loop around the step - data, caches, adapters, optimizers, EMA, checkpoints,
logs, validation grids - is the appendix minisd/train/loop.py. The learning-rate schedule (`lr_lambda`) and the
layer presets the adapters go into (`TARGETS`) are here.

All randomness of a step (the VAE sample's ε_z, then t, ε, the offset, ξ) comes from one CPU generator (`Draws`)
in that order; its state is checkpointed, so a resumed run continues the exact loss sequence of an uninterrupted
one (bitwise on the CPU). --cuda-graph replays this same function from a recording: `StepGraph` in
minisd/perf/graphs.py makes the same draws on the host and hands them in.

Shapes: B = batch, C = latent channels, h, w = latent size, T = 77 tokens, D = text width, P = pooled width.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import StableDiffusion
from .schedule import NoiseSchedule
from .unet import sdxl_vector_cond
from .vae import DiagonalGaussian

# (`TrainConfig` in annotations: minisd/train/config.py, the flags; a chapter imports only chapters)

# UNet layer presets, as regular expressions over the official module paths
ATTN = [r".*attn[12]\.to_(q|k|v)", r".*attn[12]\.to_out\.0"]
ATTN_MLP = ATTN + [r".*ff\.net\.0\.proj", r".*ff\.net\.2", r".*\.proj_in", r".*\.proj_out"]
FULL = ATTN_MLP + [r".*\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)",  # ResBlock layers
                   r"input_blocks\.\d+\.0\.op", r"output_blocks\.\d+\.\d+\.conv"]       # down / up-sampling convs
ATTN1 = [r".*attn1\.to_(q|k|v)", r".*attn1\.to_out\.0"]  # self-attention only (image tokens attend to each other)
ATTN2 = [r".*attn2\.to_(q|k|v)", r".*attn2\.to_out\.0"]  # cross-attention only (image tokens attend to the text)
TARGETS = {"attn1": ATTN1, "attn2": ATTN2, "attn": ATTN, "attn-mlp": ATTN_MLP, "full": FULL}
# text encoder: every linear layer of the transformer (kohya's default): CLIP's, then LDMBert's (not to_logits: unused)
TE_TARGETS = [r".*self_attn\.(q|k|v|out)_proj", r".*mlp\.fc(1|2)",
              r".*attn_layers\.layers\.\d+\.1\.(to_(q|k|v|out)|net\.0\.0|net\.2)"]


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the base LR at optimizer step s: linear warmup, then constant / cosine / linear decay."""
    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        p = (s - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # progress in [0, 1]
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1 - p)
        return 1.0
    return f


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ weights per sample (Hang et al. 2023, Sec. 3.4 and 4.2). The paper weights the x_0-loss by
    min(SNR, γ); as ‖x_0 − x̂_0‖² = ‖ε − ε̂‖²/SNR = ‖v − v̂‖²/(SNR + 1), the loss the network has gets

        ε-prediction:  min(SNR, γ)/SNR        (= 1 for SNR ≤ γ, γ/SNR above)
        v-prediction:  min(SNR, γ)/(SNR + 1)

    SNR = 0, the last timestep under zero terminal SNR (Lin et al. 2024, Sec. 3.1), makes the ε form 0/0. We
    define it as its limit, 1 (the weight is 1 for every 0 < SNR ≤ γ, so 1 keeps it continuous in t; it is also
    min(1, γ/SNR) with γ/0 = +inf). This is what the authors' code does (Min-SNR-Diffusion-Training,
    gaussian_diffusion.py, `mse_loss_weight[snr == 0] = 1.0`), and kohya's first form min(γ/SNR, 1); diffusers'
    train_text_to_image.py and kohya's current `apply_snr_weight` divide and get NaN. That step is an ordinary
    unit-weight ε-loss, and a trivial one (x_T = ε: the target is the input), which is why Lin et al. (Sec. 3.2)
    pair zero terminal SNR with v-prediction. The v form is defined at SNR = 0 and keeps its value 0: there
    v = −x_0, so the v-loss is the x_0-loss, whose Min-SNR weight is min(0, γ) = 0, the limit of the steps
    beside it. (The authors' code sets 1 at SNR = 0 for v too, a jump at one timestep that the paper's weighting
    does not imply.) Where SNR > 0 the quotients are computed as written, so those weights keep their bits."""
    if prediction == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    # SNR = 0 (zero terminal SNR, t = T−1): the limit 1, not 0/0
    return torch.where(snr > 0, snr.clamp(max=gamma) / snr, torch.ones_like(snr))


# ----------------------------------------------------------------------------------------------- the step
class Draws:
    """The random numbers of a step, from one CPU generator in call order, then moved to `device`: the same seed
    gives the same numbers on any device, and the generator's state alone (checkpointed) says what comes next."""

    def __init__(self, gen: torch.Generator, device: torch.device | str = "cpu"):
        self.gen, self.device = gen, torch.device(device)

    def randint(self, high: int, shape: tuple) -> torch.Tensor:
        """Integers uniform in {0, ..., high − 1}."""
        return torch.randint(0, high, tuple(shape), generator=self.gen).to(self.device)

    def randn(self, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Samples of N(0, 1)."""
        return torch.randn(tuple(shape), generator=self.gen, dtype=dtype).to(self.device)


@dataclass
class MicroBatch:
    """What a step reads, on the training device (`Trainer.micro_batch` in minisd/train/loop.py makes it from the
    data loader's batch): the images or their cached VAE posterior, and the captions' token ids or their cached
    text-encoder outputs."""
    pixels: torch.Tensor | None = None     # (B, 3, H, W) in [-1, 1], in the VAE's dtype
    moments: torch.Tensor | None = None    # (B, 2C, h, w) --cache-latents: mean and log-variance of q(z|x)
    ids: list | None = None                # [(B, T), ...] token ids for each text encoder
    context: torch.Tensor | None = None    # (B, T, D) --cache-text: the encoders' states (a dropped caption: "")
    pooled: torch.Tensor | None = None     # (B, P) --cache-text: the pooled vector, or None
    time_ids: torch.Tensor | None = None   # (B, 6) SDXL: original h, w, crop top, left, target h, w


def noised(noise: NoiseSchedule, z0: torch.Tensor, draw: Draws, offset: float = 0.0, perturbation: float = 0.0):
    """(z_t, t, target) for clean latents z_0 (B, C, h, w), drawing from `draw` in this order:

        t ~ U{0..T−1},  ε ~ N(0, I)  (+ offset · N(0, I) per (sample, channel))
        z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·(ε + γ·ξ),   ξ ~ N(0, I),  γ = perturbation
        target = ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·z_0 (v models), both from the unperturbed ε

    Offset noise (Guttenberg 2023, "Diffusion with offset noise"): i.i.d. noise barely touches an image's mean
    colour, so the model never learns to change it; an offset shared per channel lets it make darker or brighter
    images.
    Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models", DDPM-IP):
    when sampling, the network sees its own slightly wrong x_t, never an exact q_sample as in training (exposure
    bias); training on inputs moved by √(1−ᾱ_t)·γ·ξ while still asking for ε simulates that gap. γ = 0 draws no ξ,
    so the random stream is exactly that of a run without the option."""
    B, C = z0.shape[:2]
    t = draw.randint(noise.num_train_timesteps, (B,))                                    # (B,)
    eps = draw.randn(z0.shape)                                                           # (B, C, h, w)
    if offset:
        eps = eps + offset * draw.randn((B, C, 1, 1))
    eps_in = eps + perturbation * draw.randn(z0.shape) if perturbation else eps
    zt = noise.q_sample(z0, eps_in, t)                                                   # Eq. 4 of Ho et al.
    return zt, t, noise.training_target(z0, eps, t)


def no_stage(name: str):
    """The default `stage`: times nothing."""
    return nullcontext()


def training_loss(model: StableDiffusion, noise: NoiseSchedule, batch: MicroBatch, draw: Draws, *,
                  noise_offset: float = 0.0, input_perturbation: float = 0.0, min_snr_gamma: float = 0.0,
                  amp_dtype: torch.dtype | None = None, train_text_encoder: bool = False,
                  stage=no_stage) -> torch.Tensor:
    """The loss of one micro-batch, the equations of the module docstring in order (no backward). Every random
    number comes from `draw`; `stage(name)` marks the parts that --profile times (minisd/perf/profiler.py)."""
    zt, t, target = noised_latents(model, noise, batch, draw, noise_offset, input_perturbation, stage)
    return per_image_loss(model, noise, batch, zt, t, target, min_snr_gamma=min_snr_gamma, amp_dtype=amp_dtype,
                          train_text_encoder=train_text_encoder, stage=stage).mean()


def noised_latents(model: StableDiffusion, noise: NoiseSchedule, batch: MicroBatch, draw: Draws,
                   noise_offset: float = 0.0, input_perturbation: float = 0.0, stage=no_stage):
    """Steps 1-2 of `training_loss`, every draw of the micro-batch: (z_t, t, target), each (B, ...)."""
    # 1. clean latents z_0 = μ + σ·ε_z ~ q(z|x) from the frozen VAE: data, not something to train
    with torch.no_grad(), stage("vae_encode"):
        if batch.moments is not None:  # --cache-latents: the encoder ran once, before training (train/cache.py)
            x, posterior = batch.moments, DiagonalGaussian(batch.moments)
        else:
            x, posterior = batch.pixels, model.vae.encode(batch.pixels)
        eps_z = draw.randn(posterior.mean.shape, x.dtype)                  # as DiagonalGaussian.sample draws it
        z0 = (posterior.mean + posterior.std * eps_z).float() * model.cfg.vae.scale_factor       # (B, C, h, w)

    # 2. a random timestep per image, its noise, the noised latents and what the UNet should answer there
    return noised(noise, z0, draw, noise_offset, input_perturbation)


def per_image_loss(model: StableDiffusion, noise: NoiseSchedule, batch: MicroBatch, zt: torch.Tensor,
                   t: torch.Tensor, target: torch.Tensor, *, min_snr_gamma: float = 0.0,
                   amp_dtype: torch.dtype | None = None, train_text_encoder: bool = False,
                   stage=no_stage) -> torch.Tensor:
    """Steps 3-4 of `training_loss`: w_b · ‖UNet(z_t, t, c) − target‖² / (C·h·w) for each image, (B,), no draws.
    Rows are independent, so two micro-batches laid end to end (`cat_batches`) give each their own losses from one
    UNet call (DreamBooth's instance + class images, minisd/train/dreambooth.py)."""
    # 3. the prediction; the frozen base runs in the autocast dtype (bf16 / fp16) if there is one
    with torch.autocast(zt.device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        with stage("text_encoders"):
            if batch.context is not None:  # --cache-text
                ctx, pooled = batch.context, batch.pooled
            else:  # with gradients only when the text encoders carry adapters
                with torch.set_grad_enabled(train_text_encoder):
                    ctx, pooled = model.encode_text(batch.ids)                              # (B, T, D), (B, P)
        y = None
        if batch.time_ids is not None:  # SDXL: pooled text and image sizes, added to the time embedding
            y = sdxl_vector_cond(pooled.float(), batch.time_ids, embed_dim=model.cfg.unet.addition_time_embed_dim)
        with stage("unet_forward"):
            pred = model.unet(zt, t, ctx, y=y)                                                    # (B, C, h, w)

    # 4. the loss: squared error per image in fp32, each image weighted by Min-SNR-γ if asked
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))         # (B,)
    if min_snr_gamma > 0:
        # SNR_t = ᾱ_t/(1−ᾱ_t) as `noise.snr(t)` computes it, but ᾱ_t gathered on t's device from the schedule's
        # cached copy of the table (`noise.snr` indexes the CPU table: a GPU t would need a copy, which a CUDA
        # graph cannot record)
        ab = noise._at(noise.alphas_cumprod, t, per)                                             # (B,)
        per = per * min_snr_weight(ab / (1 - ab), min_snr_gamma, noise.prediction_type)
    return per


def cat_batches(a: MicroBatch, b: MicroBatch) -> MicroBatch:
    """The text-side fields of two micro-batches laid end to end, (B_a + B_b, ...): what `per_image_loss` reads
    (pixels and moments are consumed by `noised_latents` before)."""
    def cat(x, y):
        return None if x is None else torch.cat([x, y])
    ids = None if a.ids is None else [torch.cat([x, y]) for x, y in zip(a.ids, b.ids)]
    return MicroBatch(ids=ids, context=cat(a.context, b.context), pooled=cat(a.pooled, b.pooled),
                      time_ids=cat(a.time_ids, b.time_ids))
