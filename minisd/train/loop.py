"""The fine-tuning loop around the training step (minisd/trainer.py): `Trainer(cfg, run_dir).run()`.

It builds, in order, what a run needs (each a method below):

    build_model       the model, frozen, in the autocast dtype (the VAE in its own dtype)
    build_adapters    LoRA / DoRA / LoHa / LoKr layers in the UNet (and text encoders): the only trainable tensors
    build_optimizer   AdamW / 8-bit AdamW / Prodigy with a group per network, the LR schedule, the fp16 grad scaler
    build_data        the noise schedule, the captioned images and their loader (aspect-ratio buckets or not)
    build_caches      --cache-latents / --cache-text: the frozen VAE / text encoders run once (cache.py)

then `run()` takes optimizer steps until max_steps: grad_accum micro-batches, each `training_loss` + backward, then
clipping, the update, EMA (ema.py), the LR schedule; a loss.jsonl line per step, a validation grid every
--validate-every steps (validation.py), a checkpoint every --save-every steps. A checkpoint holds everything needed
to continue exactly: adapters, optimizer, LR schedule, grad scaler, data position, EMA shadow and every RNG
(rng.py), so a resumed run repeats the losses of an uninterrupted one (bitwise on the CPU; the checkpoint, loss.jsonl
and loss.png are run_state.py's); Ctrl-C or SIGTERM stops at a step boundary with one (signals.py). At the end:
lora.safetensors (minisd), lora_kohya.safetensors (A1111 / ComfyUI), loss.png.

--cuda-graph replays each micro-batch's forward and backward from one recording (minisd/perf/graphs.py `StepGraph`
wraps the same `training_loss`; DreamBooth's class batch is a second input); --profile times the stages of every step
(minisd/perf/profiler.py).

More than one GPU / small GPU (issue 19): under torchrun `self.dist` (distributed.py) shards the data, keys the noise
per sample, sums the gradients over the ranks after the backward and lets rank 0 alone write; --base-dtype int8 / fp8
stores the frozen base in 8 bits (minisd/perf/quant.py); --fused-backward steps buckets of tensors inside the backward
(fused.py).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext

import torch

from .. import adapters
from ..adapters.mix import load_into_adapters
from ..formats import load_model, load_vae
from ..formats.lora_read import read_adapter_file
from ..formats.safe_write import atomic_path
from ..perf.graphs import StepGraph
from ..perf.profiler import StageTimer
from ..schedule import NoiseSchedule
from ..perf.checkpoint import set_gradient_checkpointing
from ..perf.compile import compile_for_training
from ..perf.vae_memory import set_vae_memory
from ..perf.quant import quantize_frozen
from ..trainer import TE_TARGETS, Draws, MicroBatch, lr_lambda, noised, training_loss
from .adamw8bit import AdamW8bit
from .buckets import BucketLoader, assign_buckets, buckets_for
from .cache import build_caches, offload_cached
from .config import TrainConfig
from . import distributed
from .fused import FusedBackward, bucket_values
from .data import CaptionDataset, Loader
from .ema import EMA
from .hypernetwork import build_method
from .prodigy import Prodigy
from .run_state import RunState, TrainError, draw_loss_curve  # noqa: F401 (TrainError: train.py imports it from here)
from .targets import convs_targeted, unet_targets
# issue 17: full fine-tune, DreamBooth, held-out validation loss
from .dreambooth import PriorPreservation, apply_instance_prompt
from .full import build_full, format_budget, memory_budget, write_full_outputs
from .method_state import extend_record
from .val_loss import build_val_loss
from .signals import StopGuard
from .validation import validate, validation_prompts

MEMORY_HINT = ("out of memory. Flags that save memory: --gradient-checkpointing, --mixed-precision bf16 "
               "(fp16 on GPUs without bf16), --optimizer adamw8bit, --batch-size 1 with --grad-accum N, "
               "--no-train-text-encoder, a lower --rank or --targets attn, a lower --resolution")



class Trainer(RunState):
    """Builds everything from a TrainConfig; `run()` trains to max_steps and writes the outputs to run_dir.

    prompts: cfg -> the validation grid's prompts (default: --validation-prompts); train.py passes the embedded
    world's, which has held-out prompts of its own (minisd/world/validation.py)."""
    # what the methods of issue 17 set in the builders; none for a plain adapter run (or a distillation's student)
    method = None    # textual inversion / hypernetwork: the object that owns their tensors
    prior = None     # DreamBooth prior preservation (dreambooth.py)
    val_loss = None  # held-out validation loss (val_loss.py)

    def __init__(self, cfg: TrainConfig, run_dir: str, log=print, prompts=validation_prompts, model=None):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.preloaded = model  # train.py loads the model before it makes the run folder (a bad model leaves none)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        if cfg.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, not {self.device.type}")
        # torchrun: this rank's place and GPU (minisd/train/distributed.py); a plain process is rank 0 of 1
        self.dist = distributed.current()
        self.device = self.dist.device(self.device)
        if self.dist.world > 1 and (cfg.cuda_graph or cfg.fused_backward):
            raise ValueError("--cuda-graph and --fused-backward need one process (the gradient is all-reduced "
                             "after the backward)")
        os.makedirs(run_dir, exist_ok=True)
        if self.device.type == "cpu":
            # Adam's second moments of tiny LoRA gradients can become subnormal floats, which x86 CPUs compute
            # many times slower; flushing them to zero changes nothing that matters
            torch.set_flush_denormal(True)
        self.build_model()
        # DreamBooth (--class-prompt): class images drawn by the untouched base model, their loader (dreambooth.py)
        self.prior = PriorPreservation(self) if cfg.class_prompt else None
        self.build_adapters()
        self.build_optimizer()
        self.build_data()
        self.build_caches()
        self.dist.seed_dropout(cfg.seed)  # torchrun: adapter dropout masks differ per rank
        self.gen = torch.Generator().manual_seed(cfg.seed)  # every draw of a step (`Draws`)
        self.step, self.losses = 0, []
        self.prof = StageTimer(cfg.profile, self.device)  # --profile; no-op contexts otherwise
        self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.val_prompts = prompts(cfg) if cfg.validate_every else []  # bad prompts fail now, not later
        # the step's settings besides the model, the noise schedule, the batch and the draws
        self.step_options = dict(noise_offset=cfg.noise_offset, input_perturbation=cfg.input_perturbation,
                                 min_snr_gamma=cfg.min_snr_gamma, amp_dtype=self.amp_dtype,
                                 train_text_encoder=self.text_encoder_trains())  # adapters, full, TI
        # --cuda-graph: forward + backward of a micro-batch replayed from one recording
        self.graph = StepGraph(self.forward_backward, self.gen, self.device, warmup=2) if cfg.cuda_graph else None

    def text_encoder_trains(self) -> bool:
        """Gradients flow through the text encoder(s): their adapters, a full fine-tune's weights, TI's vectors."""
        return bool(self.cfg.train_text_encoder or (self.method and self.method.train_text_encoder))

    # ------------------------------------------------------------------------------------------- builders
    def build_model(self) -> None:
        """The model, every weight frozen; the UNet and text encoders in the autocast dtype, the VAE in its own."""
        cfg, log = self.cfg, self.log
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.model = self.preloaded if self.preloaded is not None else load_model(cfg.model)
        self.preloaded = None
        m = self.model
        if cfg.te2_lr is not None and len(m.text_encoders) < 2:  # no flag is a silent no-op
            raise ValueError(f"--te2-lr: {cfg.model} has one text encoder; its LR is --te-lr (or --te1-lr)")
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
        set_vae_memory(m.vae, slicing=cfg.vae_slicing, tiling=cfg.vae_tiling)
        if cfg.vae_dtype == "fp16" and not vae_info.get("fp16_safe", m.cfg.vae.force_upcast is False):
            log("warning: --vae-dtype fp16 with a VAE not known to be fp16-safe: expect NaN latents (the SDXL VAE "
                "overflows); use bf16, or an fp16-fix VAE via --vae")
        if vae_info.get("scale_factor") and abs(vae_info["scale_factor"] - m.cfg.vae.scale_factor) > 1e-6:
            log(f"note: --vae says scale_factor {vae_info['scale_factor']}, the model's {m.cfg.vae.scale_factor} "
                "is kept (the UNet was trained with it)")

    def build_adapters(self) -> None:
        """Adapter layers into the UNet (the `TARGETS` preset) and, with --train-text-encoder, the text encoders;
        the model on the device; their parameters, in fp32 whatever the autocast dtype, are `self.params`."""
        cfg, m = self.cfg, self.model
        self.method = None  # textual inversion / hypernetwork: the object that owns their tensors
        if cfg.method == "full":  # full fine-tune (full.py): the model's own weights train, no adapter layers
            return build_full(self)
        if cfg.method not in ("lora", "full"):  # issue 17: textual inversion / hypernetwork train their own tensors
            return self.build_method()
        torch.manual_seed(cfg.seed)  # adapter init (load_model may have seeded the global RNG itself)
        # 3x3 convs (only "full" targets them): --conv-rank / --conv-alpha, default --rank / --alpha; 0 skips them
        conv_rank = (cfg.rank if cfg.conv_rank is None else cfg.conv_rank or None) if convs_targeted(cfg) else None
        conv_alpha = cfg.alpha if cfg.conv_alpha is None else cfg.conv_alpha
        opts = dict(rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
        if cfg.network in ("lora", "dora"):  # LoHa / LoKr have no input dropout, and `init` means else there
            opts.update(init=cfg.init, dropout=cfg.dropout)
        self.unet_layers = adapters.inject(m.unet, cfg.network, *unet_targets(cfg, m.unet), rank=cfg.rank,
                                           alpha=cfg.alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, **opts)
        self.te_layers = []
        if cfg.train_text_encoder:
            for te in m.text_encoders:
                self.te_layers += adapters.inject(te, cfg.network, TE_TARGETS, rank=cfg.rank, alpha=cfg.alpha,
                                                  **opts)
        if cfg.init_adapter:  # continue from an existing adapter file (adapters/mix.py; kinds and ranks must match)
            n = load_into_adapters(m, read_adapter_file(m, cfg.init_adapter).modules, cfg.init_adapter)
            self.log(f"init-adapter: {n} of {len(self.unet_layers) + len(self.te_layers)} layers from "
                     f"{cfg.init_adapter}")
        if cfg.base_dtype != "auto":  # the frozen base in 8 bits, dequantised per forward (minisd/perf/quant.py)
            n = sum(len(quantize_frozen(part, cfg.base_dtype)) for part in [m.unet, *m.text_encoders])
            self.log(f"base-dtype: {n} frozen Linear / Conv layers stored as {cfg.base_dtype}")
        m.to(self.device)
        set_gradient_checkpointing(m.unet, cfg.gradient_checkpointing)
        if cfg.compile:  # compiled lazily, at the first call of each block and shape
            compile_for_training(m, encoder=not cfg.cache_latents)
        self.unet_params = adapters.adapter_parameters(m.unet)
        te_params = [p for te in m.text_encoders for p in adapters.adapter_parameters(te)]
        for p in self.unet_params + te_params:  # trainable tensors stay fp32 whatever the autocast dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        self.params = self.unet_params + te_params

    def build_method(self) -> None:
        """--method ti / hypernetwork (issue 17): no adapter layers; the model on the device, then the method's own
        trainable tensors (train/textual_inversion.py, train/hypernetwork.py) are `self.params`."""
        cfg, m = self.cfg, self.model
        self.unet_layers, self.te_layers = [], []
        m.to(self.device)
        set_gradient_checkpointing(m.unet, cfg.gradient_checkpointing)
        if cfg.compile:
            compile_for_training(m, encoder=not cfg.cache_latents)
        self.method = build_method(m, cfg, self.device)
        self.unet_params = self.params = self.method.params

    def build_optimizer(self) -> None:
        """The optimizer over a parameter group per network (own LRs: --te-lr, --te1-lr, --te2-lr), the LR schedule
        (`lr_lambda`) and the grad scaler (on only for fp16, whose small gradients would underflow)."""
        cfg, m = self.cfg, self.model
        groups = [{"params": self.unet_params, "lr": cfg.lr}]
        te_lr = cfg.lr if cfg.te_lr is None else cfg.te_lr
        for i, te in enumerate(m.text_encoders):  # a group per encoder: SDXL's two may differ (--te1-lr, --te2-lr)
            own = (cfg.te1_lr, cfg.te2_lr)[i] if i < 2 else None
            trained = adapters.adapter_parameters(te) or [p for p in te.parameters() if p.requires_grad]  # full
            if trained:
                groups.append({"params": trained, "lr": te_lr if own is None else own})
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
        # --fused-backward: buckets of tensors stepped inside the backward, their gradients freed (fused.py); the
        # loop's opt.step() then steps the last bucket, the only tensors with a gradient left
        self.fused = (FusedBackward(self.opt, self.params, bucket_values(cfg.fused_bucket_mb))
                      if cfg.fused_backward else None)

    def build_data(self) -> None:
        """The noise schedule (--prediction, --zero-terminal-snr), the dataset and its loader."""
        cfg, m = self.cfg, self.model
        sch = m.cfg.schedule
        if cfg.prediction != "auto":
            sch = type(sch)(**{**sch.__dict__, "prediction_type": cfg.prediction})
        self.noise = NoiseSchedule(sch, zero_terminal_snr=cfg.zero_terminal_snr)
        self.resolution = cfg.resolution or m.cfg.resolution
        # the UNet halves the latent len(channel_mult) - 1 times and the skips must line up again on the way up
        step = m.vae_scale * 2 ** (len(m.cfg.unet.channel_mult) - 1)
        if self.resolution % step:
            raise ValueError(f"--resolution {self.resolution}: this model takes multiples of {step} px (VAE factor "
                             f"{m.vae_scale} x UNet down-sampling {step // m.vae_scale}), e.g. "
                             f"{max(step, self.resolution // step * step)}")
        from ..formats.checks import available_memory, decode_bytes
        need, have = decode_bytes(m.cfg.vae, self.resolution, self.resolution, cfg.batch_size), \
            available_memory(str(self.device))
        if need > have:  # the VAE's full-resolution activations alone (a lower bound): say so instead of trying
            raise ValueError(f"--resolution {self.resolution} x --batch-size {cfg.batch_size} needs at least "
                             f"{need / 2**30:.1f} GiB for the VAE alone on {self.device}, {have / 2**30:.1f} GiB is "
                             "free: lower --resolution or --batch-size")
        self.data = CaptionDataset(cfg.data, self.resolution, cfg.repeats, cfg.random_crop, cfg.flip,
                                   cfg.caption_dropout, cfg.seed)
        apply_instance_prompt(self.data, cfg.instance_prompt)  # DreamBooth: the identifier prompt (dreambooth.py)
        self.val_loss = build_val_loss(self)  # --val-loss-every (val_loss.py); --val-fraction splits self.data
        if cfg.buckets:  # aspect-ratio buckets (buckets.py): each image at the shape nearest its own
            assign_buckets(self.data, buckets_for(m, self.resolution, cfg.bucket_step, cfg.bucket_min,
                                                  cfg.bucket_max))
            self.loader = BucketLoader(self.data, cfg.batch_size)
        else:
            self.loader = Loader(self.data, cfg.batch_size)
        # torchrun / --noise-streams sample: this rank's slice of the global batch, noise keyed per sample
        self.loader = distributed.shard(self.loader, self.dist, cfg.noise_streams)

    def build_caches(self) -> None:
        """--cache-latents / --cache-text (cache.py): the frozen VAE / text encoders run once, here, not every step."""
        # torchrun with --cache-dir: rank 0 computes and writes the files, then the others read them
        run = self.dist.main_first if self.cfg.cache_dir else (lambda f, *a: f(*a))
        self.latent_cache, self.text_cache = run(build_caches, self)

    def eval_weights(self):
        """Context in which the adapters hold the weights to judge and ship: the EMA ones if on, else the raw."""
        return self.ema.applied() if self.ema else nullcontext()

    # ------------------------------------------------------------------------------------------- one step
    def encode_text(self, captions: list[str]):
        """Captions -> (context (B, T, D), pooled (B, P) or None); with grad only if the TE has adapters."""
        m = self.model
        with torch.set_grad_enabled(self.text_encoder_trains()):
            return m.encode_text([ids.to(self.device) for ids in m.tokenize(captions)])

    def micro_batch(self, batch: dict) -> MicroBatch:
        """A loader batch -> the tensors `training_loss` reads, on the device: the pixels in the VAE dtype (or the
        cached posterior moments), the token ids (or the cached text states: a dropped caption reads the ""
        row), and SDXL's micro-conditioning from the real data."""
        m, dev = self.model, self.device
        mb = MicroBatch()
        if self.latent_cache is not None:
            mb.moments = self.latent_cache.moments_of(batch["indices"], batch["flips"]).to(dev)   # (B, 2C, h, w)
        else:
            mb.pixels = batch["pixels"].to(self.vae_dtype).to(dev)                                # (B, 3, H, W)
        if self.text_cache is not None:
            mb.context, mb.pooled = self.text_cache.lookup(batch["indices"], batch["dropped"], dev)
        else:
            mb.ids = [ids.to(dev) for ids in m.tokenize(batch["captions"])]                       # [(B, T)]
        if m.cfg.unet.adm_in_channels:  # (orig h, w, crop top, left, target h, w) per image
            mb.time_ids = torch.tensor([[h, w, top, left, th, tw] for (h, w), (top, left), (th, tw)
                                        in zip(batch["original_sizes"], batch["crops"], batch["target_sizes"])],
                                       dtype=torch.float32).to(dev)                               # (B, 6)
        return mb

    def micro_loss(self, batch: dict) -> torch.Tensor:
        """The loss of one loader batch (no backward), every draw from self.gen; --profile times its stages.
        DreamBooth adds λ·L_prior of a class batch, drawn after the instance batch (dreambooth.py)."""
        draw = distributed.draws_for(batch, self.gen, self.cfg.seed, self.device)  # one stream, or one per sample
        if self.prior is None:
            loss = training_loss(self.model, self.noise, self.micro_batch(batch), draw,
                                 stage=self.prof.stage, **self.step_options)
        else:  # DreamBooth: instance + class rows in one UNet call (dreambooth.py)
            loss = self.prior.loss(self, self.micro_batch(batch), draw)
        if self.method:  # --ti-norm-weight (issue 17)
            loss = loss + self.method.regulariser()
        return loss

    def forward_backward(self, draw, mb: MicroBatch, cb: MicroBatch | None = None):
        """`training_loss` + backward, the function --cuda-graph records (`StepGraph` hands it the draws):
        gradients accumulate in place into the adapters' .grad (kept allocated: zero_grad(set_to_none=False)).
        No stage timers inside (they synchronise the GPU, which a recording cannot). Returns the loss; with
        DreamBooth's class batch `cb` (its draws after the instance batch's, from the same `draw`), (loss, L_prior)."""
        if cb is None:
            loss = training_loss(self.model, self.noise, mb, draw, **self.step_options)
        else:  # DreamBooth: instance + class rows in one UNet call (dreambooth.py)
            loss, prior = self.prior.pair_loss(self, mb, cb, draw, draw)
        loss = loss + self.method.regulariser() if self.method else loss  # --ti-norm-weight (issue 17)
        (loss / self.cfg.grad_accum).backward()
        return loss.detach() if cb is None else (loss.detach(), prior.detach())

    def noised(self, z0: torch.Tensor):
        """(z_t, t, target) for clean latents z0, drawn from self.gen with this run's options (`noised`)."""
        return noised(self.noise, z0, Draws(self.gen, z0.device), self.cfg.noise_offset, self.cfg.input_perturbation)

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            with self.prof.stage("data"):
                batch = self.loader.next_batch()
            if not batch["indices"]:  # torchrun: this rank's slice of a small last bucket batch is empty
                continue
            if self.graph is not None:  # forward and backward replayed from the recording
                mb = self.micro_batch(batch)
                cb = (self.prior.class_batch(self),) if self.prior else ()  # DreamBooth: the class batch, an input
                with self.prof.stage("forward_backward_graph"):
                    loss = self.graph(mb, *cb)
                if self.prior:  # (loss, L_prior): the prior term into its running sum, outside the recording
                    loss, prior = loss
                    self.prior.note(prior)
            else:
                loss = self.micro_loss(batch)
            if not torch.isfinite(loss) and self.dist.world == 1:  # torchrun: checked on the summed loss below
                raise TrainError(f"loss is {loss.item()} at step {self.step + 1}: lower --lr, use --mixed-precision "
                                 "bf16 or no instead of fp16, or check the data (run stopped, no step taken)")
            if self.graph is None:
                with self.prof.stage("backward"):
                    share = self.dist.share(batch)  # torchrun: B_rank / B_global, so the ranks sum to the mean
                    self.scaler.scale((loss * share if share != 1 else loss) / self.cfg.grad_accum).backward()
            total += loss.item() * self.dist.share(batch) / self.cfg.grad_accum
        total = self.dist.reduce_step(self.params, total)  # torchrun: gradients and loss summed over the ranks
        if not math.isfinite(total):
            raise TrainError(f"loss is {total} at step {self.step + 1}: lower --lr, use --mixed-precision bf16 or "
                             "no instead of fp16, or check the data (run stopped, no step taken)")
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
    def trainable_summary(self, n_train: int) -> str:
        cfg = self.cfg
        if cfg.method == "full":
            return (f"full fine-tune: {n_train:,} trainable parameters (UNet"
                    + (" + text encoders)" if cfg.train_text_encoder else ")"))
        return (f"adapters: {cfg.network} rank {cfg.rank} alpha {cfg.alpha} on {len(self.unet_layers)} UNet layers"
                f" ({cfg.targets}) + {len(self.te_layers)} text-encoder layers, {n_train:,} trainable parameters")

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg = self.cfg
        n_train = sum(p.numel() for p in self.params)
        self.log(format_budget(memory_budget(self), cfg))  # weights, gradients, optimizer, activations (full.py)
        self.log(self.method.describe() if self.method else self.trainable_summary(n_train))
        self.log(self.data.summary())
        offload_cached(self)  # cached VAE / text encoders leave the GPU for the loop
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not cfg.progress or not self.dist.is_main)
        self.dist.on_main(self.write_loss_log)
        # Ctrl-C / SIGTERM: the step in flight finishes, then a checkpoint at that step and `Stopped`; an error that
        # ends the steps leaves stopped.txt saying why (signals.py). Under torchrun every rank stops at the same step.
        with StopGuard(self) as stop:
            try:
                while self.step < cfg.max_steps:
                    stop.check()  # a step boundary
                    with self.prof.step():
                        loss = self.train_step()
                    self.losses.append({"step": self.step, "loss": loss, "lr": self.sched.get_last_lr()[0]})
                    extend_record(self, self.losses[-1])  # prior_loss, val_loss (method_state.py)
                    if self.dist.is_main:  # torchrun: rank 0 alone writes
                        self.append_loss(self.losses[-1])
                    if cfg.validate_every and self.step % cfg.validate_every == 0:
                        self.dist.on_main(validate, self, self.val_prompts)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                        self.save_checkpoint()
            except torch.OutOfMemoryError:
                raise TrainError(MEMORY_HINT) from None
            finally:
                bar.close()
        if cfg.profile and self.dist.is_main:  # this process's steps only (a resumed run profiles what it trained)
            self.log(self.prof.table())
            with atomic_path(os.path.join(self.run_dir, "profile.json")) as tmp:
                self.prof.save(tmp)
        self.save_checkpoint()
        return self.dist.on_main(self.write_outputs)

    def write_outputs(self) -> dict:
        """loss.jsonl, loss.png, the adapter file (minisd) and its kohya export (--method full: full.py)."""
        from ..formats.lora_files import dora_warning, save_diffusers, save_kohya
        self.write_loss_log()
        draw_loss_curve([r["loss"] for r in self.losses], os.path.join(self.run_dir, "loss.png"),
                        val=[(i, r["val_loss"]) for i, r in enumerate(self.losses) if "val_loss" in r])
        if self.cfg.method == "full":
            return write_full_outputs(self)
        meta = {"minisd.train_config": json.dumps(self.cfg.public_dict(self.run_dir)), "minisd.steps": str(self.step)}
        if self.method:  # issue 17: the method's own files (EMA weights if on), no adapter files
            with self.eval_weights():
                out = self.method.write_outputs(self.run_dir, meta, self.step)
            self.log(self.data.summary() if self.data.skipped else "data: no image was skipped")
            return {**out, "files": self.method.files_text(out), "losses": [r["loss"] for r in self.losses]}
        lora = os.path.join(self.run_dir, "lora.safetensors")
        kohya = os.path.join(self.run_dir, "lora_kohya.safetensors")
        out = {"lora": lora, "kohya": kohya, "losses": [r["loss"] for r in self.losses]}
        # every file through a fresh private temporary file renamed into place (formats/safe_write.py)
        if self.ema:  # lora.safetensors and the kohya file hold the EMA weights, lora_raw.safetensors the raw ones
            out["lora_raw"] = os.path.join(self.run_dir, "lora_raw.safetensors")
            with atomic_path(out["lora_raw"]) as tmp:
                adapters.save_adapter(self.model, tmp, metadata={**meta, "minisd.weights": "raw"})
            meta = {**meta, "minisd.weights": f"ema {self.cfg.ema_decay}"}
        with self.eval_weights():
            with atomic_path(lora) as tmp:
                adapters.save_adapter(self.model, tmp, metadata=meta)
            with atomic_path(kohya) as tmp:
                save_kohya(self.model, tmp, metadata={"ss_network_dim": str(self.cfg.rank),
                                                      "ss_network_alpha": str(self.cfg.alpha),
                                                      "ss_max_train_steps": str(self.step)})
            if self.cfg.network in ("lora", "dora"):  # diffusers / PEFT have no LoHa / LoKr layout
                out["diffusers"] = os.path.join(self.run_dir, "lora_diffusers.safetensors")
                with atomic_path(out["diffusers"]) as tmp:
                    save_diffusers(self.model, tmp)
            warning = dora_warning(self.model)
            if warning:
                self.log(f"warning: {warning}")
        self.log(self.data.summary() if self.data.skipped else "data: no image was skipped")
        return out
