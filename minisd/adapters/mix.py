"""Several adapters at once, each with its own strength ("mixing LoRAs"), applied beside the base weights or merged.

With adapters A_1..A_n at strengths m_1..m_n (negative allowed: it pushes away from what A_i learnt), a layer computes

    y = W x + b + Σ_i m_i · Δ_i(x)                    Δ_i = (α/r) B A x for LoRA, (W1 ⊗ W2) x for LoKr, ...

every Δ_i against the *original* W (DoRA's rescaling too), which is what A1111, ComfyUI and diffusers' `set_adapters`
compute. Two ways to get there:

    apply_adapters(model, files)               adapter layers beside W (W's tensor is shared, never written): the
                                               strengths can still change, the base weights stay exactly as stored;
                                               costs the adapters' small matmuls at every call.
    apply_adapters(model, files, merge=True)   W <- W + Σ_i m_i ΔW_i once, then plain layers: the base model's speed.
                                               ΔW_i is summed in fp32 and added once, so a fp16 base rounds once.

One file on a module gives that file's layer (LoRALinear, LoHaConv2d, ...); two or more give an `AdapterStack`
holding one layer per file, all sharing the base weight.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..lora import AdapterLayer
from . import _set_module, layer_from_tensors


class AdapterStack(AdapterLayer):
    """A base layer with several adapters: y = W x + b + Σ_i m_i Δ_i(x). The children are ordinary adapter layers
    sharing this layer's weight and bias; each keeps its own multiplier (`children[i].set_scale`)."""
    kind = "stack"

    def _init_stack(self, base: nn.Module, layers: Sequence[AdapterLayer]) -> None:
        self._adopt(base, 1.0, 0.0, 0.0)
        self.children_ = nn.ModuleList(layers)
        self.rank = max(getattr(layer, "rank", 0) for layer in layers)

    def delta_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # each child sees the base output y (DoRA needs W x): the deltas add, none sees another's
        out = 0
        for layer in self.children_:
            if layer.active:
                out = out + layer.strength_forward(x, y)
        return out

    def weight_delta(self) -> torch.Tensor:
        return self.multiplier * sum(layer.weight_delta().float() for layer in self.children_)

    def adapter_state_dict(self) -> dict:
        return {f"{i}.{k}": v for i, layer in enumerate(self.children_) for k, v in layer.adapter_state_dict().items()}


class StackLinear(AdapterStack, nn.Linear):
    def __init__(self, base: nn.Linear, layers: Sequence[AdapterLayer]):
        nn.Linear.__init__(self, base.in_features, base.out_features, base.bias is not None, device="meta")
        self._init_stack(base, layers)


class StackConv2d(AdapterStack, nn.Conv2d):
    def __init__(self, base: nn.Conv2d, layers: Sequence[AdapterLayer]):
        nn.Conv2d.__init__(self, base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                           base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        self._init_stack(base, layers)


def _base(model: nn.Module, path: str) -> nn.Module:
    mod = model.get_submodule(path)
    return mod.to_base() if isinstance(mod, AdapterLayer) else mod


def build_layers(model: nn.Module, modules: dict, ranks: dict, multiplier: float, source: str = "adapter"
                 ) -> dict[str, AdapterLayer]:
    """{path: adapter layer at strength `multiplier`} for {path: {suffix: tensor}} (adapters/lora_read names),
    the adapter tensors in fp32 (the pipeline casts them with the model). Not installed in the model.
    A tensor that does not fit its layer raises ValueError naming `source` and the module."""
    out = {}
    for path, tensors in modules.items():
        base = _base(model, path)
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{source}: {path} is a {type(base).__name__}, not a Linear or Conv2d")
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        try:
            layer = layer_from_tensors(base, tensors, ranks.get(path))
        except (ValueError, KeyError, RuntimeError) as e:
            msg = e.args[0] if e.args else e
            raise ValueError(f"{source}: {path}: {msg} (weight {tuple(base.weight.shape)}; a file for another "
                             "base model?)") from None
        layer.set_scale(multiplier)
        layer.requires_grad_(False)
        out[path] = layer
    return out


@torch.no_grad()
def apply_adapters(model: nn.Module, adapters: Sequence[tuple], merge: bool = False) -> dict[str, int]:
    """Apply adapters to `model` in place. `adapters`: (modules {path: {suffix: tensor}}, ranks {path: rank},
    strength, name) tuples, e.g. from `formats.lora_read.read_adapter_file`. merge=False installs adapter layers
    (one, or an AdapterStack); merge=True adds Σ m_i ΔW_i into the weights and installs nothing. The model must hold
    plain layers at those paths. Returns {path: number of adapters on it}."""
    per_path: dict[str, list[AdapterLayer]] = {}
    for modules, ranks, strength, name in adapters:
        for path, layer in build_layers(model, modules, ranks, strength, name).items():
            per_path.setdefault(path, []).append(layer)
    for path, layers in per_path.items():
        base = _base(model, path)
        if merge:
            delta = sum(layer.weight_delta().float() for layer in layers)
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            _set_module(model, path, base)
        elif len(layers) == 1:
            _set_module(model, path, layers[0])
        else:
            stack = (StackConv2d if isinstance(base, nn.Conv2d) else StackLinear)(base, layers)
            _set_module(model, path, stack)
    return {p: len(v) for p, v in per_path.items()}


@torch.no_grad()
def load_into_adapters(model: nn.Module, modules: dict, source: str = "adapter") -> int:
    """Copy a file's tensors ({path: {suffix: tensor}}) into the adapter layers already injected in `model` (to train
    on from them: train.py --init-adapter). Every module of the file must be adapted there with the same kind and
    rank; layers the file lacks keep their fresh init. Returns the number of layers loaded; ValueError otherwise."""
    from . import _load_layer
    for path, tensors in modules.items():
        layer = model.get_submodule(path)
        if not isinstance(layer, AdapterLayer):
            raise ValueError(f"{source}: adapts {path}, which this run does not (--targets / --train-text-encoder)")
        own = layer.adapter_state_dict()
        if set(own) - {"alpha"} != set(tensors) - {"alpha"}:
            raise ValueError(f"{source}: {path} holds {'/'.join(sorted(set(tensors) - {'alpha'}))}, this run's "
                             f"{layer.kind} layer {'/'.join(sorted(set(own) - {'alpha'}))} (--network mismatch)")
        for k, v in tensors.items():
            if k != "alpha" and tuple(v.shape) != tuple(own[k].shape) and v.numel() != own[k].numel():
                raise ValueError(f"{source}: {path}.{k} is {tuple(v.shape)}, this run's is {tuple(own[k].shape)} "
                                 f"(rank mismatch: the file's rank is not --rank {getattr(layer, 'rank', '?')}?)")
        _load_layer(layer, {k: v.float() for k, v in tensors.items()})
    return len(modules)
