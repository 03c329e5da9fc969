"""Official single-file checkpoints (`.safetensors` / `.ckpt`) in and out: the tracing table.

Every tensor of an official file is either routed to one minisd component by a prefix strip, or
ignored for a stated reason. After the strip the names ARE our module paths (the networks use the
official attribute names), except OpenCLIP towers, whose one real rename lives in keys_text.py.

    family  prefix                                   -> component       table
    all     model.diffusion_model.                   -> unet            (identity)
    all     first_stage_model.                       -> vae             (identity; 2-D attention weights reshaped)
    sd1     cond_stage_model.transformer.            -> text_encoder    HF CLIP names
    sd2     cond_stage_model.model.                  -> text_encoder    OpenCLIP -> CLIP (keys_text)
    sdxl    conditioner.embedders.0.transformer.     -> text_encoder    HF CLIP names
    sdxl    conditioner.embedders.1.model.           -> text_encoder_2  OpenCLIP -> CLIP (keys_text)
    ldm     cond_stage_model.                        -> text_encoder    LDMBert, CompVis names
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import torch

from ..config import LDM_256, SD2_BASE, SD2_V, SD15, SDXL_BASE, ModelConfig
from .keys_text import clip_from_hf, clip_from_openclip, clip_to_openclip, openclip_pairs, qkv_pairs
from ..model import UNET_FILE, VAE_FILE, ModelError, read_safetensors, text_encoder_file, text_encoder_name
from .rename import check_names

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
    "ldm": ["cond_stage_model."],
}
PRESETS = {"sd1": SD15, "sd2": SD2_V, "sdxl": SDXL_BASE, "ldm": LDM_256}

# The DDPM schedule that CompVis stores as buffers is recomputed from the config (schedule.py).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
IGNORED = {
    **{k: "DDPM schedule buffer; recomputed from the config" for k in SCHEDULE_BUFFERS},
    "model_ema.decay": "EMA bookkeeping scalar",
    "model_ema.num_updates": "EMA bookkeeping scalar",
    "denoiser.sigmas": "sgm sigma table; recomputed from the schedule",
    "logvar": "learned-logvar buffer of LatentDiffusion; unused at inference",
}


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(state dict, extras such as global_step) of a .safetensors or .ckpt file.

    `.ckpt` files are pickles: loaded with `weights_only=True`, so a pickle that would run code is
    refused, never executed."""
    if not os.path.isfile(path):
        raise ModelError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return sd, dict(f.metadata() or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found or "weights_only" in msg or "Unsupported" in msg:
            what = f"it calls {found.group(1)}" if found else "it references objects that are not tensors"
            raise ModelError(f"{path}: refused: loading this pickle would run code ({what})") from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: not a checkpoint (a pickled {type(obj).__name__})")
    sd = obj.get("state_dict", obj)
    extras = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, torch.Tensor)}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path}: not a checkpoint (its state_dict holds non-tensors)")
    return sd, extras


def detect_family(sd: dict) -> str | None:
    """The family from the keys alone (see the module table)."""
    if "conditioner.embedders.1.model.ln_final.weight" in sd:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.attn_layers.") for k in sd):
        return "ldm"
    if any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd):
        return "sd1"
    return None


def describe_foreign(sd: dict) -> str:
    """Why a file that is not a full model is not one, in a few words."""
    keys = list(sd)
    if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        return "a LoRA/adapter file, not a full model"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not any(k.startswith(UNET) for k in keys):
        return "a VAE-only file, not a full model"
    if not any(k.startswith(UNET) for k in keys):
        return f"no UNet tensors ('{UNET}*'): not a Stable Diffusion checkpoint"
    return "no text encoder of a known layout"


def ema_name(unet_key: str) -> str:
    """Name of the EMA copy of a UNet tensor in full SD1/SD2 files: dots removed (LitEma buffers)."""
    return "model_ema.diffusion_model" + unet_key.replace(".", "")


@dataclasses.dataclass
class Split:
    """Result of routing one file: component state dicts plus the explanation of every source key."""
    family: str
    components: dict              # {"unet": sd, "vae": sd, "text_encoder": sd, ...}
    trace: list                   # [(source key, "component.param" or "ignored: reason")]
    ema_used: bool
    extras: dict                  # ignored tensors kept verbatim, so export can rebuild the file exactly


def split_checkpoint(sd: dict, family: str, cfg: ModelConfig, ema: bool | None = None) -> Split:
    """Route every tensor of an official single file to a component, or ignore it with a reason."""
    comps = {"unet": {}, "vae": {}}
    trace = []
    ema_keys = {k for k in sd if k.startswith("model_ema.") and k not in IGNORED}
    use_ema = bool(ema_keys) if ema is None else (ema and bool(ema_keys))
    if ema and not ema_keys:
        raise ModelError("--ema asked for, but the file holds no EMA weights")
    text_prefixes = TEXT_PREFIXES[family]
    text_raw = [{} for _ in text_prefixes]
    extras, unrouted = {}, []
    for k, v in sd.items():
        if k in IGNORED:
            trace.append((k, f"ignored: {IGNORED[k]}"))
            extras[k] = v
        elif k in ema_keys:
            trace.append((k, "unet (EMA copy)" if use_ema else "ignored: EMA copy (--ema to use it)"))
        elif k.startswith(UNET):
            comps["unet"][k[len(UNET):]] = v
            trace.append((k, "unet." + k[len(UNET):]))
        elif k.startswith(VAE):
            name = k[len(VAE):]
            # Some re-saved files store the VAE mid-attention as Linear [C,C]; ours are 1x1 convs.
            if ".attn_1." in name and name.endswith("weight") and v.ndim == 2:
                v = v[:, :, None, None]
            comps["vae"][name] = v
            trace.append((k, "vae." + name))
        else:
            for i, p in enumerate(text_prefixes):
                if k.startswith(p):
                    text_raw[i][k[len(p):]] = v
                    break
            else:
                unrouted.append(k)
    check_names(f"a {family} checkpoint", unexpected=unrouted, error=ModelError)
    if use_ema:
        check_names("EMA copies of the UNet", missing=[ema_name(n) for n in comps["unet"] if ema_name(n) not in sd],
                    error=ModelError)
        for name in list(comps["unet"]):
            comps["unet"][name] = sd[ema_name(name)]
    for i, (p, raw) in enumerate(zip(text_prefixes, text_raw)):
        comp = text_encoder_name(i)
        tcfg = cfg.text_encoders[i]
        if family == "ldm":
            out, ignored = raw, {}
        elif p.endswith(".model."):
            out, ignored = clip_from_openclip(raw, tcfg)
        else:
            out, ignored = clip_from_hf(raw)
        for name, why in ignored.items():
            trace.append((p + name, f"ignored: {why}"))
            extras[p + name] = raw[name]
        comps[comp] = out
        trace += text_trace(raw, ignored, p, comp, tcfg, openclip=p.endswith(".model."))
    return Split(family, comps, trace, use_ema, extras)


def text_trace(raw: dict, ignored: dict, prefix: str, comp: str, tcfg, openclip: bool) -> list:
    """(source key, destination) for every consumed text-encoder tensor."""
    if not openclip:   # HF CLIP / LDMBert: the names are ours already
        return [(prefix + k, f"{comp}.{k}") for k in raw if k not in ignored]
    out = [(prefix + theirs, f"{comp}.{ours}") for ours, theirs in openclip_pairs(tcfg)]
    for ours, fused in qkv_pairs(tcfg):
        for p in ("weight", "bias"):
            out.append((f"{prefix}{fused}_{p}", ", ".join(f"{comp}.{o}.{p}" for o in ours) + " (split q, k, v)"))
    if tcfg.projection_dim:
        out.append((prefix + "text_projection", f"{comp}.text_projection.weight (transposed)"))
    return out


def config_for(family: str, sd: dict, prediction: str | None) -> ModelConfig:
    """The preset of the family, with what the shapes tell (UNet in/out channels) and the prediction type.

    SD2 files hold no hint of v-prediction; as diffusers' converter does, a 768-v model is assumed
    unless the caller says `--prediction eps` (the 512 base model), since the keys are identical."""
    cfg = PRESETS[family]
    w_in = sd.get(UNET + "input_blocks.0.0.weight")
    w_out = sd.get(UNET + "out.2.weight")
    unet = dataclasses.replace(cfg.unet, in_channels=int(w_in.shape[1]) if w_in is not None else 4,
                               out_channels=int(w_out.shape[0]) if w_out is not None else 4)
    cfg = dataclasses.replace(cfg, unet=unet)
    if family == "sd2" and prediction == "eps":
        cfg = dataclasses.replace(SD2_BASE, unet=unet)
    elif prediction is not None:
        pt = {"eps": "epsilon", "v": "v_prediction"}[prediction]
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, prediction_type=pt),
                                  resolution=768 if (family == "sd2" and pt == "v_prediction") else cfg.resolution)
    return cfg


def join_checkpoint(components: dict, family: str, cfg: ModelConfig, extras: dict | None = None) -> dict:
    """The inverse: minisd component state dicts (+ the ignored tensors kept at conversion) ->
    one official single-file state dict."""
    out = dict(extras or {})
    out.update({UNET + k: v for k, v in components["unet"].items()})
    out.update({VAE + k: v for k, v in components["vae"].items()})
    for i, p in enumerate(TEXT_PREFIXES[family]):
        comp = text_encoder_name(i)
        sd = components[comp]
        if p.endswith(".model."):
            sd = clip_to_openclip(sd, cfg.text_encoders[i])
        out.update({p + k: v for k, v in sd.items()})
    return out


def load_single_file(path: str, family: str | None = None, prediction: str | None = None,
                     ema: bool | None = None):
    """(StableDiffusion, Split) from an official single file, converted in memory."""
    from ..model import StableDiffusion, empty_weights
    sd, info = read_checkpoint(path)
    fam = detect_family(sd)
    if fam is None:
        raise ModelError(f"{path}: {describe_foreign(sd)}")
    if family not in (None, "auto") and family != fam:
        raise ModelError(f"{path}: keys say {fam}, but --family {family} was given")
    if "minisd_config" in info:   # a file minisd exported carries its exact architecture
        try:  # metadata is input too: one line naming the file and the field
            cfg = ModelConfig.from_dict(json.loads(info["minisd_config"]))
        except RecursionError:
            raise ModelError(f"{path}: metadata minisd_config: nested too deeply") from None
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(f"{path}: metadata minisd_config: {e}") from None
    else:
        cfg = config_for(fam, sd, prediction)
    split = split_checkpoint(sd, fam, cfg, ema=ema)
    with empty_weights():
        model = StableDiffusion(cfg)
    files = {UNET_FILE: split.components["unet"], VAE_FILE: split.components["vae"]}
    for i in range(len(cfg.text_encoders)):
        files[text_encoder_file(i)] = split.components[text_encoder_name(i)]
    model.load_components(files)  # keeps the source dtype (an fp16 file stays fp16)
    model.extras = split.extras
    model.source = {"format": "single-file", "source": os.path.basename(path), "ema_used": split.ema_used}
    model.trace = split.trace
    model.n_source = len(sd)
    return model, split
