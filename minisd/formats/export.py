"""Export a minisd model back to the official layouts: one single file, or a diffusers folder.

Single file: the inverse of single_file.py's prefix table (OpenCLIP towers re-fused), plus the
tensors kept verbatim at import (`extras.safetensors`: schedule buffers, position_ids, ...), so a
file imported and exported again is identical tensor by tensor, and a full fine-tune loads in
A1111 / ComfyUI. Diffusers folder: the inverse name tables plus the component configs that
diffusers' `from_pretrained` reads.
"""
from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from ..config import CLIPTextConfig, ModelConfig
from .keys_text import ldmbert_to_diffusers
from .keys_unet import diffusers_unet_config, unet_to_diffusers
from .keys_vae import vae_to_diffusers
from ..model import StableDiffusion, read_extras, text_encoder_name
from . import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS
from .safe_write import DIFFUSERS, atomic_folder, atomic_path, check_file_dest
from .single_file import join_checkpoint


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def components(model: StableDiffusion) -> dict:
    out = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict()}
    for i, te in enumerate(model.text_encoders):
        out[text_encoder_name(i)] = te.state_dict()
    return out


def export_single_file(model: StableDiffusion, folder: str | None, dest: str, overwrite: bool = False,
                       protect=()) -> None:
    """Write the official single-file layout of `model` to `dest` (.safetensors), atomically (safe_write.py: an
    existing `dest` only with `overwrite`, never an input in `protect`)."""
    check_file_dest(dest, overwrite, protect=[folder, *protect])
    extras, _ = read_extras(folder) if folder else ({}, {})
    extras = {k: v for k, v in extras.items() if "/" not in k}   # "sub/name" keys belong to diffusers folders
    sd = join_checkpoint(components(model), model.cfg.family, model.cfg, extras)
    with atomic_path(dest) as tmp:
        # The official layout plus our config in the header, so minisd re-imports non-preset shapes.
        save_file(_contiguous(sd), tmp, metadata={"format": "pt",
                                                  "minisd_config": json.dumps(model.cfg.to_dict())})


def vae_diffusers_config(cfg: ModelConfig) -> dict:
    v = cfg.vae
    n = len(v.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.out_ch,
            "block_out_channels": [v.ch * m for m in v.ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": v.num_res_blocks, "latent_channels": v.z_channels, "act_fn": "silu",
            "norm_num_groups": v.norm_num_groups, "scaling_factor": v.scale_factor,
            "force_upcast": v.force_upcast, "sample_size": cfg.resolution}


def clip_hf_config(t: CLIPTextConfig) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if t.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers, "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act, "layer_norm_eps": t.layer_norm_eps,
            "projection_dim": t.projection_dim or t.hidden_size, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
            "initializer_range": 0.02}


def ldmbert_hf_config(t) -> dict:
    return {"architectures": ["LDMBertModel"], "model_type": "ldmbert", "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "encoder_layers": t.n_layer,
            "encoder_ffn_dim": t.ffn_dim, "encoder_attention_heads": t.n_heads, "head_dim": t.head_dim,
            "d_model": t.d_model, "activation_function": "gelu", "pad_token_id": 0}


def scheduler_config(cfg: ModelConfig, read: dict | None = None) -> dict:
    """The diffusers scheduler config. `read`: the one a diffusers folder came with (source.json's "scheduler"):
    its class and every key it had are kept, with minisd's schedule fields written over them (so a --prediction
    override at import shows); without it, the class of the family's official pipeline."""
    s = cfg.schedule
    cls = {"sdxl": "EulerDiscreteScheduler", "ldm": "DDIMScheduler"}.get(cfg.family, "PNDMScheduler")
    d = {"_class_name": cls, "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start,
         "beta_end": s.beta_end, "beta_schedule": s.beta_schedule, "prediction_type": s.prediction_type,
         "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset,
         "set_alpha_to_one": s.set_alpha_to_one, "clip_sample": False}
    if s.timestep_spacing is None:   # absent = each scheduler's own default; diffusers rejects null
        del d["timestep_spacing"]
    if read:
        d = {**read, **{k: v for k, v in d.items() if k != "_class_name" and k != "clip_sample"}}
        d.setdefault("_class_name", cls)
    if d["_class_name"] == "PNDMScheduler":
        d.setdefault("skip_prk_steps", True)
    return d


def _write(folder: str, sub: str, config: dict, weights: dict, weight_name: str) -> None:
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    with open(os.path.join(folder, sub, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(_contiguous(weights), os.path.join(folder, sub, weight_name), metadata={"format": "pt"})


def export_diffusers(model: StableDiffusion, dest: str, folder: str | None = None, overwrite: bool = False,
                     protect=()) -> None:
    """Write a diffusers pipeline folder that `DiffusionPipeline.from_pretrained` loads offline (atomically; an
    existing `dest` only with `overwrite` and only an earlier diffusers folder: safe_write.py)."""
    cfg = model.cfg
    extras, source = read_extras(folder) if folder else ({}, {})
    legacy_vae = source.get("vae_attention") == "legacy"
    prefixes = source.get("text_model_prefix", [])
    sched = scheduler_config(cfg, source.get("scheduler"))
    with atomic_folder(dest, overwrite, DIFFUSERS, protect=[folder, *protect]) as tmp:
        ldm = cfg.family == "ldm"
        vae_sub = "vqvae" if ldm else "vae"
        _write(tmp, "unet", {"_class_name": "UNet2DConditionModel", **diffusers_unet_config(cfg.unet),
                             "sample_size": cfg.resolution // model.vae_scale},
               unet_to_diffusers(model.unet.state_dict(), cfg.unet), DIFFUSERS_WEIGHTS)
        _write(tmp, vae_sub, vae_diffusers_config(cfg),
               vae_to_diffusers(model.vae.state_dict(), attention_names="legacy" if legacy_vae else "new"),
               DIFFUSERS_WEIGHTS)
        index = {"_class_name": "LDMTextToImagePipeline" if ldm else (
            "StableDiffusionXLPipeline" if cfg.family == "sdxl" else "StableDiffusionPipeline"),
            "unet": ["diffusers", "UNet2DConditionModel"], vae_sub: ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", sched["_class_name"]]}
        for i, (t, te, tok) in enumerate(zip(cfg.text_encoders, model.text_encoders, model.tokenizers)):
            sub = "bert" if ldm else text_encoder_name(i)
            tok_sub = "tokenizer" if i == 0 else f"tokenizer_{i + 1}"
            sd = te.state_dict()
            if ldm:
                _write(tmp, sub, ldmbert_hf_config(t), ldmbert_to_diffusers(sd), TRANSFORMERS_WEIGHTS)
                index[sub] = ["latent_diffusion", "LDMBertModel"]
                index[tok_sub] = ["transformers", "BertTokenizer"]
            else:
                sd = dict(sd)
                sd.update({k.split("/", 1)[1]: v for k, v in extras.items() if k.startswith(sub + "/")})
                if i < len(prefixes) and not prefixes[i]:   # transformers >= 5 writes no `text_model.`
                    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
                _write(tmp, sub, clip_hf_config(t), sd, TRANSFORMERS_WEIGHTS)
                index[sub] = ["transformers", "CLIPTextModelWithProjection" if t.projection_dim else "CLIPTextModel"]
                index[tok_sub] = ["transformers", "CLIPTokenizer"]
            tok.save(os.path.join(tmp, tok_sub))
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(sched, f, indent=2)
        if cfg.family == "sdxl":
            index["force_zeros_for_empty_prompt"] = cfg.zero_empty_negative
        elif not ldm:
            index.update(safety_checker=[None, None], feature_extractor=[None, None],
                         requires_safety_checker=False)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
