"""LoRA files in the layouts other tools read: kohya (A1111, ComfyUI, kohya sd-scripts) and diffusers / PEFT.

Inside minisd an adapter tensor is named after the module it adapts, in the whole model:
`unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight`,
`text_encoders.0.text_model.encoder.layers.0.self_attn.q_proj.alpha` (see adapters.py). Exporting is renaming:

kohya     lora_unet_ + official (CompVis / SGM) module path with "." -> "_"
              lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   [r, in]
              ....lora_up.weight [out, r],  ....alpha (0-dim, scale = alpha / r),  ....dora_scale (DoRA)
          text encoders: lora_te_ (SD1/SD2) or lora_te1_ / lora_te2_ (SDXL) + the HF CLIP path
              lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
          (naming="diffusers": lora_unet_ + the diffusers UNet path instead; that is what kohya writes for SD1.x/SD2.x
           and our default there, see `default_naming`; A1111 and ComfyUI read both.)
          LoHa / LoKr keep their LyCORIS suffixes (hada_w1_a, lokr_w1...).
diffusers unet.<diffusers module path>.lora_A.weight / .lora_B.weight, text_encoder(_2).<HF path>...,
          DoRA magnitude `.lora_magnitude_vector` [out]. These files carry no alpha (readers assume alpha = rank),
          so the scale alpha/r is folded into lora_B on export: B' = (alpha/r)·B gives the same update.
          LoRA and DoRA only.

Training metadata goes to the safetensors header (ss_* keys as kohya names them, plus modelspec.architecture).

DoRA in kohya files: `dora_scale` is the magnitude per *output* channel, shape [out, 1] (conv [out, 1, 1, 1]), of
W + (alpha/r)·B A - LyCORIS' default axis, and exactly PEFT's `lora_magnitude_vector` (ComfyUI picks the axis by
shape; older ComfyUI / Forge code that always normalises over the input axis misreads it). diffusers 0.42
`load_lora_weights` *drops* every `dora_scale` key (with a warning) and applies such a file as plain LoRA; for
diffusers write the diffusers format (`save_diffusers`), which keeps the magnitude. Pinned in
tests/test_lora_formats.py.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open, save_file

from .. import adapters
from ..model import text_encoder_name
from .keys_unet import unet_name_pairs

ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
        "ldm": "ldm-256"}


def _te_prefixes(model) -> list[tuple[str, str, str]]:
    """(minisd prefix, kohya prefix, diffusers prefix) of each text encoder."""
    n = len(model.text_encoders)
    kohya = ["lora_te"] if n == 1 else [f"lora_te{i + 1}" for i in range(n)]
    diff = [text_encoder_name(i) for i in range(n)]
    return [(f"text_encoders.{i}.", kohya[i], diff[i]) for i in range(n)]


def _te_path(path: str) -> str:
    """The canonical HF path with the `text_model.` wrapper (kohya / ComfyUI expect it whatever transformers does)."""
    return path if path.startswith("text_model.") else "text_model." + path


def module_names(model, style: str, naming: str = "sgm") -> dict[str, str]:
    """{minisd module path: name in the file format} for every Linear/Conv2d of the UNet and text encoders.
    style "kohya" gives lora names without suffix; "diffusers" gives dotted module paths with a component prefix."""
    out = {}
    diff_unet = dict(unet_name_pairs(model.cfg.unet))
    for path, mod in model.unet.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if style == "kohya":
            name = diff_unet.get(path, path) if naming == "diffusers" else path
            out["unet." + path] = "lora_unet_" + name.replace(".", "_")
        elif path in diff_unet:
            out["unet." + path] = "unet." + diff_unet[path]
    for ours, kohya, diff in _te_prefixes(model):
        te = model.get_submodule(ours.rstrip("."))
        for path, mod in te.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                p = _te_path(path)
                out[ours + path] = f"{kohya}_" + p.replace(".", "_") if style == "kohya" else f"{diff}.{p}"
    return out


def _metadata(model, metadata: dict | None) -> dict:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.setdefault("modelspec.architecture", ARCH.get(model.cfg.family, model.cfg.family) + "/lora")
    meta.setdefault("ss_network_module", "networks.lora")
    return meta


# ----------------------------------------------------------------------------------------------- kohya
def default_naming(model) -> str:
    """What kohya sd-scripts itself writes: diffusers UNet paths for SD1.x/SD2.x, SGM (official) paths for SDXL.
    diffusers' loader mis-maps SGM-named SD1 files (`_maybe_map_sgm_blocks_to_diffusers` assumes the SDXL block
    layout), so SD1/SD2 files keep the diffusers names that every reader accepts."""
    return "sgm" if model.cfg.unet.adm_in_channels else "diffusers"


def to_kohya(model, naming: str | None = None) -> dict[str, torch.Tensor]:
    """The model's adapters as a kohya state dict (suffixes unchanged: lora_down.weight, alpha, dora_scale, ...).
    naming: "sgm" (official module paths), "diffusers", or None for `default_naming`."""
    naming = naming or default_naming(model)
    names = module_names(model, "kohya", naming)
    out = {}
    for path, tensors in adapters.group_by_module(adapters.adapter_state_dict(model, portable=True)).items():
        for suffix, t in tensors.items():
            if suffix == "alpha":
                t = t.float()  # 0-dim float tensor, as kohya writes it (diffusers' int64 alphas confuse readers)
            out[f"{names[path]}.{suffix}"] = t.contiguous()
    return out


def save_kohya(model, path: str, metadata: dict | None = None, naming: str | None = None) -> None:
    save_file(to_kohya(model, naming), path, metadata=_metadata(model, metadata))


def from_kohya(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya state dict (either UNet naming) renamed to minisd adapter names for `model`."""
    inverse = {v: k for k, v in module_names(model, "kohya", "sgm").items()}
    inverse.update({v: k for k, v in module_names(model, "kohya", "diffusers").items()})
    out = {}
    for key, t in sd.items():
        name, _, suffix = key.partition(".")
        if name not in inverse:
            raise KeyError(f"kohya key {key!r} names no module of this model")
        out[f"{inverse[name]}.{suffix}"] = t
    return out


def load_kohya(model, path: str) -> dict[str, str]:
    """Inject and load a kohya LoRA file into `model`; returns its metadata."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    adapters.load_adapter_state_dict(model, from_kohya(model, load_file(path)), inject=True)
    return meta


# ----------------------------------------------------------------------------------------------- diffusers / PEFT
def to_diffusers(model) -> dict[str, torch.Tensor]:
    """The model's LoRA / DoRA adapters in diffusers/PEFT names, alpha/r folded into lora_B."""
    names = module_names(model, "diffusers")
    out = {}
    for path, layer_name in ((p, names[p]) for p, _ in _adapted(model)):
        layer = model.get_submodule(path)
        if layer.kind not in ("lora", "dora"):
            raise ValueError(f"{path}: {layer.kind} has no diffusers/PEFT file layout (use the kohya format)")
        sd = layer.adapter_state_dict()
        scale = float(layer.scale) if not torch.is_tensor(layer.scale) else layer.scale.item()
        out[f"{layer_name}.lora_A.weight"] = sd["lora_down.weight"].detach().contiguous()
        out[f"{layer_name}.lora_B.weight"] = (sd["lora_up.weight"].detach() * scale).contiguous()
        if "dora_scale" in sd:  # PEFT: [out] for Linear, [1, out, 1, 1] for Conv2d
            mag = sd["dora_scale"].detach().reshape(-1)
            mag = mag.reshape(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else mag
            out[f"{layer_name}.lora_magnitude_vector"] = mag.contiguous()
    return out


def _adapted(model):
    return [(name, layer) for name, layer in adapters.adapter_layers(model)]


def save_diffusers(model, path: str, metadata: dict | None = None) -> None:
    save_file(to_diffusers(model), path, metadata=_metadata(model, metadata))


def from_diffusers(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT state dict renamed to minisd adapter names (alpha = rank, as those files mean)."""
    inverse = {v: k for k, v in module_names(model, "diffusers").items()}
    suffixes = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}
    out = {}
    for key, t in sd.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        name = key[: -len(suffix) - 1] if suffix else None
        if name not in inverse:
            raise KeyError(f"diffusers key {key!r} names no module of this model")
        out[f"{inverse[name]}.{suffixes[suffix]}"] = t
    return out


def load_diffusers(model, path: str) -> None:
    adapters.load_adapter_state_dict(model, from_diffusers(model, load_file(path)), inject=True)


# ----------------------------------------------------------------------------------------------- DoRA portability
def dora_warning(model, fmt: str = "lora-kohya") -> str | None:
    """A one-line warning when `model` holds DoRA layers: every other reader applies them differently (README, "DoRA
    in other tools", measured there); None without DoRA."""
    n = sum(1 for _, layer in adapters.adapter_layers(model) if getattr(layer, "dora", False))
    if not n:
        return None
    who = ("diffusers' load_lora_weights drops dora_scale (plain LoRA), ComfyUI normalises by the base weight, "
           "A1111 1.10 per input column" if fmt == "lora-kohya" else
           "diffusers skips the text-encoder magnitudes of this layout")
    return (f"{n} DoRA layers: no other tool applies them as trained ({who}); ship merged weights for exact results "
            "(convert.py MODEL --lora FILE --to single-file OUT)")
