"""Appendix: adapter machinery (the layers themselves: lora.py, and lycoris.py here for LoHa / LoKr).

Put adapters into any model, and take them out again: injection by module-name patterns, merge/unmerge,
multipliers, weighted mixing of several adapters, SVD extraction of a LoRA from two models, safetensors save/load.

Works on any nn.Module tree of nn.Linear / nn.Conv2d; nothing here knows about the UNet or the text encoders.

Naming. An adapted layer keeps its module path and its `weight`/`bias`, and its adapter tensors sit beside them:
`<path>.lora_down.weight`, `<path>.lora_up.weight`, `<path>.alpha`, `<path>.dora_scale`, `<path>.hada_w1_a`, ...,
`<path>.lokr_w1`, .... An adapter state dict is exactly those entries, so exporting to kohya is a rename of `<path>`
(`lora_unet_` + path with `.` -> `_`) and to diffusers/PEFT a rename of the suffixes (lora_down -> lora_A, ...).
The base state dict still loads after injection: `load_state_dict(base_sd, strict=False)` reports only adapter keys
as missing (see `split_missing`).

Patterns (`targets`, `exclude`): a module path matches a pattern if it equals it, ends with "." + pattern (PEFT's
list semantics: "attn1.to_q", "ff.net.2"), or matches it as a full regular expression (r".*attn\\d\\.to_(q|k|v)").
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open, save_file

from ..lora import AdapterLayer, LoRAConv2d, LoRALinear, lora_from_tensors
from .lycoris import (LoHaConv2d, LoHaLinear, LoKrConv2d, LoKrLinear, loha_from_tensors, lokr_from_tensors,
                      portable_tensors)

# kind -> (class for nn.Linear, class for nn.Conv2d, extra constructor kwargs)
KINDS = {
    "lora": (LoRALinear, LoRAConv2d, {}),
    "dora": (LoRALinear, LoRAConv2d, {"dora": True}),
    "loha": (LoHaLinear, LoHaConv2d, {}),
    "lokr": (LoKrLinear, LoKrConv2d, {}),
}

# every suffix an adapter tensor can have, to split "<path>.<suffix>" keys; longest first so "lora_down.weight" wins
SUFFIXES = sorted(["lora_down.weight", "lora_up.weight", "alpha", "dora_scale",
                   "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"], key=len, reverse=True)


# ------------------------------------------------------------------------------------------- finding modules
def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if name == pat or name.endswith("." + pat):
            return True
        try:
            if re.fullmatch(pat, name):
                return True
        except re.error:  # a literal name that is not a valid regex
            pass
    return False


def find_modules(model: nn.Module, targets: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Paths of the plain nn.Linear / nn.Conv2d modules (not yet adapted) selected by the patterns;
    targets=None selects all of them."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or isinstance(mod, AdapterLayer):
            continue
        if (targets is None or _matches(name, targets)) and not _matches(name, exclude):
            names.append(name)
    return names


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(path, layer) for every adapted layer."""
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLayer):
            yield name, mod


# ------------------------------------------------------------------------------------------- inject / remove
def inject(model: nn.Module, kind: str = "lora", targets: Sequence[str] | None = None, exclude: Sequence[str] = (),
           rank: int = 4, alpha: float | None = None, conv_rank: int | None = None, conv_alpha: float | None = None,
           **kwargs) -> list[str]:
    """Replace the selected Linear/Conv2d layers by adapter layers of `kind` ("lora", "dora", "loha", "lokr") in place.

    `rank`/`alpha` apply to Linear and 1x1 conv layers; `conv_rank`/`conv_alpha` (kohya's conv_dim/conv_alpha) to
    convolutions with a larger kernel, which are skipped when conv_rank is None. Other keyword arguments go to the
    layer class (init, dropout, rank_dropout, module_dropout, multiplier, dtype, factor, decompose_both, ...).
    The base weights are frozen; nothing else changes requires_grad (see `freeze_base`). Returns the paths.

    Targets that adapt nothing are a ValueError, never a silent no-op: a pattern list written for another network
    (CLIP names on LDMBert, say) would otherwise train nothing while looking like it trained.
    """
    lin_cls, conv_cls, extra = KINDS[kind]
    done, skipped = [], []
    for name in find_modules(model, targets, exclude):
        base = model.get_submodule(name)
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
            if conv_rank is None:
                skipped.append(name)
                continue
            layer = conv_cls(base, conv_rank, conv_alpha, **extra, **kwargs)
        else:
            cls = conv_cls if isinstance(base, nn.Conv2d) else lin_cls
            layer = cls(base, rank, alpha, **extra, **kwargs)
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.requires_grad_(False)
        _set_module(model, name, layer)
        done.append(name)
    if not done:
        why = (f"only {len(skipped)} convolution(s) larger than 1x1, which need conv_rank" if skipped else
               "no plain Linear / Conv2d layer (already adapted ones are not re-selected)")
        raise ValueError(f"adapter targets {list(targets) if targets is not None else 'all'} match {why} in "
                         f"{type(model).__name__}")
    return done


def remove(model: nn.Module, merge: bool = False) -> list[str]:
    """Turn every adapted layer back into its plain base layer (merging the adapter first if `merge`)."""
    names = []
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(model, name, layer.to_base())
        names.append(name)
    return names


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter Parameters (what the optimizer gets)."""
    return [p for _, layer in adapter_layers(model) for p in layer.adapter_state_dict().values()
            if isinstance(p, nn.Parameter)]


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter except the adapters' (which get requires_grad=True)."""
    model.requires_grad_(False)
    for p in adapter_parameters(model):
        p.requires_grad_(True)


def split_missing(model: nn.Module, missing: Iterable[str]) -> list[str]:
    """The keys in `missing` (from load_state_dict(strict=False)) that are NOT adapter tensors, i.e. real gaps."""
    adapter = set(adapter_state_dict(model))
    return [k for k in missing if k not in adapter]


# ------------------------------------------------------------------------------------------- scale / merge
def set_scale(model: nn.Module, multiplier: float) -> None:
    """Set the multiplier ("strength") of every adapter."""
    for _, layer in adapter_layers(model):
        layer.set_scale(multiplier)


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (fast inference, same outputs)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge` (the base weights come back up to fp32 round-off)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


# ------------------------------------------------------------------------------------------- state dicts / files
def adapter_state_dict(model: nn.Module, dtype: torch.dtype | None = None, portable: bool = False
                       ) -> dict[str, torch.Tensor]:
    """{"<path>.<suffix>": tensor} of every adapter (detached; cast to `dtype` if given). portable: the tensors as a
    file holds them (`lycoris.portable_tensors`: a full-factor LoKr's scale folded in), for files; False keeps the
    trained parameters as they are, for checkpoints."""
    out = {}
    for name, layer in adapter_layers(model):
        prefix = name + "." if name else ""
        for k, v in (portable_tensors(layer) if portable else layer.adapter_state_dict()).items():
            v = v.detach()
            out[prefix + k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def group_by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split "<path>.<suffix>" keys into {path: {suffix: tensor}}; raises on a key with an unknown suffix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in SUFFIXES if key == s or key.endswith("." + s)), None)
        if suffix is None:
            raise KeyError(f"not an adapter tensor name: {key}")
        groups.setdefault(key[: -len(suffix)].rstrip("."), {})[suffix] = value
    return groups


def layer_from_tensors(base: nn.Module, tensors: dict[str, torch.Tensor], rank: float | None = None) -> AdapterLayer:
    """An adapter layer around `base` whose kind and shapes are read from `tensors` ({suffix: tensor}), loaded.
    `rank` is needed only by a LoKr whose factors are both full (its tensors do not show the rank)."""
    if "lora_down.weight" in tensors:
        layer = lora_from_tensors(base, tensors)
    elif "hada_w1_a" in tensors:
        layer = loha_from_tensors(base, tensors)
    elif "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        layer = lokr_from_tensors(base, tensors, rank)
    else:
        raise KeyError(f"cannot tell the adapter kind from {sorted(tensors)}")
    _load_layer(layer, tensors)
    return layer


def _load_layer(layer: AdapterLayer, tensors: dict[str, torch.Tensor]) -> None:
    tensors = dict(tensors)
    if float(tensors.get("alpha", 0.0)) == 0.0:
        # kohya: alpha 0 means alpha = rank; diffusers files carry no alpha at all, which means the same
        tensors["alpha"] = torch.tensor(float(layer.rank))
    own = layer.adapter_state_dict()
    if set(own) != set(tensors):
        raise ValueError(f"{layer.kind} layer has {sorted(own)}, the tensors are {sorted(tensors)}")
    with torch.no_grad():
        for k, v in tensors.items():
            if v.numel() != own[k].numel():
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(own[k].shape)}")
            own[k].copy_(v.reshape(own[k].shape))  # keeps our dtype/device; accepts [out] for a [out, 1] dora_scale


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], inject: bool = True,
                            ranks: dict[str, float] | None = None) -> list[str]:
    """Load adapter tensors into `model`. Layers already adapted are loaded in place (their kind and shapes must match);
    plain Linear/Conv2d layers get a new adapter layer built from the tensors when `inject` is true (`ranks`: {path:
    rank}, see `layer_from_tensors`). Every tensor must find its layer (an unknown module path is an error).
    Returns the paths loaded."""
    loaded = []
    for path, tensors in group_by_module(state_dict).items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise KeyError(f"adapter for {path!r}, which is not a module of the model") from None
        if isinstance(mod, AdapterLayer):
            _load_layer(mod, tensors)
        elif inject and isinstance(mod, (nn.Linear, nn.Conv2d)):
            layer = layer_from_tensors(mod, tensors, (ranks or {}).get(path))
            mod.weight.requires_grad_(False)
            _set_module(model, path, layer)
        else:
            raise KeyError(f"{path!r} is a {type(mod).__name__}, not an adapted layer (pass inject=True?)")
        loaded.append(path)
    return loaded


def save_adapter(model: nn.Module, path: str, metadata: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """Write the adapter tensors to a .safetensors file. `metadata` values that are not strings are stored as JSON;
    `minisd.adapter` records {path: [kind, rank]} so a reader knows what each module holds."""
    sd = {k: v.contiguous() for k, v in adapter_state_dict(model, dtype, portable=True).items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    layers = dict(adapter_layers(model))
    meta["minisd.adapter"] = json.dumps({name: [layer.kind, layer.rank] for name, layer in layers.items()})
    save_file(sd, path, metadata=meta)


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors adapter file."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(path), meta


def load_adapter(model: nn.Module, path: str, inject: bool = True) -> dict[str, str]:
    """`load_adapter_state_dict` from a .safetensors file; returns the file's metadata."""
    sd, meta = read_adapter(path)
    layout = json.loads(meta.get("minisd.adapter", "{}"))
    load_adapter_state_dict(model, sd, inject=inject, ranks={p: kind_rank[1] for p, kind_rank in layout.items()})
    return meta


# ------------------------------------------------------------------------------------------- mixing / extraction
@torch.no_grad()
def merge_adapters(model: nn.Module, adapters: Sequence[tuple[dict | str, float]]) -> list[str]:
    """Bake several adapters into the base weights with weights w_i:  W <- W + Σ_i w_i ΔW_i.

    Each ΔW_i is computed against the original W (DoRA's ΔW depends on W), and all are added at the end. `adapters` is
    a list of (state dict or .safetensors path, weight). The model must hold plain (not adapted) layers at those paths.
    Returns the paths changed."""
    total: dict[str, torch.Tensor] = {}
    for source, weight in adapters:
        sd = read_adapter(source)[0] if isinstance(source, str) else source
        for path, tensors in group_by_module(sd).items():
            base = model.get_submodule(path)
            layer = layer_from_tensors(base, tensors)
            layer.set_scale(weight)
            delta = layer.weight_delta().float()
            total[path] = total[path] + delta if path in total else delta
    for path, delta in total.items():
        w = model.get_submodule(path).weight
        w.add_(delta.to(w.dtype))
    return list(total)


@torch.no_grad()
def extract_lora(base: nn.Module, tuned: nn.Module, rank: int, targets: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), conv_rank: int | None = None, min_diff: float = 0.0
                 ) -> dict[str, torch.Tensor]:
    """A LoRA state dict approximating tuned - base, layer by layer, by truncated SVD.

    For D = W_tuned - W_base flattened to [out, in·kh·kw] with SVD D = U S Vᵀ, keep the top r singular triplets:
    up = U_r √S_r, down = √S_r V_rᵀ (the split is balanced so both factors have equal norms, a good start for further
    training), alpha = r (scale 1). By Eckart-Young, up·down is the best rank-r approximation of D in Frobenius and
    spectral norm; r = min(out, in) reproduces D exactly. Convs with a kernel > 1 use `conv_rank` (None: skipped).
    Layers whose max |D| ≤ min_diff are left out."""
    out = {}
    tuned_modules = dict(tuned.named_modules())
    for name in find_modules(base, targets, exclude):
        b, t = base.get_submodule(name), tuned_modules.get(name)
        if t is None:
            continue
        r = conv_rank if isinstance(b, nn.Conv2d) and b.kernel_size != (1, 1) else rank
        diff = (t.weight.float() - b.weight.float()).flatten(1)
        if r is None or diff.abs().max() <= min_diff:
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(r, s.numel())
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        if isinstance(b, nn.Conv2d):
            up, down = up[:, :, None, None], down.reshape(r, *b.weight.shape[1:])
        prefix = name + "." if name else ""
        out[prefix + "lora_down.weight"] = down.contiguous()
        out[prefix + "lora_up.weight"] = up.contiguous()
        out[prefix + "alpha"] = torch.tensor(float(r))
    return out
