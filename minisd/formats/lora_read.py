"""Read any adapter file people use into minisd names: one reader for every layout (lora_files.py writes them).

Inside minisd an adapter tensor is `<module path in the model>.<suffix>` (adapters/__init__.py). A file names the module
and the tensor in one of these ways; each key is recognised on its own, so a file mixing them (a UNet part from one
tool, a text-encoder part from another) reads too:

    layout      module name                                          suffixes
    minisd      unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q   lora_down.weight lora_up.weight alpha dora_scale
                text_encoders.0.text_model.encoder.layers.0...          hada_w1_a ... lokr_w1 ... (the same in kohya)
    kohya       lora_unet_ + official (SGM) or diffusers UNet path,  lora_down.weight lora_up.weight alpha dora_scale
                "." -> "_"; lora_te_ (SD1/SD2), lora_te1_/lora_te2_    LyCORIS: hada_*, lokr_*
                (SDXL) + HF CLIP path; lycoris_ + a UNet path
    diffusers   unet.<diffusers path>, text_encoder(_2).<HF path>    lora_A.weight lora_B.weight (PEFT),
                (base_model.model. stripped; a bare UNet path is      lora.down.weight lora.up.weight,
                 the UNet: PEFT's own adapter_model.safetensors)      lora_linear_layer.down/up.weight,
                                                                     processor.to_q_lora.down.weight (old attn procs),
                                                                     lora_magnitude_vector(.weight), alpha

Aliases read as their canonical name: `lora_te1_` in a one-encoder model (diffusers' `convert_state_dict_to_kohya`
writes it for SD1), CLIP paths without `text_model` (kohya run with transformers 5 writes `lora_te_encoder_layers_`).

Alpha. kohya and minisd files carry a 0-dim `alpha` per module (0 means rank). diffusers/PEFT files carry none and mean
alpha = rank, unless the safetensors header has `lora_adapter_metadata` (diffusers >= 0.35, SimpleTuner) or a PEFT
`adapter_config.json` lies beside the file: then `lora_alpha`, `alpha_pattern` and `use_rslora` (scale alpha/√r) of
each component are used, as diffusers' loader does.

Anything else is an error naming the first offending key: a module the model lacks (wrong base model, a typo'd
converter), a tensor kind minisd does not compute (Tucker `lora_mid`, full `diff`, OFT, ...), a shape that does not fit.
Nothing is dropped in silence.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..model import ModelError, read_safetensors
from .keys_unet import unet_name_pairs

# adapter tensor suffixes minisd computes with (identical in minisd and kohya files)
OWN_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a",
                "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# diffusers / PEFT spellings -> ours
DOTTED_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                   "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                   "lora_linear_layer.down.weight": "lora_down.weight",
                   "lora_linear_layer.up.weight": "lora_up.weight",
                   "lora_magnitude_vector.weight": "dora_scale", "lora_magnitude_vector": "dora_scale",
                   **{s: s for s in OWN_SUFFIXES}}
# tensor kinds other tools write that minisd has no layer for: named in the error instead of dropped
UNSUPPORTED = {"lora_mid.weight": "LoCon Tucker factor (lora_mid)", "hada_t1": "LoHa Tucker factor",
               "hada_t2": "LoHa Tucker factor", "lokr_t2": "LoKr Tucker factor", "diff": "full weight difference",
               "diff_b": "full bias difference", "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT",
               "on_input": "IA3", "w_norm": "norm-layer adapter",
               "b_norm": "norm-layer adapter", "lora_B.bias": "LoRA bias (PEFT lora_bias)", "a1.weight": "GLoRA",
               "scalar": "LyCORIS scalar"}
OLD_ATTN_PROC = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
# the base model family a file says it was made for (kohya ss_base_model_version / modelspec.architecture)
FAMILY_HINTS = (("stable-diffusion-xl", "sdxl"), ("sdxl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("sd_v2", "sd2"),
                ("sd_2", "sd2"), ("stable-diffusion-v1", "sd1"), ("sd_v1", "sd1"), ("sd_1", "sd1"))


class AdapterError(ModelError):
    """An adapter file that cannot be applied to this model; the message names the file and the first bad key."""


@dataclass
class AdapterFile:
    """A file read into minisd names: {module path: {suffix: tensor}}, plus what else the file said."""
    path: str
    modules: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)      # {module path: rank} where the file records it (minisd metadata)
    metadata: dict = field(default_factory=dict)
    layouts: set = field(default_factory=set)      # {"minisd", "kohya", "diffusers"}

    def kinds(self) -> dict:
        """{adapter kind: number of modules}."""
        out: dict = {}
        for t in self.modules.values():
            k = ("dora" if "dora_scale" in t else "lora") if "lora_down.weight" in t else \
                "loha" if "hada_w1_a" in t else "lokr" if any(s.startswith("lokr") for s in t) else "?"
            out[k] = out.get(k, 0) + 1
        return out


# ------------------------------------------------------------------------------------------------ name tables
def name_table(model) -> dict[str, str]:
    """{module name as files spell it: minisd module path} for every Linear / Conv2d of the UNet and text encoders,
    in all the spellings of the module docstring."""
    table: dict[str, str] = {}
    diff_unet = dict(unet_name_pairs(model.cfg.unet))
    for path, mod in model.unet.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        ours = "unet." + path
        table[ours] = ours
        for name in {path, diff_unet.get(path, path)}:
            table["lora_unet_" + name.replace(".", "_")] = ours
            table["lycoris_" + name.replace(".", "_")] = ours
        if path in diff_unet:
            table["unet." + diff_unet[path]] = ours
    n = len(model.text_encoders)
    for i, te in enumerate(model.text_encoders):
        kohya = ["lora_te"] if n == 1 else [f"lora_te{i + 1}"]
        if n == 1:
            kohya.append("lora_te1")  # diffusers' convert_state_dict_to_kohya names SD1's only encoder te1
        diff = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        for path, mod in te.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            ours = f"text_encoders.{i}.{path}"
            table[ours] = ours
            bare = path[len("text_model."):] if path.startswith("text_model.") else path
            for p in {path, bare, "text_model." + bare}:  # with and without HF's text_model wrapper
                table[f"{diff}.{p}"] = ours
                for k in kohya:
                    table[f"{k}_" + p.replace(".", "_")] = ours
    return table


def split_key(key: str) -> tuple[str, str, str]:
    """(module name, file suffix, layout) of a key, before the module name is looked up."""
    if key.startswith(KOHYA_PREFIXES):
        name, _, suffix = key.partition(".")
        return name, suffix, "kohya"
    m = OLD_ATTN_PROC.match(key)
    if m:  # unet.<path>.attn1.processor.to_q_lora.down.weight -> <path>.attn1.to_q, lora.down.weight
        proc = m.group(2) + (".0" if m.group(2) == "to_out" else "")
        return f"{m.group(1)}.{proc}", f"lora.{m.group(3)}.weight", "diffusers"
    for suffix in sorted(list(DOTTED_SUFFIXES) + list(UNSUPPORTED), key=len, reverse=True):
        if key.endswith("." + suffix):
            name = key[: -len(suffix) - 1]
            layout = "minisd" if name.startswith("text_encoders.") or suffix in OWN_SUFFIXES and \
                not suffix == "alpha" and name.startswith("unet.") else "diffusers"
            return name, suffix, layout
    return key, "", "?"


# ------------------------------------------------------------------------------------------------ alphas
def _peft_configs(path: str, metadata: dict) -> dict[str, dict]:
    """{component ("unet", "text_encoder", ...): PEFT LoraConfig dict} from the header or adapter_config.json."""
    out: dict[str, dict] = {}
    if "lora_adapter_metadata" in metadata:
        try:
            flat = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            raise AdapterError(f"{path}: lora_adapter_metadata is not JSON") from None
        for k, v in flat.items():
            comp, _, opt = k.partition(".")
            out.setdefault(comp, {})[opt] = v
    side = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if os.path.basename(path).startswith("adapter_model") and os.path.isfile(side):
        with open(side) as f:
            out.setdefault("unet", json.load(f))  # PEFT's own save_pretrained of one model (a UNet here)
    return out


def _peft_alpha(cfg: dict, name: str, rank: int) -> float:
    """The alpha PEFT uses for module `name` (component prefix stripped), as an alpha over rank r (rsLoRA folded)."""
    alpha = cfg.get("lora_alpha", rank)
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if name == pat or name.endswith("." + pat) or re.fullmatch(pat, name):
            alpha = a
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # scale alpha/√r written as alpha'/r
    return float(alpha)


# ------------------------------------------------------------------------------------------------ reading
def read_tensors(path: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a .safetensors file, or of a .pt/.ckpt/.bin read with weights_only=True."""
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise AdapterError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        try:
            return read_safetensors(path), meta
        except ModelError as e:
            raise AdapterError(str(e)) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{path}: refused or unreadable file ({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterError(f"{path}: not a state dict of tensors")
    return sd, {}


def file_family(metadata: dict) -> str | None:
    """The model family the file's metadata names, if any."""
    text = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    return next((fam for hint, fam in FAMILY_HINTS if hint in text), None)


def read_adapter_file(model, path: str) -> AdapterFile:
    """Read `path` into minisd names for `model` (not applied). Raises AdapterError on anything it cannot place."""
    sd, meta = read_tensors(path)
    if not sd:
        raise AdapterError(f"{path}: no tensors")
    fam = file_family(meta)
    if fam and fam != model.cfg.family and {fam, model.cfg.family} != {"sd1", "sd2"}:
        raise AdapterError(f"{path}: made for {fam} ({meta.get('modelspec.architecture') or meta.get('ss_base_model_version')}), "
                           f"the model is {model.cfg.family}")
    table = name_table(model)
    out = AdapterFile(path, metadata=meta)
    layout = json.loads(meta.get("minisd.adapter", "{}"))
    out.ranks = {p: kr[1] for p, kr in layout.items()}
    peft = _peft_configs(path, meta)
    names: dict[str, tuple[str, str]] = {}  # {minisd path: (diffusers component, name inside it)}
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in sd):
        raise AdapterError(f"{path}: a full model checkpoint, not an adapter file (use --model)")
    for key, t in sd.items():
        name, suffix, kind = split_key(key)
        if key.startswith("bundle_emb."):
            raise AdapterError(f"{path}: {key}: textual-inversion embeddings bundled in a LoRA file are not read "
                               "(pass them with --embedding)")
        if suffix in UNSUPPORTED and not (kind == "kohya" and suffix in OWN_SUFFIXES):
            raise AdapterError(f"{path}: {key}: {UNSUPPORTED[suffix]} is not supported by minisd")
        if kind == "kohya" and suffix not in OWN_SUFFIXES:
            raise AdapterError(f"{path}: {key}: unknown adapter tensor '.{suffix}'")
        if kind == "?":
            raise AdapterError(f"{path}: {key}: not an adapter tensor name")
        stripped = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        ours = table.get(stripped) or table.get("unet." + stripped)  # PEFT adapter of a bare UNet
        if ours is None:
            raise AdapterError(f"{path}: {key}: names no module of this {model.cfg.family} model "
                               "(a file for another base model?)")
        out.layouts.add(kind)
        out.modules.setdefault(ours, {})[DOTTED_SUFFIXES.get(suffix, suffix)] = t
        if kind == "diffusers":
            comp, _, inner = stripped.partition(".")
            if comp not in ("unet", "text_encoder", "text_encoder_2"):
                comp, inner = "unet", stripped  # PEFT's adapter of a bare UNet
            names[ours] = (comp, inner)
    for ours, group in out.modules.items():
        if ours in names and "alpha" not in group and "lora_down.weight" in group and peft.get(names[ours][0]):
            # no alpha tensor: from the PEFT config if any, else alpha = rank (diffusers; _load_layer fills it)
            comp, inner = names[ours]
            group["alpha"] = torch.tensor(_peft_alpha(peft[comp], inner, group["lora_down.weight"].shape[0]))
        if "lora_down.weight" in group and "lora_up.weight" not in group or \
                "lora_up.weight" in group and "lora_down.weight" not in group:
            raise AdapterError(f"{path}: {ours}: a LoRA needs both its down and up matrices (truncated file?)")
    return out
