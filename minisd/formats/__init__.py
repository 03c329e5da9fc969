"""Appendix: file formats. Official layouts in and out: diffusers folders (this file), single files
(single_file.py), the name tables (keys_unet.py, keys_vae.py, keys_text.py, all through rename.py's strict
rename), export (export.py) and LoRA file layouts (lora_files.py).

This file reads a diffusers folder (and, through convert.py, single files) into minisd.

A diffusers folder is `model_index.json` plus one subfolder per component, each with a
`config.json` and weights named `diffusion_pytorch_model.safetensors` (UNet, VAE) or
`model.safetensors` (text encoders), possibly `.bin`/`.fp16.` variants. The per-component name
tables live in keys_unet.py, keys_vae.py, keys_text.py; this file only finds the files, turns
the component configs into ours and strips the prefixes.

    SD1.x / SD2.x : unet/ vae/ text_encoder/ tokenizer/ scheduler/
    SDXL          : unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/
    LDM-256       : unet/ vqvae/ bert/ tokenizer/ scheduler/
"""
from __future__ import annotations

import json
import os

import torch

from ..config import CLIPTextConfig, LDMBertConfig, ModelConfig, ScheduleConfig, VAEConfig, check_config
from .keys_text import clip_from_hf, ldmbert_from_diffusers
from .keys_unet import unet_config_from_diffusers, unet_from_diffusers
from .keys_vae import vae_from_diffusers
from ..model import (UNET_FILE, VAE_FILE, ModelError, StableDiffusion, empty_weights, read_safetensors,
                     text_encoder_file, text_encoder_name)

# The diffusers folder's weight file names, spelled here only: diffusers models (UNet, VAE) and transformers
# models (text encoders), preferred in this order when a folder holds several variants.
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
WEIGHT_NAMES = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _read_json(path: str) -> dict:
    from .checks import read_json
    if not os.path.lexists(path):
        raise ModelError(f"missing {path}")
    try:
        return read_json(path, "JSON config")
    except ValueError as e:  # not a regular file, not UTF-8, not JSON, nested too deeply, not an object
        raise ModelError(str(e)) from None


def read_weights(folder: str) -> dict:
    """The weights of one component folder (safetensors preferred; .bin read without unpickling code)."""
    for name in WEIGHT_NAMES:
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            continue
        if p.endswith(".safetensors"):
            return read_safetensors(p)
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{p}: refused or unreadable pickle ({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ModelError(f"{p}: not a state dict of tensors")
        return sd
    raise ModelError(f"{folder}: no weights file ({', '.join(WEIGHT_NAMES[:2])}, ...)")


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """diffusers AutoencoderKL config -> ours (block_out_channels = ch * ch_mult)."""
    blocks = d.get("block_out_channels", [128, 256, 512, 512])
    return VAEConfig(in_channels=d.get("in_channels", 3), out_ch=d.get("out_channels", 3), ch=blocks[0],
                     ch_mult=tuple(c // blocks[0] for c in blocks),
                     num_res_blocks=d.get("layers_per_block", 2), z_channels=d.get("latent_channels", 4),
                     embed_dim=d.get("latent_channels", 4), norm_num_groups=d.get("norm_num_groups", 32),
                     scale_factor=d.get("scaling_factor", 0.18215),
                     force_upcast=d.get("force_upcast", True))


def clip_config_from_hf(d: dict, layer: int, final_norm: bool, pad_token: str) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                          intermediate_size=d["intermediate_size"],
                          num_attention_heads=d["num_attention_heads"],
                          num_hidden_layers=d["num_hidden_layers"],
                          max_position_embeddings=d.get("max_position_embeddings", 77),
                          hidden_act=d.get("hidden_act", "quick_gelu"),
                          layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                          projection_dim=d.get("projection_dim") if "WithProjection" in str(
                              d.get("architectures")) else None,
                          layer=layer, final_norm=final_norm, pad_token=pad_token)


def ldmbert_config_from_diffusers(d: dict) -> LDMBertConfig:
    return LDMBertConfig(vocab_size=d.get("vocab_size", 30522),
                         max_position_embeddings=d.get("max_position_embeddings", 77),
                         n_layer=d.get("encoder_layers", 32), d_model=d.get("d_model", 1280),
                         n_heads=d.get("encoder_attention_heads", 8), head_dim=d.get("head_dim", 64),
                         ffn_dim=d.get("encoder_ffn_dim", 5120))


def schedule_config_from_diffusers(d: dict) -> ScheduleConfig:
    return ScheduleConfig(num_train_timesteps=d.get("num_train_timesteps", 1000),
                          beta_start=d.get("beta_start", 0.0001), beta_end=d.get("beta_end", 0.02),
                          beta_schedule=d.get("beta_schedule", "linear"),
                          prediction_type=d.get("prediction_type", "epsilon"),
                          timestep_spacing=d.get("timestep_spacing"),
                          steps_offset=d.get("steps_offset", 0),
                          set_alpha_to_one=d.get("set_alpha_to_one", True))


NUMERIC_KEYS = ("_channels", "_size", "_layers", "_heads", "_dim", "_groups", "_per_block", "_eps", "_factor",
                "_timesteps", "_start", "_end", "_offset", "_embeddings")


def _component(build, path: str, what: str, d: dict | None = None):
    """build(the JSON config at `path`), checked field by field (config.check_config); a missing key, a wrong type
    or a value out of range is one ModelError naming the file and the field."""
    d = _read_json(path) if d is None else d
    for k, v in d.items():  # a size, count or factor holds numbers (or null), one or a list (of lists) of them
        items = [y for x in (v if isinstance(v, list) else [v]) for y in (x if isinstance(x, list) else [x])]
        if k.endswith(NUMERIC_KEYS) and not all(x is None or isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in items):
            raise ModelError(f"{path}: {k} must be a number or a list of numbers, got {json.dumps(v)[:60]}")
    try:
        cfg = build(d)
        check_config(cfg, what)
    except KeyError as e:
        raise ModelError(f"{path}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, IndexError, AttributeError) as e:
        raise ModelError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return cfg


def _pad_token(path: str, sub: str, default: str) -> str:
    """Which token pads the prompt: EOS for OpenAI CLIP tokenizers, "!" for OpenCLIP ones."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # transformers >= 5 writes only the latter
        p = os.path.join(path, sub, name)
        if os.path.isfile(p) and _read_json(p).get("pad_token"):
            pad = _read_json(p)["pad_token"]
            return pad["content"] if isinstance(pad, dict) else pad
    return default


def load_diffusers_folder(path: str, family: str | None = None) -> StableDiffusion:
    """Build a StableDiffusion from a diffusers pipeline folder (SD1.x, SD2.x, SDXL, LDM-256).

    The components tell LDM (bert/) and SDXL (text_encoder_2/); SD1 and SD2 differ only in the text encoder, OpenAI
    CLIP (quick_gelu) or OpenCLIP (exact gelu), which is a guess for a community model: `family` "sd1" / "sd2"
    decides it instead (it sets the single-file layout of an export), and a family the components contradict is
    a ModelError."""
    index = _read_json(os.path.join(path, "model_index.json"))
    given = None if family in (None, "auto") else family
    if "bert" in index:
        family = "ldm"
    elif text_encoder_name(1) in index:
        family = "sdxl"
    else:
        family = None  # sd1 or sd2, told apart by the text encoder below
    if given and (given != family if family else given not in ("sd1", "sd2")):
        raise ModelError(f"{path}: the folder's components are those of {family or 'sd1/sd2'}, but --family "
                         f"{given} was given")
    family = family or given
    for comp in ("unet", "vqvae" if family == "ldm" else "vae", "scheduler"):
        if not os.path.isdir(os.path.join(path, comp)):
            raise ModelError(f"{path}: diffusers folder without its '{comp}/' component")

    vae_dir = os.path.join(path, "vqvae" if family == "ldm" else "vae")
    # each component config is input: a wrong type or range is one line naming the file and the field
    unet_cfg = _component(unet_config_from_diffusers, os.path.join(path, "unet", "config.json"), "unet")
    vae_cfg = _component(vae_config_from_diffusers, os.path.join(vae_dir, "config.json"), "vae")
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    sched_json = _read_json(sched_path)
    sched = _component(schedule_config_from_diffusers, sched_path, "schedule", sched_json)

    text_dirs = ["bert"] if family == "ldm" else (
        [text_encoder_name(0), text_encoder_name(1)] if family == "sdxl" else [text_encoder_name(0)])
    text_cfgs = []
    for i, sub in enumerate(text_dirs):
        te_path = os.path.join(path, sub, "config.json")
        d = _read_json(te_path)
        if family == "ldm":
            text_cfgs.append(_component(ldmbert_config_from_diffusers, te_path, "text encoder", d))
            continue
        if family is None:  # OpenAI CLIP-L (SD1) uses quick_gelu, OpenCLIP (SD2) the exact gelu
            family = ("sd1" if d["hidden_act"] == "quick_gelu" else "sd2") if "hidden_act" in d else (
                "sd1" if d.get("hidden_size") == 768 else "sd2")
        tok = "tokenizer" if i == 0 else "tokenizer_2"
        default_pad = "!" if (family == "sd2" or i == 1) else "<|endoftext|>"
        # SDXL reads both encoders at the penultimate layer without the final LayerNorm.
        layer, final_norm = (-2, False) if family == "sdxl" else (-1, True)
        pad = _pad_token(path, tok, default_pad)
        text_cfgs.append(_component(lambda d: clip_config_from_hf(d, layer, final_norm, pad), te_path,
                                    "text encoder", d))

    cfg = ModelConfig(family=family, unet=unet_cfg, vae=vae_cfg, text_encoders=text_cfgs,
                      schedule=sched, resolution=unet_cfg_resolution(path, vae_cfg),
                      zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt",
                                                         family == "sdxl")) and family == "sdxl")
    tok_dirs = []
    for i in range(len(text_cfgs)):
        d = os.path.join(path, "tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        tok_dirs.append(d if os.path.isdir(d) and os.listdir(d) else None)
    with empty_weights():
        model = StableDiffusion(cfg, tokenizer_dirs=tok_dirs)

    vae_sd = read_weights(vae_dir)
    unet_sd = read_weights(os.path.join(path, "unet"))
    raw = {f"unet/{k}": v for k, v in unet_sd.items()}
    raw.update({f"{os.path.basename(vae_dir)}/{k}": v for k, v in vae_sd.items()})
    files = {UNET_FILE: unet_from_diffusers(unet_sd, unet_cfg), VAE_FILE: vae_from_diffusers(vae_sd)}
    # What export needs to write this folder back exactly: naming conventions and unused tensors.
    extras, source = {}, {"format": "diffusers", "source": os.path.basename(os.path.normpath(path)),
                          "vae_attention": "legacy" if any(".query." in k for k in vae_sd) else "new",
                          "text_model_prefix": [],
                          # the scheduler as read (class and every key), so export writes the same one back
                          "scheduler": sched_json}
    for i, sub in enumerate(text_dirs):
        sd = read_weights(os.path.join(path, sub))
        raw.update({f"{sub}/{k}": v for k, v in sd.items()})
        if family == "ldm":
            files[text_encoder_file(i)] = ldmbert_from_diffusers(sd)
            continue
        source["text_model_prefix"].append(any(k.startswith("text_model.") for k in sd))
        sd = with_text_model_prefix(sd)
        extras.update({f"{sub}/{k}": v for k, v in sd.items() if k.endswith("position_ids")})
        files[text_encoder_file(i)] = clip_from_hf(sd)[0]   # [1]: position_ids, kept in extras above
    model.load_components(files)
    model.extras, model.source, model.trace = extras, source, trace_by_storage(raw, model)
    return model


def trace_by_storage(raw: dict, model: StableDiffusion) -> list:
    """[(source name, minisd parameter or 'ignored: ...')]: the name tables move tensors without
    copying them (a reshape is a view), so a source tensor and the parameter it became share memory."""
    comps = [("unet", model.unet), ("vae", model.vae)] + [
        (text_encoder_name(i), te) for i, te in enumerate(model.text_encoders)]
    where = {}
    for comp, module in comps:
        for name, t in module.state_dict().items():
            where[t.data_ptr()] = f"{comp}.{name}"
    return [(k, where.get(v.data_ptr(), "ignored: not used by minisd (kept for export)"))
            for k, v in raw.items()]


def unet_cfg_resolution(path: str, vae_cfg: VAEConfig) -> int:
    """Default image side: the UNet's trained latent size times the VAE's down-sampling factor."""
    p = os.path.join(path, "unet", "config.json")
    size = _read_json(p).get("sample_size", 64)
    size = size[0] if isinstance(size, list) and len(size) == 2 and size[0] == size[1] else size  # [h, w] square
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1 << 16:
        raise ModelError(f"{p}: sample_size must be a whole number of latent pixels, got {size!r}")
    return size * 2 ** (len(vae_cfg.ch_mult) - 1)


TINY_RANDOM = "tiny-random"


def load_model(path: str, sampling: bool = True) -> StableDiffusion:
    """Any model minisd reads: a minisd folder, a diffusers folder, or `tiny-random`
    (the TINY preset with seed-0 random weights: it runs anywhere and draws noise-like images).
    `sampling`: refuse scheduler-config keys minisd's samplers would ignore (checks.scheduler_keys); convert.py,
    which only carries them over, passes False."""
    from ..model import is_minisd_folder, load_minisd_folder
    if path == TINY_RANDOM:
        from ..config import TINY
        torch.manual_seed(0)
        return StableDiffusion(TINY)
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            if is_minisd_folder(path):
                model = load_minisd_folder(path)
                sched, where = (model_source(path).get("scheduler") or {}), os.path.join(path, "source.json")
            elif is_diffusers_folder(path):
                model = load_diffusers_folder(path)
                sched, where = model.source["scheduler"], os.path.join(path, "scheduler", "scheduler_config.json")
            else:
                raise ModelError(f"{path}: neither a minisd folder (config.json + {UNET_FILE}) "
                                 "nor a diffusers folder (model_index.json)")
            if sampling and isinstance(sched, dict):
                from .checks import scheduler_keys
                try:
                    scheduler_keys(sched, where)
                except ValueError as e:
                    raise ModelError(str(e)) from None
            return model
        from .images import check_regular
        try:
            check_regular(path)  # a FIFO or a device would block the read
        except ValueError as e:
            raise ModelError(f"{path}: {e}") from None
        from .single_file import load_single_file
        return load_single_file(path)[0]
    except KeyError as e:  # a name table met a tensor it does not know
        raise ModelError(f"{path}: unexpected checkpoint layout ({e.args[0] if e.args else e})") from None
    except ModelError as e:  # name the model where a component's message does not ("unet.safetensors: ...")
        msg = str(e)
        raise ModelError(msg if path in msg else f"{path}: {msg}") from None


def model_source(path: str) -> dict:
    """source.json of a minisd folder ({} if absent): where it was converted from, and its scheduler config."""
    p = os.path.join(path, "source.json")
    return _read_json(p) if os.path.lexists(p) else {}


def with_text_model_prefix(sd: dict) -> dict:
    """Files written by transformers >= 5 drop CLIPTextModel's `text_model.` prefix; older files
    and the single files keep it. Put it back so one name table serves both."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in sd.items()}


# ------------------------------------------------------------------------------------------- a VAE on its own
# Tensors of VAE *training* checkpoints that are not part of the autoencoder (non-pruned .ckpt files).
VAE_IGNORED = ("loss.",       # the discriminator and LPIPS of the VAE's GAN training
               "model_ema.")  # EMA bookkeeping of that training


def read_vae(path: str) -> tuple[dict, dict]:
    """(VAE state dict with our names, {"force_upcast", "scale_factor"} where the source says) of a VAE given on
    its own: a diffusers `vae/` folder (config.json + weights), a diffusers pipeline folder (its vae/), a minisd
    folder (its vae.safetensors), or a single .safetensors / .ckpt file in CompVis names (`encoder.down.0...`,
    e.g. `sdxl_vae.safetensors`), diffusers names, or a whole SD checkpoint (its `first_stage_model.` part)."""
    from ..model import is_minisd_folder
    if os.path.isdir(path):
        if is_diffusers_folder(path):
            path = os.path.join(path, "vae")
        if is_minisd_folder(path):
            vae_cfg = _read_json(os.path.join(path, "config.json")).get("vae", {})
            return read_safetensors(os.path.join(path, VAE_FILE)), {
                "force_upcast": vae_cfg.get("force_upcast"), "scale_factor": vae_cfg.get("scale_factor")}
        d = _read_json(os.path.join(path, "config.json"))
        return vae_from_diffusers(read_weights(path)), {"force_upcast": d.get("force_upcast"),
                                                         "scale_factor": d.get("scaling_factor")}
    from .single_file import VAE, read_checkpoint
    sd, _ = read_checkpoint(path)
    if any(k.startswith(VAE) for k in sd):  # a whole checkpoint: its VAE part
        sd = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    sd = {k: v for k, v in sd.items() if not k.startswith(VAE_IGNORED)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        return vae_from_diffusers(sd), {}
    # some re-saved files store the mid-attention q/k/v/proj_out as Linear [C, C]; ours are 1x1 convs
    return {k: v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v
            for k, v in sd.items()}, {}


def load_vae(model: StableDiffusion, path: str) -> dict:
    """Replace the weights of `model.vae` by the VAE at `path` (see `read_vae`). The architecture stays the model's,
    so the shapes must be equal: a one-line ModelError otherwise. Returns the source's info plus "fp16_safe": its
    config says force_upcast false (as the sdxl-vae-fp16-fix one does), or its name says fp16-fix."""
    if not os.path.exists(path):
        raise ModelError(f"--vae {path}: no such file or folder")
    try:
        sd, info = read_vae(path)
    except KeyError as e:  # the diffusers name table met a tensor it does not know
        raise ModelError(f"--vae {path}: not a VAE of a known layout ({e.args[0] if e.args else e})") from None
    from ..model import load_strict
    load_strict(model.vae, sd, f"--vae {path}")
    name = os.path.basename(os.path.normpath(path)).lower().replace("_", "-")
    info["fp16_safe"] = info.get("force_upcast") is False or "fp16-fix" in name
    return info
