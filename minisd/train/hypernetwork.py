"""`train.py --method hypernetwork`: the Trainer's side of a hypernetwork (minisd/adapters/hypernetwork.py has the
layers, the hook and the file format; the method is NovelAI's, as AUTOMATIC1111's webui defines it).

The UNet, VAE and text encoders stay frozen; the MLP pairs, one pair per enabled width (default: the model's context
width, i.e. cross-attention only), are the only trainable tensors, in fp32 whatever the autocast dtype. They run with
strength 1 and their dropout in training, as A1111 trains them. Output: hypernetwork.safetensors (key layout in
minisd/adapters/hypernetwork.py), read by `sample.py --hypernetwork FILE[:STRENGTH]`.
"""
from __future__ import annotations

import os

import torch

from ..adapters.hypernetwork import Hypernetwork, attach
from .config import parse_numbers


class HypernetworkMethod:
    """The interface the Trainer uses for a non-adapter method (see textual_inversion.TextualInversion)."""

    train_text_encoder = False  # the text encoders' output is only read: no gradient through them

    def __init__(self, model, cfg, device):
        sizes = parse_numbers(cfg.hn_sizes, "--hn-sizes", int) if cfg.hn_sizes else [model.cfg.unet.context_dim]
        dropout = parse_numbers(cfg.hn_dropout, "--hn-dropout") if cfg.hn_dropout else None
        torch.manual_seed(cfg.seed)  # the MLPs' init
        self.hn = Hypernetwork(sizes, parse_numbers(cfg.hn_layers, "--hn-layers"), cfg.hn_activation, cfg.hn_init,
                               cfg.hn_layer_norm, cfg.hn_activate_output, dropout, name="hypernetwork")
        self.hn.to(device)
        try:
            self.hooked = attach(model.unet, self.hn)
        except ValueError as e:
            raise ValueError(f"--hn-sizes: {e}") from None
        self.params = list(self.hn.parameters())
        for p in self.params:
            p.requires_grad_(True)

    def regulariser(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {f"hn.{k}": v.detach().clone() for k, v in self.hn.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():  # in place: the optimizer holds these tensors
            for k, v in self.hn.state_dict(keep_vars=True).items():
                v.copy_(state[f"hn.{k}"])

    def describe(self) -> str:
        s = self.hn.settings
        return (f"hypernetwork: widths {', '.join(self.hn.layers)} on {len(self.hooked)} attention layers' k/v inputs, "
                f"layers {s['layer_structure']}, {s['activation_func']}, layer norm {s['is_layer_norm']}, dropout "
                f"{s['dropout_structure']}, init {s['weight_initialization']}, "
                f"{sum(p.numel() for p in self.params):,} trainable parameters")

    def write_outputs(self, run_dir: str, metadata: dict, step: int = 0) -> dict:
        path = os.path.join(run_dir, "hypernetwork.safetensors")
        self.hn.step = step
        self.hn.save(path, metadata)
        return {"hypernetwork": path}

    def files_text(self, out: dict) -> str:
        return (f"{out['hypernetwork']} (A1111 tensors as safetensors); use: python sample.py PROMPT "
                f"--hypernetwork {out['hypernetwork']}:1.0")


def build_method(model, cfg, device):
    """The trained part of --method ti / hypernetwork."""
    if cfg.method == "ti":
        from .textual_inversion import TextualInversion
        ti = TextualInversion(model, cfg.ti_token, cfg.ti_vectors, cfg.ti_init, cfg.ti_norm_weight)
        for p in ti.params:
            p.data = p.data.to(device)
        return ti
    return HypernetworkMethod(model, cfg, device)
