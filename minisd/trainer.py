"""The fine-tuning loop: adapters (LoRA, DoRA, LoHa, LoKr) trained on a frozen Stable Diffusion.

What is frozen, and why. The VAE is frozen and run in fp32 without gradients: it only maps images to the latent
space the UNet was trained in, and changing it would move that space under the UNet (the SDXL VAE also overflows
in fp16). The base weights of the UNet and the text encoder(s) are frozen: only the small adapter matrices beside
them train, so the optimizer state is tiny, the file is a few MB, and the base model is untouched (the adapter can
be removed, scaled or mixed). Text-encoder adapters are optional, with their own learning rate, because the text
encoder overfits faster than the UNet.

One optimizer step, with grad_accum micro-batches of B images each (Ho et al. 2020, Eq. 14, plus the usual recipe):

    z_0 = VAE.encode(x).sample() · scale_factor                 fp32, no grad (--cache-latents: encode once, cache.py)
    t ~ U{0..T−1},  ε ~ N(0, I) (+ noise_offset · N(0, I) per channel: lets the model shift the mean brightness)
    z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε                                 `NoiseSchedule.q_sample` (ε + γ·ξ: `Trainer.noised`)
    target = ε (eps models) or v = √ᾱ_t·ε − √(1−ᾱ_t)·z_0 (v models)
    L = mean_b w_b · ‖UNet(z_t, t, c) − target‖² / (C·h·w)
    w_b = min(SNR_t, γ)/SNR_t (eps) or min(SNR_t, γ)/(SNR_t + 1) (v): Min-SNR-γ, Hang et al. 2023, Eq. 9-10

All randomness of a step (t, ε, the VAE sample) comes from one CPU generator whose state is checkpointed with
the torch / CUDA / numpy / python RNG states, the optimizer, the LR schedule, the grad scaler and the data
position (and the EMA shadow, minisd/ema.py); resuming then continues the exact loss sequence of an uninterrupted
run (bitwise on the CPU). Validation grids (minisd/validation.py) restore every RNG they touch, so they change nothing.

Shapes: B = batch, C = latent channels, h, w = latent size, T = 77 tokens, D = text width.
"""
from __future__ import annotations

import json
import math
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import adapters
from .train.adamw8bit import AdamW8bit
from .train.buckets import BucketLoader, assign_buckets, buckets_for
from .train.cache import build_caches, offload_cached
from .train.data import CaptionDataset, Loader
from .train.ema import EMA
from .formats import load_model, load_vae
from .perf.graphs import CudaGraph
from .train.prodigy import Prodigy
from .perf.profiler import StageTimer
from .schedule import NoiseSchedule
from .train.config import TrainConfig
from .unet import sdxl_vector_cond
from .vae import DiagonalGaussian
from .train.validation import validate, validation_prompts

# UNet layer presets, as regular expressions over the official module paths
ATTN = [r".*attn[12]\.to_(q|k|v)", r".*attn[12]\.to_out\.0"]
ATTN_MLP = ATTN + [r".*ff\.net\.0\.proj", r".*ff\.net\.2", r".*\.proj_in", r".*\.proj_out"]
FULL = ATTN_MLP + [r".*\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)",  # ResBlock layers
                   r"input_blocks\.\d+\.0\.op", r"output_blocks\.\d+\.\d+\.conv"]       # down / up-sampling convs
TARGETS = {"attn": ATTN, "attn-mlp": ATTN_MLP, "full": FULL}
# text encoder: every linear layer of the CLIP transformer (kohya's default)
TE_TARGETS = [r".*self_attn\.(q|k|v|out)_proj", r".*mlp\.fc(1|2)"]

MEMORY_HINT = ("out of memory. Flags that save memory: --gradient-checkpointing, --mixed-precision bf16 "
               "(fp16 on GPUs without bf16), --optimizer adamw8bit, --batch-size 1 with --grad-accum N, "
               "--no-train-text-encoder, a lower --rank or --targets attn, a lower --resolution")


class TrainError(Exception):
    """A run that cannot go on (NaN loss, out of memory, bad resume folder); one-line message."""


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


def compile_for_training(model, encoder: bool = True, mode: str = "default") -> None:
    """--compile: each UNet block through torch.compile (`UNetModel.compile_blocks`) and, when images are encoded in
    the step, the VAE encoder as one graph. Inductor fuses GroupNorm + SiLU, residual adds and dtype casts into a
    few kernels around the convolutions and matmuls, picks the convolutions' memory layout itself (fewer NCHW <->
    NHWC copies around cuDNN), and its partitioner recomputes fused elementwise results in backward instead of
    storing them (less activation memory). Same arithmetic up to rounding order. Every block and input shape
    compiles at its first call, so the first steps are slow (minutes on a GPU box). Measured on an H100 with
    --cuda-graph (bench/NOTES.md): SD1.5 LoRA bs8 141.8 -> 96.4 ms per step; SDXL LoRA 1024 bs1 154 -> 99.7 ms
    and 14.65 -> 11.89 GiB reserved."""
    model.unet.compile_blocks(mode)
    if encoder:  # forward only (no grad), one fixed image shape
        model.vae.encoder.compile(mode=mode, dynamic=False)


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


def rng_state(gen: torch.Generator) -> dict:
    """Every RNG a step may touch (tensors and ints only, so torch.load(weights_only=True) reads it)."""
    np_state = np.random.get_state()
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(gen: torch.Generator, s: dict) -> None:
    gen.set_state(s["gen"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


class Trainer:
    """Builds everything from a TrainConfig; `run()` trains to max_steps and writes the outputs to run_dir."""

    def __init__(self, cfg: TrainConfig, run_dir: str, log=print):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        if cfg.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, not {self.device.type}")
        os.makedirs(run_dir, exist_ok=True)
        if self.device.type == "cpu":
            # Adam's second moments of tiny LoRA gradients can become subnormal floats, which x86 CPUs compute
            # many times slower; flushing them to zero changes nothing that matters
            torch.set_flush_denormal(True)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.model = load_model(cfg.model)
        m = self.model
        vae_info = load_vae(m, cfg.vae) if cfg.vae else {}  # e.g. sdxl-vae-fp16-fix; same shapes or a ModelError
        m.requires_grad_(False)  # freeze everything; adapters below are the only trainable tensors
        # Stored weights may be fp16 (minisd-tiny is). The frozen UNet / text encoders run in the autocast dtype
        # (half the memory) or fp32. The VAE encodes in fp32 by default; --vae-dtype bf16 (or auto under bf16
        # autocast) is safe too - bf16 has fp32's exponent range, so the SDXL VAE cannot overflow as it does in fp16
        # (NaN latents) - and much faster on a GPU, where the fp32 encoder can cost more than the UNet step.
        for part in [m.unet, *m.text_encoders]:
            part.to(self.amp_dtype or torch.float32)
        vae_dtype = cfg.vae_dtype if cfg.vae_dtype != "auto" else "bf16" if cfg.mixed_precision == "bf16" else "fp32"
        self.vae_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[vae_dtype]
        m.vae.to(self.vae_dtype)
        m.vae.slicing, m.vae.tiling = cfg.vae_slicing, cfg.vae_tiling
        if cfg.vae_dtype == "fp16" and not vae_info.get("fp16_safe", m.cfg.vae.force_upcast is False):
            log("warning: --vae-dtype fp16 with a VAE not known to be fp16-safe: expect NaN latents (the SDXL VAE "
                "overflows); use bf16, or an fp16-fix VAE via --vae")
        if vae_info.get("scale_factor") and abs(vae_info["scale_factor"] - m.cfg.vae.scale_factor) > 1e-6:
            log(f"note: --vae says scale_factor {vae_info['scale_factor']}, the model's {m.cfg.vae.scale_factor} "
                "is kept (the UNet was trained with it)")
        torch.manual_seed(cfg.seed)  # adapter init (load_model may have seeded the global RNG itself)
        # 3x3 convs (only "full" targets them): --conv-rank / --conv-alpha, default --rank / --alpha; 0 skips them
        conv_rank = (cfg.rank if cfg.conv_rank is None else cfg.conv_rank or None) if cfg.targets == "full" else None
        conv_alpha = cfg.alpha if cfg.conv_alpha is None else cfg.conv_alpha
        opts = dict(rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
        if cfg.network in ("lora", "dora"):  # LoHa / LoKr have no input dropout, and `init` means else there
            opts.update(init=cfg.init, dropout=cfg.dropout)
        self.unet_layers = adapters.inject(m.unet, cfg.network, TARGETS[cfg.targets], rank=cfg.rank,
                                           alpha=cfg.alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, **opts)
        self.te_layers = []
        if cfg.train_text_encoder:
            for te in m.text_encoders:
                self.te_layers += adapters.inject(te, cfg.network, TE_TARGETS, rank=cfg.rank, alpha=cfg.alpha,
                                                  **opts)
        m.to(self.device)
        m.unet.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.compile:  # compiled lazily, at the first call of each block and shape
            compile_for_training(m, encoder=not cfg.cache_latents)
        unet_params = adapters.adapter_parameters(m.unet)
        te_params = [p for te in m.text_encoders for p in adapters.adapter_parameters(te)]
        for p in unet_params + te_params:  # trainable tensors stay fp32 whatever the autocast dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        self.params = unet_params + te_params
        groups = [{"params": unet_params, "lr": cfg.lr}]
        te_lr = cfg.lr if cfg.te_lr is None else cfg.te_lr
        for i, te in enumerate(m.text_encoders):  # a group per encoder: SDXL's two may differ (--te1-lr, --te2-lr)
            own = (cfg.te1_lr, cfg.te2_lr)[i] if i < 2 else None
            if adapters.adapter_parameters(te):
                groups.append({"params": adapters.adapter_parameters(te), "lr": te_lr if own is None else own})
        if cfg.optimizer == "adamw":
            # fused: one kernel for every tensor on CUDA instead of a dozen per tensor
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         fused=self.device.type == "cuda")
        elif cfg.optimizer == "adamw8bit":
            self.opt = AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = Prodigy(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")

        sch = m.cfg.schedule
        if cfg.prediction != "auto":
            sch = type(sch)(**{**sch.__dict__, "prediction_type": cfg.prediction})
        self.noise = NoiseSchedule(sch, zero_terminal_snr=cfg.zero_terminal_snr)
        self.resolution = cfg.resolution or m.cfg.resolution
        self.data = CaptionDataset(cfg.data, self.resolution, cfg.repeats, cfg.random_crop, cfg.flip,
                                   cfg.caption_dropout, cfg.seed)
        if cfg.buckets:  # aspect-ratio buckets (buckets.py): each image at the shape nearest its own
            assign_buckets(self.data, buckets_for(m, self.resolution, cfg.bucket_step, cfg.bucket_min,
                                                  cfg.bucket_max))
            self.loader = BucketLoader(self.data, cfg.batch_size)
        else:
            self.loader = Loader(self.data, cfg.batch_size)
        # --cache-latents / --cache-text (cache.py): the frozen VAE / text encoders run once, here, not every step
        self.latent_cache, self.text_cache = build_caches(self)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.losses = 0, []
        self.prof = StageTimer(cfg.profile, self.device)  # --profile; no-op contexts otherwise
        self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.val_prompts = validation_prompts(cfg) if cfg.validate_every else []  # bad prompts fail now, not later
        # --cuda-graph: forward + backward of a micro-batch replayed from one recording
        self.graph = CudaGraph(self.graphed_backward, warmup=2) if cfg.cuda_graph else None

    def eval_weights(self):
        """Context in which the adapters hold the weights to judge and ship: the EMA ones if on, else the raw."""
        return self.ema.applied() if self.ema else nullcontext()

    # ------------------------------------------------------------------------------------------- one step
    def encode_text(self, captions: list[str]):
        """Captions -> (context (B, T, D), pooled (B, P) or None); with grad only if the TE has adapters."""
        return self.encode_ids([tok(captions).to(self.device) for tok in self.model.tokenizers])

    def encode_ids(self, ids: list[torch.Tensor]):
        """Token ids of each encoder [(B, T), ...] -> (context (B, T, D), pooled (B, P) or None)."""
        hidden, pooled = [], None
        with torch.set_grad_enabled(bool(self.te_layers)):
            for x, te in zip(ids, self.model.text_encoders):
                out = te(x)
                h, p = out if isinstance(out, tuple) else (out, None)
                pooled = p if p is not None else pooled       # SDXL: pooled of the last encoder
                hidden.append(h)
        return torch.cat(hidden, dim=-1), pooled               # (B, T, D)

    def micro_loss(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (no backward): `micro_forward(*micro_inputs(batch))`."""
        return self.micro_forward(*self.micro_inputs(batch))

    def micro_inputs(self, batch: dict) -> tuple:
        """Everything a micro-batch step reads, made on the host, every draw from self.gen in a fixed order:

            source    (B, 3, H, W) pixels in the VAE dtype, or the cached posterior moments (B, 2C, h, w)
            eps_z     (B, C, h, w) the posterior sample's noise: z_0 = μ + σ·ε_z
            t, noise, noise_in   `draw_noise`: (B,), (B, C, h, w), (B, C, h, w)
            text      token ids of each encoder [(B, T), ...], or the cached (context (B, T, D), pooled (B, P))
            time_ids  (B, 6) SDXL micro-conditioning, else None
            snr_w     (B,) Min-SNR-γ weights, else None

        Only tensors, so that `micro_forward` is a pure function of them: what --cuda-graph records (graphs.py)."""
        m, cfg, gen = self.model, self.cfg, self.gen
        if self.latent_cache is not None:
            source = self.latent_cache.moments_of(batch["indices"], batch["flips"])     # (B, 2C, h, w)
            B, C, h, w = source.shape[0], source.shape[1] // 2, *source.shape[2:]
        else:
            source = batch["pixels"].to(self.vae_dtype)                                  # (B, 3, H, W) in [-1, 1]
            f = m.vae_scale
            B, C, h, w = source.shape[0], m.cfg.vae.embed_dim, source.shape[2] // f, source.shape[3] // f
        eps_z = torch.randn((B, C, h, w), generator=gen, dtype=source.dtype)            # as DiagonalGaussian.sample
        t, noise, noise_in = self.draw_noise((B, C, h, w))
        if self.text_cache is not None:  # cached; a dropped caption reads the cached "" embedding
            text = self.text_cache.lookup(batch["indices"], batch["dropped"], "cpu")
        else:
            text = tuple(tok(batch["captions"]) for tok in self.model.tokenizers)
        time_ids = None
        if m.cfg.unet.adm_in_channels:
            # SDXL micro-conditioning from the real data: (orig h, w, crop top, left, target h, w)
            time_ids = torch.tensor([[h_, w_, top, left, th, tw] for (h_, w_), (top, left), (th, tw)
                                     in zip(batch["original_sizes"], batch["crops"], batch["target_sizes"])],
                                    dtype=torch.float32)
        snr_w = None
        if cfg.min_snr_gamma > 0:
            snr_w = min_snr_weight(self.noise.snr(t), cfg.min_snr_gamma, self.noise.prediction_type)
        return source, eps_z, t, noise, noise_in, text, time_ids, snr_w

    def micro_forward(self, source, eps_z, t, noise, noise_in, text, time_ids, snr_w,
                      prof: StageTimer | None = None) -> torch.Tensor:
        """The device side of a micro-batch: latents, noising, text states, UNet, loss (see the module docstring).
        No host synchronisation and no randomness of its own (dropout aside), so it can be recorded."""
        m, cfg, dev = self.model, self.cfg, self.device
        prof = prof or self.prof
        # the frozen VAE (fp32 unless --vae-dtype): latents are data, not something to train
        with torch.no_grad(), prof.stage("vae_encode"):
            source = source.to(dev)
            posterior = (DiagonalGaussian(source) if self.latent_cache is not None
                         else m.vae.encode(source))
            z0 = (posterior.mean + posterior.std * eps_z.to(dev)).float() * m.cfg.vae.scale_factor  # (B, C, h, w)
        t_dev = t.to(dev)
        zt, target = self.apply_noise(z0, t_dev, noise, noise_in)
        amp = (torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
        with amp:
            with prof.stage("text_encoders"):
                if self.text_cache is not None:
                    ctx, pooled = (None if x is None else x.to(dev) for x in text)
                else:
                    ctx, pooled = self.encode_ids([ids.to(dev) for ids in text])
            y = None
            if time_ids is not None:
                y = sdxl_vector_cond(pooled.float(), time_ids.to(dev), embed_dim=m.cfg.unet.addition_time_embed_dim)
            with prof.stage("unet_forward"):
                pred = m.unet(zt, t_dev, ctx, y=y)                                          # (B, C, h, w)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if snr_w is not None:
            per = per * snr_w.to(per)
        return per.mean()

    def graphed_backward(self, *inputs) -> torch.Tensor:
        """micro_forward + backward, the function --cuda-graph records: gradients accumulate in place into the
        adapters' .grad (kept allocated: zero_grad(set_to_none=False)). Returns the loss."""
        loss = self.micro_forward(*inputs, prof=StageTimer(False, self.device))  # no timers inside a recording
        (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def draw_noise(self, shape: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, ε, ε_in) for latents of `shape` (B, C, h, w), drawn from self.gen (CPU) in a fixed order:
        t ~ U{0..T−1}; ε ~ N(0, I) (+ noise_offset · N(0, I) per (sample, channel)); ε_in = ε + γ·ξ, ξ ~ N(0, I)."""
        cfg, gen, B = self.cfg, self.gen, shape[0]
        t = torch.randint(0, self.noise.num_train_timesteps, (B,), generator=gen)
        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:  # one extra offset per (sample, channel): Guttenberg 2023, "diffusion with offset noise"
            noise = noise + cfg.noise_offset * torch.randn((B, shape[1], 1, 1), generator=gen)
        noise_in = noise
        if cfg.input_perturbation:
            noise_in = noise + cfg.input_perturbation * torch.randn(shape, generator=gen)
        return t, noise, noise_in

    def apply_noise(self, z0: torch.Tensor, t_dev: torch.Tensor, noise: torch.Tensor, noise_in: torch.Tensor):
        """(z_t, target) = (√ᾱ_t·z_0 + √(1−ᾱ_t)·ε_in, ε or v from the unperturbed ε)."""
        zt = self.noise.q_sample(z0, noise_in.to(z0.device), t_dev)
        target = self.noise.training_target(z0, noise.to(z0.device), t_dev)
        return zt, target

    def noised(self, z0: torch.Tensor):
        """(z_t, t, target) for clean latents z0 (B, C, h, w), every draw from self.gen (CPU) in a fixed order:

            t ~ U{0..T−1},  ε ~ N(0, I)  (+ noise_offset · N(0, I) per (sample, channel))
            z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·(ε + γ·ξ),   ξ ~ N(0, I),  γ = --input-perturbation
            target = ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·z_0 (v models), both from the unperturbed ε

        Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models", DDPM-IP):
        when sampling, the network sees its own slightly wrong x_t, never an exact q_sample as in training (exposure
        bias); training on inputs moved by √(1−ᾱ_t)·γ·ξ while still asking for ε simulates that gap. γ = 0 draws no ξ,
        so the random stream is exactly that of a run without the option."""
        t, noise, noise_in = self.draw_noise(tuple(z0.shape))
        zt, target = self.apply_noise(z0, t.to(z0.device), noise, noise_in)
        return zt, t, target

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            with self.prof.stage("data"):
                batch = self.loader.next_batch()
            if self.graph is not None:  # forward and backward replayed from the recording
                inputs = self.micro_inputs(batch)
                with self.prof.stage("forward_backward_graph"):
                    loss = self.graph(*inputs)
            else:
                loss = self.micro_loss(batch)
            if not torch.isfinite(loss):
                raise TrainError(f"loss is {loss.item()} at step {self.step + 1}: lower --lr, use --mixed-precision "
                                 "bf16 or no instead of fp16, or check the data (run stopped, no step taken)")
            if self.graph is None:
                with self.prof.stage("backward"):
                    self.scaler.scale(loss / self.cfg.grad_accum).backward()
            total += loss.item() / self.cfg.grad_accum
        with self.prof.stage("optimizer"):  # clipping, the update, EMA, zeroing, the LR schedule
            if self.cfg.max_grad_norm > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema:
                self.ema.update()
            # a recording accumulates into the .grad tensors it saw: zero them in place, never drop them
            self.opt.zero_grad(set_to_none=self.graph is None)
            self.sched.step()
        self.step += 1
        return total

    # ------------------------------------------------------------------------------------------- checkpoints
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly, written to a temporary file and renamed (atomic)."""
        state = {"step": self.step, "losses": self.losses, "adapter": adapters.adapter_state_dict(self.model),
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict(), "loader": self.loader.state_dict(), "rng": rng_state(self.gen)}
        if self.ema:
            state["ema"] = self.ema.state_dict()
        tmp = self.ckpt_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)  # a kill mid-write leaves the previous checkpoint intact

    def write_loss_log(self) -> None:
        """loss.jsonl rewritten from self.losses: at the start of `run` (a resumed run's file is cut back to its
        checkpoint's step, so it ends up equal to the uninterrupted run's) and at the end; `append_loss` in between."""
        tmp = os.path.join(self.run_dir, "loss.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.losses)
        os.replace(tmp, os.path.join(self.run_dir, "loss.jsonl"))

    def append_loss(self, record: dict) -> None:
        """One {"step", "loss", "lr"} line per optimizer step, on disk at once (closing the file flushes it)."""
        with open(os.path.join(self.run_dir, "loss.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def load_checkpoint(self) -> None:
        if not os.path.isfile(self.ckpt_path):
            raise TrainError(f"{self.run_dir}: no checkpoint.pt to resume from")
        s = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        adapters.load_adapter_state_dict(self.model, s["adapter"], inject=False)  # in place: optimizer refs hold
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        # the LR of the next step from *this* config's schedule (a resume may extend --max-steps)
        lam = lr_lambda(self.cfg)
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * lam(self.sched.last_epoch)
        self.scaler.load_state_dict(s["scaler"])
        self.loader.load_state_dict(s["loader"])
        set_rng_state(self.gen, s["rng"])
        self.step, self.losses = int(s["step"]), list(s["losses"])
        if self.ema and "ema" in s:
            self.ema.load_state_dict(s["ema"])
        elif self.ema:  # EMA switched on at this resume: average from the loaded weights on
            self.ema.reset()

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg = self.cfg
        n_train = sum(p.numel() for p in self.params)
        self.log(f"adapters: {cfg.network} rank {cfg.rank} alpha {cfg.alpha} on {len(self.unet_layers)} UNet layers"
                 f" ({cfg.targets}) + {len(self.te_layers)} text-encoder layers, {n_train:,} trainable parameters")
        self.log(self.data.summary())
        offload_cached(self)  # cached VAE / text encoders leave the GPU for the loop
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", disable=not cfg.progress)
        self.write_loss_log()
        try:
            while self.step < cfg.max_steps:
                with self.prof.step():
                    loss = self.train_step()
                self.losses.append({"step": self.step, "loss": loss, "lr": self.sched.get_last_lr()[0]})
                self.append_loss(self.losses[-1])
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    validate(self, self.val_prompts)
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
        except torch.OutOfMemoryError:
            raise TrainError(MEMORY_HINT) from None
        finally:
            bar.close()
        if cfg.profile:  # this process's steps only (a resumed run profiles what it trained)
            self.log(self.prof.table())
            self.prof.save(os.path.join(self.run_dir, "profile.json"))
        self.save_checkpoint()
        return self.write_outputs()

    def write_outputs(self) -> dict:
        """loss.jsonl, loss.png, the adapter file (minisd) and its kohya export."""
        from .formats.lora_files import save_kohya
        self.write_loss_log()
        draw_loss_curve([r["loss"] for r in self.losses], os.path.join(self.run_dir, "loss.png"))
        meta = {"minisd.train_config": json.dumps(self.cfg.to_dict()), "minisd.steps": str(self.step)}
        lora = os.path.join(self.run_dir, "lora.safetensors")
        kohya = os.path.join(self.run_dir, "lora_kohya.safetensors")
        out = {"lora": lora, "kohya": kohya, "losses": [r["loss"] for r in self.losses]}
        if self.ema:  # lora.safetensors and the kohya file hold the EMA weights, lora_raw.safetensors the raw ones
            out["lora_raw"] = os.path.join(self.run_dir, "lora_raw.safetensors")
            adapters.save_adapter(self.model, out["lora_raw"], metadata={**meta, "minisd.weights": "raw"})
            meta = {**meta, "minisd.weights": f"ema {self.cfg.ema_decay}"}
        with self.eval_weights():
            adapters.save_adapter(self.model, lora, metadata=meta)
            save_kohya(self.model, kohya, metadata={"ss_network_dim": str(self.cfg.rank),
                                                    "ss_network_alpha": str(self.cfg.alpha),
                                                    "ss_max_train_steps": str(self.step)})
        self.log(self.data.summary() if self.data.skipped else "data: no image was skipped")
        return out


def draw_loss_curve(losses: list[float], path: str, size=(640, 360)) -> None:
    """A loss-vs-step PNG with pillow: raw losses in grey, a 20-step running mean in blue."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 20, W - 20, H - 40
    d.rectangle([left, top, right, bottom], outline="black")
    if losses:
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-8
        x = lambda i: left + (right - left) * i / max(1, len(losses) - 1)
        y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
        if len(losses) > 1:
            d.line([(x(i), y(v)) for i, v in enumerate(losses)], fill=(170, 170, 170))
            k = max(1, min(20, len(losses) // 5))
            mean = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                    for i in range(len(losses))]
            d.line([(x(i), y(v)) for i, v in enumerate(mean)], fill=(30, 80, 220), width=2)
        d.text((4, top), f"{hi:.4f}", fill="black")
        d.text((4, bottom - 10), f"{lo:.4f}", fill="black")
    d.text((left, bottom + 8), f"step 1 ... {len(losses)}   (grey: loss, blue: running mean)", fill="black")
    img.save(path)

