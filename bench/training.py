"""One training step, written twice with the same recipe: minisd (its UNet, LoRA injection and AdamW8bit) and
diffusers + peft (as diffusers' examples/text_to_image/train_text_to_image_lora.py sets it up).

The recipe (both sides):
    frozen base: UNet and text encoder(s) in bf16, VAE in fp32 by default; `--vae-dtype bfloat16` encodes in bf16.
        diffusers' SD1 LoRA script casts its VAE to the weight dtype (bf16), its SDXL script keeps it in fp32 (the
        SDXL VAE overflows in fp16; bf16 has fp32's exponent range, so it cannot overflow there). minisd's train.py
        does so with --vae-dtype bf16 / auto. Each row records its VAE dtype. All frozen parts in eval
        mode, the UNet in train mode
    LoRA rank 16, alpha 16 on every attn1/attn2 to_q, to_k, to_v, to_out.0 of the UNet; adapter weights in fp32
        (minisd's default; diffusers casts them with `cast_training_params`)
    full fine-tune instead (`case.full_ft`): every UNet weight trains, kept in fp32 (the usual mixed-precision
        recipe: fp32 master weights, bf16 autocast compute); 8-bit AdamW
    per step, batch B:
        z_0 = VAE.encode(x).sample() · scale_factor        fp32, no grad  (cached: a precomputed tensor)
        c   = text encoder(s)(ids)                         bf16, no grad  (cached: precomputed; SDXL + pooled)
        t ~ U{0..999}, ε ~ N(0, I) on the device, z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε
        L = MSE(UNet(z_t, t, c), ε) under bf16 autocast; backward; optimizer step; zero_grad(set_to_none)
    optimizer: torch AdamW (fused on CUDA), lr 1e-4, weight decay 1e-2; full FT: minisd AdamW8bit vs
        bitsandbytes AdamW8bit, same hyperparameters
Inputs are fixed random tensors on the device (no data loading in the timing): pixels in [-1, 1], prompt ids.
"diffusers-compiled" rows (the fair rival, `compile_reference`): the diffusers side above plus what diffusers' docs
recommend for speed ("Accelerate inference", torch.compile section; the training scripts' --allow_tf32): UNet (and
an in-step VAE) in channels-last, inductor's conv_1x1_as_mm on and epilogue_fusion off, `torch.compile(unet,
fullgraph=True)` (the
mode from --compile-mode; dynamo traces diffusers' non-reentrant torch.utils.checkpoint into the one graph, so
fullgraph holds with checkpointing too), the VAE encoder compiled too, TF32 on. Not taken from that page:
coordinate-descent tuning. With it (and check_all_directions) the compile of the SD1.5 bs8 forward + backward had
not finished after 540 s on an H100 (2026-12-06, bench/results/h100-2026-12-06; minisd's own --compile of the
same step took 156 s); the page advises it for inference, where it tunes one graph, and measures a few per cent.
Issue 20's minisd options: `case.base_dtype` int8 / fp8 quantizes the frozen UNet and text encoders after the
adapters go in (`minisd.perf.quant.quantize_frozen`, as train.py --base-dtype); `case.fused_backward` steps buckets
of tensors inside the backward (`minisd.train.fused.FusedBackward`, train.py --fused-backward; the step's
opt.step() then steps the last bucket, the only tensors with a gradient left). The other methods' steps are in
methods.py.
`--cuda-graph` (minisd rows): the forward + backward above is recorded once with `minisd.perf.graphs.CudaGraph` (what
`train.py --cuda-graph` records) and replayed every step; the optimizer step and zeroing stay eager.

Shapes: B = batch, R = image side, h = R / 8, T = 77 tokens, D = text width, P = pooled width.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bench.cases import COMPILED
from bench.harness import Options, Workload, count_flops
from bench.models import (TINY_RESOLUTION, Parts, diffusers_parts, minisd_parts, model_config, reference_configs,
                          token_ids)

RANK = ALPHA = 16
LR, WEIGHT_DECAY = 1e-4, 1e-2


def make_optimizer(impl: str, kind: str, params: list, device: torch.device):
    """torch AdamW (fused on CUDA), or the side's 8-bit AdamW (minisd's own; bitsandbytes' for diffusers)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    if impl == "minisd":
        from minisd.train.adamw8bit import AdamW8bit
        return AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY)
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY)


def compile_unet(unet: torch.nn.Module, impl: str, how: str, mode: str, vae=None) -> torch.nn.Module:
    """`blocks`: compile each block of the U separately (regional compilation: quick to compile, and works inside
    gradient checkpointing, which calls blocks one by one); `full`: the whole UNet as one graph. A VAE (training rows
    that encode in the step) gets its encoder compiled as one graph, on both sides; minisd's `blocks` is the
    product's own `compile_for_training` (minisd/perf/compile.py, train.py --compile)."""
    # Static shapes: every block has its own sizes, and one graph per (block, grad mode) is what we want; dynamo
    # would otherwise turn sizes symbolic after the first mismatch. All blocks of a class share one code object,
    # so its recompile limit (default 8) must cover every block, or the rest silently run eagerly.
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    if vae is not None and not (impl == "minisd" and how == "blocks"):
        vae.encoder.compile(mode=mode, dynamic=False)
    if how == "full":
        return torch.compile(unet, mode=mode, dynamic=False)
    if impl == "minisd":
        from minisd.perf.compile import compile_for_training, compile_unet_blocks
        if vae is None:
            return compile_unet_blocks(unet, mode)       # the product's own (sample.py --compile)
        compile_for_training(SimpleNamespace(unet=unet, vae=vae), mode=mode)   # train.py --compile
        return unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for b in blocks:
        if b is not None:
            b.compile(mode=mode, dynamic=False)
    return unet


def compile_reference(unet: torch.nn.Module, vae, opts: Options, checkpointing: bool) -> tuple:
    """The fair rival's compilation (module docstring): returns (the compiled UNet, what was done)."""
    import torch._dynamo
    import torch._inductor.config as ind
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    ind.conv_1x1_as_mm = True
    ind.epilogue_fusion = False   # not coordinate_descent_tuning: see the module docstring (compile > 540 s)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    kw = {"backend": opts.compile_backend, "fullgraph": True, "dynamic": False}   # with checkpointing too (traced)
    if opts.compile_backend == "inductor":
        kw["mode"] = opts.compile_mode
    if vae is not None:
        vae.encoder.compile(**{**kw, "fullgraph": False})
    recipe = {**kw, "channels_last": True, "tf32": torch.cuda.is_available(), "vae_encoder_compiled": vae is not None,
              "inductor": "conv_1x1_as_mm, no epilogue_fusion"}
    return torch.compile(unet, **kw), recipe


class TrainStep:
    """Shared step; the two subclasses differ only in how they build the model and call its parts."""

    text_grad = False               # gradients through the text encoders (textual inversion)
    text_dtype = torch.bfloat16     # frozen text encoders (diffusers' TI script keeps its text encoder in fp32)

    def __init__(self, case, impl: str, tiny: bool, device: torch.device, opts: Options):
        self.case, self.impl, self.tiny, self.device, self.opts = case, impl, tiny, device, opts
        self.cfg = model_config(case.family, tiny)
        # tiny (CPU smoke test): a small image and at most 2 of them
        self.B = min(case.batch, 2) if tiny else case.batch
        self.R = TINY_RESOLUTION if tiny else case.resolution
        unet_dtype = self.unet_dtype()
        build = minisd_parts if impl == "minisd" else diffusers_parts
        self.vae_dtype = getattr(torch, opts.vae_dtype)
        self.parts: Parts = build(case.family, tiny, device, unet_dtype, self.text_dtype, vae_dtype=self.vae_dtype,
                                  vae=not case.cached, text=not case.cached)
        p = self.parts
        p.unet.requires_grad_(False)
        for m in [p.vae, *p.text_encoders]:
            if m is not None:
                m.requires_grad_(False).eval()
        self.params = self.trainable()              # adapters injected here (or every weight for full FT)
        self.set_checkpointing(case.checkpointing)
        p.unet.train()
        channels_last = opts.channels_last or impl == COMPILED
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            p.unet.to(memory_format=torch.channels_last)
            if p.vae is not None:
                p.vae.to(memory_format=torch.channels_last)
        self.reference_recipe = None
        if impl == COMPILED:
            self.unet, self.reference_recipe = compile_reference(p.unet, p.vae, opts, case.checkpointing)
        else:
            self.unet = (compile_unet(p.unet, impl, opts.compile, opts.compile_mode, vae=p.vae) if opts.compile
                         else p.unet)
        self.opt = make_optimizer(impl, case.optimizer, self.params, device)
        self.fused = None
        if case.fused_backward and impl == "minisd":  # train.py --fused-backward (diffusers' scripts have none)
            from minisd.train.fused import FusedBackward
            self.fused = FusedBackward(self.opt, self.params)
        self.f = 2 ** (len(self.cfg.vae.ch_mult) - 1)          # VAE downscale
        self.make_inputs()
        self.graph = None
        if opts.cuda_graph:  # minisd only (case.py checks): the product's recorder, as train.py --cuda-graph uses it
            from minisd.perf.graphs import CudaGraph
            self.graph = CudaGraph(self.forward_backward, warmup=2)

    # -------------------------------------------------------------------- inputs
    def make_inputs(self):
        B, R, dev = self.B, self.R, self.device
        g = torch.Generator(device=dev).manual_seed(0)
        h = R // self.f
        if self.case.cached:
            self.latents = torch.randn(B, self.cfg.unet.in_channels, h, h, device=dev, generator=g)   # (B, 4, h, h)
            self.context = torch.randn(B, 77, self.cfg.unet.context_dim, device=dev, generator=g,
                                       dtype=torch.bfloat16)                                      # (B, T, D)
            P = self.cfg.text_encoders[-1].projection_dim if self.case.family == "sdxl" else None
            self.pooled = (torch.randn(B, P, device=dev, generator=g, dtype=torch.bfloat16) if P else None)
        else:
            self.pixels = (torch.rand(B, 3, R, R, device=dev, generator=g) * 2 - 1).contiguous(
                memory_format=self.memory_format)                                                # (B, 3, R, R)
            self.ids = token_ids(self.case.family, self.tiny, B, dev)                            # (B, T)
        # SDXL micro-conditioning: original size, crop top-left, target size
        self.time_ids = torch.tensor([[R, R, 0, 0, R, R]] * B, dtype=torch.float32, device=dev)   # (B, 6)

    # -------------------------------------------------------------------- the step
    def step(self, n: int | None = None, replay: bool = True) -> torch.Tensor:
        """One optimizer step on the first n images (n < B and replay=False only for counting FLOPs: a replay
        launches recorded kernels that FlopCounterMode never sees)."""
        n = n or self.B
        if self.graph is not None and replay and n == self.B:
            loss = self.graph(n)                 # minisd --cuda-graph: forward + backward replayed
        else:
            loss = self.forward_backward(n)
        self.opt.step()
        # a recording accumulates into the .grad tensors it saw: zero them in place, never drop them
        self.opt.zero_grad(set_to_none=self.graph is None)
        return loss

    def forward_backward(self, n: int) -> torch.Tensor:
        loss = self.loss(*self.inputs(slice(0, n)))
        loss.backward()
        return loss.detach()

    def inputs(self, sel) -> tuple:
        """(z_0, text conditioning) of the images `sel` (a slice or an index tensor); the text encoders run with
        gradients only where the method trains through them (`text_grad`: textual inversion)."""
        if self.case.cached:
            return self.latents[sel], self.cached_cond(sel)
        with torch.no_grad():
            z0 = self.encode_image(self.pixels[sel].to(self.vae_dtype)).float()     # outside autocast
        with torch.set_grad_enabled(self.text_grad), self.autocast():
            cond = self.encode_text(self.ids[sel])
        return z0, cond

    def loss(self, z0: torch.Tensor, cond) -> torch.Tensor:
        n = len(z0)
        t = torch.randint(0, 1000, (n,), device=self.device)
        noise = torch.randn_like(z0)
        zt = self.add_noise(z0, noise, t).contiguous(memory_format=self.memory_format)
        with self.autocast():
            pred = self.unet_forward(zt, t, cond)                            # (n, 4, h, h)
        return F.mse_loss(pred.float(), noise.float())

    def cached_cond(self, sel):
        return self.context[sel], None if self.pooled is None else self.pooled[sel]  # (n, T, D), (n, P)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def flops(self) -> float:
        """Model FLOPs of one step: a batch-1 step without checkpointing, times B (every op is per-sample)."""
        self.set_checkpointing(False)
        try:
            return count_flops(lambda: self.step(1, replay=False)) * self.B
        finally:
            self.set_checkpointing(self.case.checkpointing)

    def workload(self) -> Workload:
        info = {**self.parts.info(), "trainable_params": sum(p.numel() for p in self.params),
                "batch": self.B, "resolution": self.R,
                "dtypes": {"unet": str(next(self.parts.unet.parameters()).dtype).replace("torch.", ""),
                           "trainable": str(self.params[0].dtype).replace("torch.", ""),
                           "vae": None if self.parts.vae is None else str(self.vae_dtype).replace("torch.", ""), "autocast": "bfloat16"},
                "optimizer": type(self.opt).__module__ + "." + type(self.opt).__name__,
                "base_dtype": self.base_dtype(), "fused_backward": self.fused is not None,
                "method": self.case.method}
        if self.reference_recipe:
            info["reference_recipe"] = self.reference_recipe
        return Workload(step=self.step, images=self.B, count_flops=self.flops, info=info)

    def unet_dtype(self) -> torch.dtype:
        """The UNet as built: fp32 master weights when every weight trains, else the bf16 frozen base."""
        return torch.float32 if self.case.full_ft else torch.bfloat16

    def base_dtype(self) -> str:
        """The frozen UNet's storage: "int8" / "fp8" when quantized (quant.py's layers), else its dtype."""
        kinds = {getattr(m, "quant_kind", None) for m in self.parts.unet.modules()} - {None}
        return "/".join(sorted(kinds)) or str(next(self.parts.unet.parameters()).dtype).replace("torch.", "")

    # subclass interface
    def trainable(self) -> list: ...
    def set_checkpointing(self, on: bool) -> None: ...
    def encode_image(self, x): ...
    def encode_text(self, ids): ...
    def add_noise(self, z0, noise, t): ...
    def unet_forward(self, zt, t, cond): ...


class MinisdTrain(TrainStep):
    def __init__(self, *a, **kw):
        from minisd.schedule import NoiseSchedule
        super().__init__(*a, **kw)
        self.schedule = NoiseSchedule(self.cfg.schedule)

    def trainable(self) -> list:
        from minisd import adapters
        from minisd.trainer import ATTN
        unet = self.parts.unet
        if self.case.full_ft:
            return [p.requires_grad_(True) for p in unet.parameters()]
        adapters.inject(unet, "lora", ATTN, rank=RANK, alpha=ALPHA)          # fp32 adapter weights
        if self.case.base_dtype != "auto":  # train.py --base-dtype: after the adapters, UNet and text encoders
            from minisd.perf.quant import quantize_frozen
            for part in [unet, *self.parts.text_encoders]:
                quantize_frozen(part, self.case.base_dtype)
        return [p.requires_grad_(True) for p in adapters.adapter_parameters(unet)]

    def set_checkpointing(self, on):
        from minisd.perf.checkpoint import set_gradient_checkpointing
        set_gradient_checkpointing(self.parts.unet, on)

    def encode_image(self, x):
        return self.parts.vae.encode(x).sample() * self.cfg.vae.scale_factor   # (n, 4, h, h)

    def encode_text(self, ids):
        hidden, pooled = [], None
        for te in self.parts.text_encoders:
            out = te(ids)
            h, p = out if isinstance(out, tuple) else (out, None)
            hidden.append(h)
            pooled = p if p is not None else pooled                          # SDXL: the second encoder's
        return torch.cat(hidden, dim=-1), pooled                             # (n, T, D), (n, P)

    def add_noise(self, z0, noise, t):
        return self.schedule.q_sample(z0, noise, t)

    def unet_forward(self, zt, t, cond):
        from minisd.unet import sdxl_vector_cond
        ctx, pooled = cond
        y = None
        if self.cfg.unet.adm_in_channels:
            y = sdxl_vector_cond(pooled.float(), self.time_ids[:len(zt)],
                                 embed_dim=self.cfg.unet.addition_time_embed_dim)  # (n, adm)
        return self.unet(zt, t, ctx, y=y)


class DiffusersTrain(TrainStep):
    def __init__(self, *a, **kw):
        from diffusers import DDPMScheduler
        super().__init__(*a, **kw)
        self.scheduler = DDPMScheduler.from_config(reference_configs(self.case.family, self.tiny)["scheduler"])

    def trainable(self) -> list:
        unet = self.parts.unet
        if self.case.full_ft:
            return [p.requires_grad_(True) for p in unet.parameters()]
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        # train_text_to_image_lora.py's adapter
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        cast_training_params(unet, dtype=torch.float32)
        return [p for p in unet.parameters() if p.requires_grad]

    def set_checkpointing(self, on):
        if on:
            self.parts.unet.enable_gradient_checkpointing()
        else:
            self.parts.unet.disable_gradient_checkpointing()

    def encode_image(self, x):
        return self.parts.vae.encode(x).latent_dist.sample() * self.parts.vae.config.scaling_factor

    def encode_text(self, ids):
        tes = self.parts.text_encoders
        if self.case.family != "sdxl":
            return tes[0](ids, return_dict=False)[0], None                  # SD1: last layer, final norm
        # SDXL (train_text_to_image_lora_sdxl.py encode_prompt): penultimate hidden states of both, pooled of the 2nd
        hidden, pooled = [], None
        for te in tes:
            out = te(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]
            hidden.append(out[-1][-2])
        return torch.cat(hidden, dim=-1), pooled

    def add_noise(self, z0, noise, t):
        return self.scheduler.add_noise(z0, noise, t)

    def unet_forward(self, zt, t, cond):
        ctx, pooled = cond
        kw = {}
        if self.case.family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids[:len(zt)]}
        return self.unet(zt, t, ctx, return_dict=False, **kw)[0]


def bnb_missing() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return True
    return False


def build(case, impl: str, tiny: bool, device: torch.device, opts: Options) -> Workload:
    if case.optimizer == "adamw8bit" and impl != "minisd" and bnb_missing():
        return Workload(skipped="bitsandbytes not installed")
    if case.method not in ("lora",):
        from bench.methods import build_method
        return build_method(case, impl, tiny, device, opts)
    cls = MinisdTrain if impl == "minisd" else DiffusersTrain
    return cls(case, impl, tiny, device, opts).workload()
