"""Full fine-tuning: every weight of the UNet trains (with --train-text-encoder, every weight of the text encoder(s)
too), instead of small adapters beside a frozen base. `train.py --method full`.

This is how Stable Diffusion itself was trained (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models": the UNet trained on frozen VAE latents) and how its community fine-tunes (and DreamBooth in its
paper, Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation") were
made: the loss is the same (minisd/trainer.py, Ho et al. 2020 Eq. 14), only the set of trained tensors differs.
The VAE stays frozen (it defines the latent space the UNet works in).

Precision: the trained weights are fp32 master weights whatever --mixed-precision says; autocast runs the forward
in bf16 / fp16 (the rounding of a half-precision weight would swallow most Adam updates: lr·update ≈ 1e-6 of a
weight ≈ 1e-2 is far below bf16's 2⁻⁸ relative step). Frozen text encoders stay in the autocast dtype.

The memory budget (`memory_budget`, printed at the start of every run) is the picture every fine-tuning tutorial
draws by hand, computed from the parameter counts and dtypes:

    weights      Σ numel · bytes of every parameter and buffer (trained ones fp32; frozen ones in their dtype)
    gradients    Σ numel · 4 over the trained tensors (fp32 .grad)
    optimizer    AdamW 8 bytes per trained value (m, v in fp32); 8-bit AdamW 2 bytes + 8 bytes per block of 256
                 (two fp32 absmax) for tensors of ≥ 4096 values, 8 bytes below; Prodigy 16 (x0, s, m, v)
    EMA          4 bytes per trained value (--ema-decay: the fp32 shadow)
    activations  an estimate (`activation_bytes`): one UNet forward at the run's batch and resolution, in the
                 autocast dtype (fp32 without), runs on the meta device (no memory, no compute) and every tensor
                 autograd saves for the backward is counted once, parameters not (what bench/saved.py measures on
                 a real step). With gradient checkpointing only each block's input is kept, plus the largest
                 block's saved tensors while it is recomputed. Not counted: fp32 copies that autocast makes around
                 norms, the backward's own temporaries, the text encoders (small beside the UNet) and the VAE (no
                 grad). SDXL 1024 px bs1 with LoRA: 6.82 GiB measured by bench/saved.py under bf16 autocast.

Outputs (in the run folder): `model/` (a minisd folder: `sample.py --model RUN/model`), `model.safetensors` (the
official single-file layout A1111 / ComfyUI load, minisd/formats/export.py), both in fp32 and, with --ema-decay,
holding the EMA weights (the raw ones are in checkpoint.pt).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.safe_write import MINISD, atomic_folder
from ..model import StableDiffusion, empty_weights, read_extras, write_model_files
from ..perf.checkpoint import set_gradient_checkpointing
from ..perf.compile import compile_for_training
from ..unet import UNetModel

GIB = 2 ** 30


# ------------------------------------------------------------------------------------------- building
def build_full(trainer) -> None:
    """Trainer.build_adapters for --method full: no adapter layers; the UNet's (and with --train-text-encoder the text
    encoders') own parameters, in fp32, become `trainer.params`."""
    cfg, m = trainer.cfg, trainer.model
    trainer.unet_layers, trainer.te_layers = [], []
    trained = [m.unet] + (list(m.text_encoders) if cfg.train_text_encoder else [])
    for part in trained:
        part.float()                    # fp32 master weights (module docstring)
        part.requires_grad_(True)
    m.to(trainer.device)
    set_gradient_checkpointing(m.unet, cfg.gradient_checkpointing)
    if cfg.compile:
        compile_for_training(m, encoder=not cfg.cache_latents)
    trainer.unet_params = list(m.unet.parameters())
    te_params = [p for te in m.text_encoders for p in te.parameters() if p.requires_grad]
    trainer.params = trainer.unet_params + te_params


def trained_modules(trainer) -> dict[str, nn.Module]:
    """{checkpoint key prefix: module} of what trains."""
    m = trainer.model
    out = {"unet": m.unet}
    if trainer.cfg.train_text_encoder:
        out.update({f"text_encoder_{i}": te for i, te in enumerate(m.text_encoders)})
    return out


def trained_state_dict(trainer) -> dict:
    return {f"{k}.{n}": p.detach().clone() for k, mod in trained_modules(trainer).items()
            for n, p in mod.named_parameters()}


@torch.no_grad()
def load_trained_state_dict(trainer, sd: dict) -> None:
    """Copy checkpointed weights into the parameters in place (the optimizer keeps its references)."""
    own = {f"{k}.{n}": p for k, mod in trained_modules(trainer).items() for n, p in mod.named_parameters()}
    if set(own) != set(sd):
        diff = sorted(set(own) ^ set(sd))
        raise ValueError(f"{trainer.run_dir}: the checkpoint's weights do not match this model ({diff[0]}; "
                         "--train-text-encoder changed?)")
    for k, p in own.items():
        p.copy_(sd[k])


# ------------------------------------------------------------------------------------------- memory budget
def optimizer_bytes(params, optimizer: str) -> int:
    """Bytes of optimizer state for the trained tensors (module docstring)."""
    if optimizer == "adamw":
        return sum(8 * p.numel() for p in params)
    if optimizer == "prodigy":
        return sum(16 * p.numel() for p in params)
    total = 0  # adamw8bit (minisd/train/adamw8bit.py): int8 m + uint8 v codes, one fp32 absmax each per 256 values
    for p in params:
        n = p.numel()
        total += 2 * n + 2 * 4 * (-(-n // 256)) if n >= 4096 else 8 * n
    return total


def activation_bytes(module: nn.Module, inputs: tuple, blocks: list[str] | None = None) -> int:
    """Estimated activation memory of one training forward of `module` on `inputs` (run it on the meta device: no
    memory, no compute): the bytes of the floating-point tensors autograd saves for backward (`saved_tensors_hooks`),
    each tensor once, parameters and views of them not counted (they are the weights). `blocks` (module paths): gradient
    checkpointing of those blocks, which then keep only their inputs, plus the largest block's own saved tensors
    (alive while it is recomputed in backward); what runs outside every block counts in full."""
    params = {id(p) for p in module.parameters()}
    keep, seen = [], set()                  # keep: the ids of `seen` stay unique while we count
    per_block: dict = {None: 0}
    current = [None]
    block_inputs = [0]

    def pack(t):
        if (id(t) in seen or id(t) in params or (t._base is not None and id(t._base) in params)
                or not t.is_floating_point()):  # integer bookkeeping (indices, RNG seeds of fused kernels): bytes
            return t
        seen.add(id(t))
        keep.append(t)
        per_block[current[0]] = per_block.get(current[0], 0) + t.numel() * t.element_size()
        return t

    hooks = []
    for name, mod in module.named_modules():
        if blocks and name in blocks:
            def enter(mod, args, kwargs, name=name):
                current[0] = name
                block_inputs[0] += sum(a.numel() * a.element_size() for a in list(args) + list(kwargs.values())
                                       if torch.is_tensor(a) and a.is_floating_point())
            hooks.append(mod.register_forward_pre_hook(enter, with_kwargs=True))
            hooks.append(mod.register_forward_hook(lambda *a: current.__setitem__(0, None)))
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention  # for the trace only (see `_fused_attention`)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(*inputs)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    if not blocks:
        return sum(per_block.values())
    inside = [v for k, v in per_block.items() if k is not None]
    return per_block[None] + block_inputs[0] + max(inside, default=0)


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """SDPA as a GPU runs it in training (the memory-efficient kernel: backward keeps q, k, v, the output and the
    log-sum-exp), not as the meta device's math fallback would (the B·nh·N·N score matrix), so a meta trace counts
    what a real step saves."""
    if attn_mask is not None or dropout_p or not q.is_meta:
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal,
                                                                   scale=scale)[0]


_SDPA = F.scaled_dot_product_attention


def unet_activation_bytes(model: StableDiffusion, batch: int, resolution: int, dtype: torch.dtype,
                          checkpointing: bool) -> int:
    """`activation_bytes` of the model's UNet (a meta copy: no memory) at this batch and resolution."""
    ucfg = model.cfg.unet
    with empty_weights():
        unet = UNetModel(ucfg)
    f = model.vae_scale
    with torch.device("meta"):
        x = torch.empty(batch, ucfg.in_channels, resolution // f, resolution // f, dtype=dtype)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, ucfg.context_dim, dtype=dtype) if ucfg.context_dim else None
        y = torch.empty(batch, ucfg.adm_in_channels, dtype=dtype) if ucfg.adm_in_channels else None
    unet.to(dtype)
    blocks = None
    if checkpointing:  # what minisd/perf/checkpoint.py wraps: every input, middle and output block
        blocks = ([f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
                  + [f"output_blocks.{i}" for i in range(len(unet.output_blocks))])
    return activation_bytes(unet, (x, t, ctx) if y is None else (x, t, ctx, y), blocks)


def memory_budget(trainer) -> dict:
    """The run's memory budget in bytes: weights, gradients, optimizer, ema, activations, total (module docstring)."""
    cfg, m = trainer.cfg, trainer.model
    params = [p for p in trainer.params]
    trained = {id(p) for p in params}
    weights = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
                  if id(t) not in trained) + sum(4 * p.numel() for p in params)
    dtype = trainer.amp_dtype or torch.float32
    out = {"weights": weights, "gradients": 4 * sum(p.numel() for p in params),
           "optimizer": optimizer_bytes(params, cfg.optimizer),
           "ema": 4 * sum(p.numel() for p in params) if cfg.ema_decay > 0 else 0,
           "activations": 0}
    batch = cfg.batch_size * (2 if cfg.class_prompt else 1)  # DreamBooth: a class batch beside each instance batch
    try:
        out["activations"] = unet_activation_bytes(m, batch, trainer.resolution, dtype,
                                                   cfg.gradient_checkpointing)
    except Exception:  # an estimate only: a UNet the meta device cannot trace says "n/a" rather than stopping the run
        out["activations"] = None
    out["total"] = sum(v for v in out.values() if v is not None)
    out["trained_params"] = sum(p.numel() for p in params)
    return out


def format_budget(b: dict, cfg) -> str:
    g = lambda k: f"{b[k] / GIB:8.3f} GiB"  # noqa: E731
    dtype = cfg.mixed_precision if cfg.mixed_precision != "no" else "fp32"
    return "\n".join([
        f"memory budget ({b['trained_params']:,} trained parameters, batch {cfg.batch_size}):",
        f"  weights      {g('weights')}   (trained in fp32, frozen in their dtype)",
        f"  gradients    {g('gradients')}   (fp32)",
        f"  optimizer    {g('optimizer')}   ({cfg.optimizer})",
        *([f"  EMA          {g('ema')}   (fp32 shadow)"] if b["ema"] else []),
        (f"  activations  {g('activations')}   (estimate: what the UNet saves for backward, {dtype}"
         + (", checkpointed blocks)" if cfg.gradient_checkpointing else ")")) if b["activations"] is not None
        else "  activations       n/a   (the UNet could not be traced on the meta device)",
        f"  total        {g('total')}" + ("" if b["activations"] is not None else "   (without activations)")])


# ------------------------------------------------------------------------------------------- outputs
def write_full_outputs(trainer) -> dict:
    """model/ (minisd folder) and model.safetensors (official single file), with the EMA weights if on."""
    from ..formats.export import export_single_file
    folder = os.path.join(trainer.run_dir, "model")
    single = os.path.join(trainer.run_dir, "model.safetensors")
    meta = {"minisd.train_config": json.dumps(trainer.cfg.public_dict(trainer.run_dir)),
            "minisd.steps": str(trainer.step),
            "minisd.weights": f"ema {trainer.cfg.ema_decay}" if trainer.ema else "raw"}
    # tensors the base model's folder kept from its source file (schedule buffers, ...) go on into the exports
    extras, source = read_extras(trainer.cfg.model) if os.path.isdir(trainer.cfg.model) else ({}, {})
    # a resumed run writes them again: an earlier model/ of this (locked) run folder is replaced, atomically
    with trainer.eval_weights():
        with atomic_folder(folder, overwrite=True, kind=MINISD) as tmp:
            write_model_files(trainer.model, tmp, dtype=torch.float32, metadata=meta, extras=extras or None,
                              source=source or None)
        export_single_file(trainer.model, folder, single, overwrite=True)
    trainer.log(trainer.data.summary() if trainer.data.skipped else "data: no image was skipped")
    return {"model": folder, "single_file": single, "losses": [r["loss"] for r in trainer.losses]}
