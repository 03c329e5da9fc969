"""Hypernetworks, the NovelAI method as AUTOMATIC1111's webui defines it: small MLPs that rewrite the *inputs* of the
keys and values of the UNet's attention layers, the UNet and text encoder untouched.

Port marker: AUTOMATIC1111/stable-diffusion-webui `modules/hypernetworks/hypernetwork.py` (commit 3157fe28),
`HypernetworkModule`, `Hypernetwork`, `apply_single_hypernetwork`, `attention_CrossAttention_forward`.

For every width d the network is enabled for (A1111's "enable sizes"), two MLPs, one for the keys, one for the values:

    K = to_k(c_k),  V = to_v(c_v),  Q = to_q(x) unchanged
    c_k = c + s · MLP_k(c),   c_v = c + s · MLP_v(c)          the residual form of A1111's `forward`

where c (B, T, d) is whatever the attention layer computes keys and values from: the text context in cross-attention
(attn2: d = the context width, 768 for SD1), and - as in A1111, which patches every CrossAttention - the pixel tokens
in self-attention (attn1) when d equals a block width (320, 640, 1280 for SD1) and that width is enabled. The
strength s multiplies the MLP at inference only; training uses s = 1 (A1111: `multiplier if not self.training else 1`).

    MLP = Linear(d·m_0 -> d·m_1) [act] [LayerNorm] [Dropout p_1] ... Linear(d·m_{n-1} -> d·m_n) [act] [LN] [Dropout]

with the layer structure m = (1, 2, 1) by default (first and last 1: the output has the input's width), the
activation after every Linear but the last (after the last too with activate_output), a LayerNorm after every Linear
when asked, and dropout p_{i+1} after Linear i per the dropout structure (0 = none; A1111's "use dropout" is
(0, 0.3, ..., 0.3 or 0, 0)). A1111's activation names: linear (none), relu, leakyrelu, elu, swish (= Hardswish in
A1111, not SiLU), tanh, sigmoid, plus the lower-cased torch.nn activation classes (gelu, silu, mish, ...).
Init (A1111 `weight_init`): Normal: W ~ N(0, 0.01²), b = 0 - and every LayerNorm's weight N(0, 0.01²) too, as A1111
does - so c_k ≈ c at the start; XavierUniform / XavierNormal / KaimingUniform / KaimingNormal with b = 0.
The MLPs run in fp32 and their output is cast back (A1111's `cond_cast_float` / `cond_cast_unet`).

Files. A1111 writes a pickle, `torch.save({768: (k_state_dict, v_state_dict), 320: (...), ..., "layer_structure":
[1, 2, 1], "activation_func": "relu", "is_layer_norm": False, "dropout_structure": [...], "activate_output": False,
"weight_initialization": "Normal", "step": 100, "name": ..., ...})`, each state dict keyed `linear.{i}.weight/bias`
with i the index in the Sequential (activations and dropouts take indices too). minisd saves the same tensors as
safetensors, the int key and the k/v position joined by dots:

    "{width}.{0 = k | 1 = v}.linear.{i}.weight"    e.g. "768.0.linear.0.weight" [1536, 768], "768.1.linear.2.bias"

and the settings as JSON strings in the header metadata under A1111's names (layer_structure, activation_func,
is_layer_norm, dropout_structure, activate_output, weight_initialization, step, name): a converter to A1111's .pt
only nests the keys back. `read_hypernetwork` reads both; an A1111 .pt is opened with torch.load(weights_only=True),
which A1111's layout passes (ints, strings, lists, tuples, None, tensors and OrderedDicts only).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from ..formats.lora_read import AdapterError

ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
               "swish": nn.Hardswish,  # A1111 maps "swish" to Hardswish; kept, so files behave as they do there
               "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish,
               "softsign": nn.Softsign, "hardswish": nn.Hardswish, "prelu": nn.PReLU, "selu": nn.SELU}
INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
SETTINGS = ("layer_structure", "activation_func", "is_layer_norm", "dropout_structure", "activate_output",
            "weight_initialization")


def dropout_structure(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's `parse_dropout_structure`: 0.3 after every hidden Linear (after the one before the last only with
    last_layer_dropout), 0 elsewhere; all 0 without use_dropout."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


class HypernetworkModule(nn.Module):
    """One MLP with A1111's residual: `x + linear(x) · s` (s = `multiplier` in eval mode, 1 in training)."""

    def __init__(self, dim: int, layer_structure=(1, 2, 1), activation: str = "linear", weight_init: str = "Normal",
                 layer_norm: bool = False, activate_output: bool = False, dropout=None):
        super().__init__()
        ls = list(layer_structure)
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
            raise ValueError(f"layer structure {ls} must start and end with 1")
        dropout = list(dropout) if dropout is not None else [0.0] * len(ls)
        if len(dropout) != len(ls) or not all(0 <= p < 1 for p in dropout):
            raise ValueError(f"dropout structure {dropout} must have {len(ls)} values in [0, 1)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.multiplier = 1.0
        layers = []
        for i in range(len(ls) - 1):
            layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            if activation != "linear" and (i < len(ls) - 2 or activate_output):
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout[i + 1]))
        # linear: the Sequential of A1111's state-dict keys `linear.{i}.weight` (activations, norms and dropouts
        # hold indices too)
        self.linear = nn.Sequential(*layers)
        self.reset(weight_init, activation)

    @torch.no_grad()
    def reset(self, weight_init: str, activation: str) -> None:
        """A1111's init: Normal N(0, 0.01²) weights (LayerNorm weights too), zero biases; or Xavier / Kaiming."""
        if weight_init not in INITS:
            raise ValueError(f"weight init {weight_init!r} is not one of {', '.join(INITS)}")
        for layer in self.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            w, b = layer.weight, layer.bias
            nonlin = "leaky_relu" if activation == "leakyrelu" else "relu"
            if weight_init == "Normal" or type(layer) is nn.LayerNorm:
                nn.init.normal_(w, 0.0, 0.01)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(w)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(w)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=nonlin)
            else:
                nn.init.kaiming_normal_(w, nonlinearity=nonlin)
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 1.0 if self.training else self.multiplier
        y = x.float()                                                   # (B, T, d) in fp32, as A1111
        return (y + self.linear(y) * s).to(x.dtype)


class Hypernetwork(nn.Module):
    """The MLP pairs per width: `layers["768"]` = ModuleList([MLP_k, MLP_v]); settings under A1111's names."""

    def __init__(self, sizes, layer_structure=(1, 2, 1), activation_func: str = "linear",
                 weight_initialization: str = "Normal", is_layer_norm: bool = False, activate_output: bool = False,
                 dropout_structure=None, name: str = "hypernetwork", step: int = 0):
        super().__init__()
        self.settings = dict(layer_structure=[float(m) if m != int(m) else int(m) for m in layer_structure],
                             activation_func=activation_func, is_layer_norm=bool(is_layer_norm),
                             dropout_structure=list(dropout_structure or [0.0] * len(layer_structure)),
                             activate_output=bool(activate_output), weight_initialization=weight_initialization)
        self.name, self.step = name, step
        mk = lambda d: HypernetworkModule(d, layer_structure, activation_func, weight_initialization,  # noqa: E731
                                          is_layer_norm, activate_output, self.settings["dropout_structure"])
        self.layers = nn.ModuleDict({str(int(d)): nn.ModuleList([mk(int(d)), mk(int(d))]) for d in sizes})

    def set_multiplier(self, s: float) -> None:
        for pair in self.layers.values():
            for mlp in pair:
                mlp.multiplier = s

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """{"{width}.{0|1}.linear.{i}.weight": tensor}: A1111's nested keys joined by dots (module docstring)."""
        return {f"{d}.{j}.{k}": v.detach().float().contiguous().cpu() for d, pair in self.layers.items()
                for j, mlp in enumerate(pair) for k, v in mlp.state_dict().items()}

    def save(self, path: str, metadata: dict | None = None) -> None:
        """Write the safetensors file (atomically: a fresh private temporary file renamed into place)."""
        from safetensors.torch import save_file
        meta = {k: json.dumps(v) for k, v in self.settings.items()}
        meta.update(name=json.dumps(self.name), step=json.dumps(self.step), format="minisd-hypernetwork")
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        from ..formats.safe_write import atomic_path
        with atomic_path(path) as tmp:  # a fresh private temporary file: never written through a planted link
            save_file(self.file_tensors(), tmp, metadata=meta)


# ----------------------------------------------------------------------------------------------- applying
def attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, CrossAttention) of every attention layer of the UNet: the modules with to_q, to_k, to_v."""
    return [(n, m) for n, m in unet.named_modules() if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v"))]


def attach(unet: nn.Module, hn: Hypernetwork) -> list[str]:
    """Apply `hn` to every attention layer whose to_k / to_v input width it has MLPs for, by forward pre-hooks on
    to_k and to_v (module names and the state dict stay the official ones). Returns the paths hooked; an existing
    hypernetwork is detached first. Raises ValueError if no layer has an enabled width."""
    detach(unet)
    hooked = []
    for path, attn in attention_layers(unet):
        d = str(attn.to_k.in_features)
        if d not in hn.layers:
            continue
        for proj, mlp in ((attn.to_k, hn.layers[d][0]), (attn.to_v, hn.layers[d][1])):
            proj._hn_handle = proj.register_forward_pre_hook(_pre_hook(mlp))
        hooked.append(path)
    if not hooked:
        widths = sorted({a.to_k.in_features for _, a in attention_layers(unet)})
        raise ValueError(f"the hypernetwork's widths {', '.join(hn.layers)} match no attention layer of the "
                         f"model (its key/value input widths: {', '.join(map(str, widths))})")
    # a reference only, not a submodule: the UNet's state dict stays the official one
    unet.__dict__["_hypernetwork"] = hn
    return hooked


def _pre_hook(mlp: HypernetworkModule):
    """to_k / to_v's input c -> c + s·MLP(c). The MLP follows the attention layer's train / eval mode (it is no
    submodule of the model, so model.eval() does not reach it): dropout and s = 1 in training, s in eval."""
    def hook(proj: nn.Module, args: tuple):
        if mlp.training != proj.training:
            mlp.train(proj.training)
        if mlp.linear[0].weight.device != args[0].device:  # the model moved (e.g. the Pipeline's --device)
            mlp.to(args[0].device)
        return (mlp(args[0]),) + args[1:]
    return hook


def detach(unet: nn.Module) -> None:
    """Remove the hooks of `attach`."""
    for _, attn in attention_layers(unet):
        for proj in (attn.to_k, attn.to_v):
            if hasattr(proj, "_hn_handle"):
                proj._hn_handle.remove()
                del proj._hn_handle
    unet.__dict__.pop("_hypernetwork", None)


# ----------------------------------------------------------------------------------------------- reading
def _nested_a1111(raw: dict, path: str) -> dict[str, torch.Tensor]:
    """A1111's {width: (k_sd, v_sd)} -> our flat keys; A1111's oldest key names `linear1/2` renamed as it does."""
    old = {"linear1": "linear.0", "linear2": "linear.1"}
    out = {}
    for d, pair in raw.items():
        if not isinstance(d, int):
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise AdapterError(f"{path}: width {d} holds {type(pair).__name__}, expected (k, v) state dicts")
        for j, sd in enumerate(pair):
            for k, v in sd.items():
                if not isinstance(v, torch.Tensor):
                    raise AdapterError(f"{path}: {d}/{j}/{k} is not a tensor")
                head, _, tail = k.rpartition(".")
                out[f"{d}.{j}.{old.get(head, head)}.{tail}"] = v
    return out


def read_hypernetwork(path: str) -> Hypernetwork:
    """A hypernetwork file -> `Hypernetwork` (eval mode, strength 1): minisd's .safetensors, or A1111's .pt read with
    torch.load(weights_only=True). Raises AdapterError (one line) for anything else."""
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from ..formats.lora_read import read_tensors
        tensors, meta = read_tensors(path)
        if "layer_structure" not in meta:
            raise AdapterError(f"{path}: not a hypernetwork file (no layer_structure in its metadata)")
        try:
            settings = {k: json.loads(meta[k]) for k in SETTINGS if k in meta}
            name, step = json.loads(meta.get("name", '"hypernetwork"')), json.loads(meta.get("step", "0"))
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}: bad metadata ({e})") from None
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{path}: refused or unreadable file ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict) or not any(isinstance(k, int) for k in raw):
            raise AdapterError(f"{path}: not an A1111 hypernetwork (no {{width: (k, v)}} entries)")
        tensors = _nested_a1111(raw, path)
        # A1111's `load` defaults for settings a file lacks
        use_dropout, last = raw.get("use_dropout", False), raw.get("last_layer_dropout", False)
        ls = raw.get("layer_structure") or [1, 2, 1]
        settings = dict(layer_structure=ls, activation_func=raw.get("activation_func"),
                        is_layer_norm=raw.get("is_layer_norm", False),
                        dropout_structure=raw.get("dropout_structure") or dropout_structure(ls, use_dropout, last),
                        activate_output=raw.get("activate_output", True),
                        weight_initialization=raw.get("weight_initialization") or "Normal")
        name, step = raw.get("name") or os.path.splitext(os.path.basename(path))[0], raw.get("step") or 0
    settings["activation_func"] = settings.get("activation_func") or "linear"  # None means linear in A1111
    sizes = sorted({int(k.split(".")[0]) for k in tensors if k.split(".")[0].isdigit()})
    if not sizes or not all(k.split(".")[0].isdigit() for k in tensors):
        raise AdapterError(f"{path}: not a hypernetwork file (keys like {next(iter(tensors), '?')!r})")
    try:
        hn = Hypernetwork(sizes, settings.get("layer_structure", [1, 2, 1]), settings["activation_func"],
                          settings.get("weight_initialization", "Normal"), settings.get("is_layer_norm", False),
                          settings.get("activate_output", False), settings.get("dropout_structure"), name, int(step))
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    mine = hn.state_dict()
    # our module paths: layers.{width}.{0|1}.linear.{i}.{weight|bias}, the file key with "layers." in front
    want = {f"layers.{k}": v for k, v in tensors.items()}
    missing, unexpected = sorted(set(mine) - set(want)), sorted(set(want) - set(mine))
    if missing or unexpected:
        bad = (unexpected or missing)[0]
        raise AdapterError(f"{path}: key {bad.removeprefix('layers.')!r} "
                           f"{'does not fit' if unexpected else 'missing for'} the layer structure "
                           f"{settings.get('layer_structure')} (activation {settings['activation_func']}, "
                           f"layer norm {settings.get('is_layer_norm')})")
    for k, v in want.items():
        if v.shape != mine[k].shape:
            raise AdapterError(f"{path}: {k.removeprefix('layers.')} has shape {tuple(v.shape)}, the layer structure "
                               f"needs {tuple(mine[k].shape)}")
    hn.load_state_dict({k: v.float() for k, v in want.items()})
    return hn.eval().requires_grad_(False)


def load_hypernetwork(model, path: str, strength: float = 1.0) -> tuple[Hypernetwork, list[str]]:
    """Read `path` and apply it to the model's UNet at `strength` (sample.py --hypernetwork FILE[:STRENGTH])."""
    hn = read_hypernetwork(path)
    hn.set_multiplier(strength)
    p = next(model.unet.parameters())
    hn.to(p.device)
    try:
        hooked = attach(model.unet, hn)
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    return hn, hooked
