"""The networks of a benchmark case, built twice with the same shapes and random weights: by minisd from its presets
(SD15, SDXL_BASE, LDM_256) and by diffusers / transformers from the official configs (the reference folder, as
tools/parity_full.py reads it). `tiny=True` builds small versions of both (CPU smoke tests): minisd's TINY preset and
tiny SDXL / LDM variants of it, and the diffusers configs derived from those by minisd's own config writers
(keys_unet.diffusers_unet_config, export.vae_diffusers_config, ...), so both sides still have equal shapes.

Everything is constructed directly on the target device and in the target dtype (a default-dtype context), so an
SDXL UNet (2.6B parameters) is neither initialised on the CPU nor held in fp32 on the way to bf16.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from minisd.config import (LDM_256, SD15, SDXL_BASE, TINY, CLIPTextConfig, LDMBertConfig, ModelConfig,
                           UNetConfig)
from minisd.formats.export import clip_hf_config, ldmbert_hf_config, scheduler_config, vae_diffusers_config
from minisd.formats.keys_unet import diffusers_unet_config, unet_config_from_diffusers
from minisd.model import build_text_encoder
from minisd.unet import UNetModel
from minisd.vae import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small text towers for the tiny SDXL (two CLIPs, the second with a pooled projection) and LDM (LDMBert) presets.
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
TINY_SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 2),
                    transformer_depth_middle=2, num_head_channels=8, context_dim=64, use_linear_in_transformer=True,
                    adm_in_channels=32 + 6 * 8, addition_time_embed_dim=8, norm_num_groups=8),
    vae=dataclasses.replace(TINY.vae, scale_factor=0.13025),
    text_encoders=[CLIPTextConfig(**_TINY_CLIP, layer=-2, final_norm=False),
                   CLIPTextConfig(**_TINY_CLIP, hidden_act="gelu", projection_dim=32, layer=-2, final_norm=False,
                                  pad_token="!")],
    schedule=SDXL_BASE.schedule, resolution=64, zero_empty_negative=True)
TINY_LDM = ModelConfig(
    family="ldm",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1),
                    num_heads=4, context_dim=32, norm_num_groups=8),
    vae=TINY.vae,
    text_encoders=[LDMBertConfig(n_layer=2, d_model=32, n_heads=4, head_dim=8, ffn_dim=64)],
    schedule=LDM_256.schedule, resolution=64)

# --tiny runs: image side in pixels (a 16x16 latent with the tiny VAE's factor 2) and sampling steps
TINY_RESOLUTION, TINY_STEPS = 32, 3

PRESETS = {"sd15": SD15, "sdxl": SDXL_BASE, "ldm": LDM_256}
TINY_PRESETS = {"sd15": TINY, "sdxl": TINY_SDXL, "ldm": TINY_LDM}
# reference folder and file names of each family's components
REFERENCE = {
    "sd15": ("sd15", "unet.json", "vae.json", ["text_encoder.json"], "scheduler_config.json"),
    "sdxl": ("sdxl_base", "unet.json", "vae.json", ["text_encoder.json", "text_encoder_2.json"],
             "scheduler_config.json"),
    "ldm": ("ldm_text2im_large_256", "unet.derived.json", "vqvae.derived.json", ["bert.derived.json"],
            "scheduler_config.derived.json"),
}


def model_config(family: str, tiny: bool = False) -> ModelConfig:
    return (TINY_PRESETS if tiny else PRESETS)[family]


def configs_dir() -> str:
    """The official configs: $MINISD_REFERENCE/configs, else tests/reference/configs of this checkout."""
    for base in (os.environ.get("MINISD_REFERENCE", ""), os.path.join(ROOT, "tests", "reference")):
        p = os.path.join(base, "configs")
        if base and os.path.isdir(p):
            return p
    raise FileNotFoundError("official configs not found: set MINISD_REFERENCE (a folder holding configs/)")


def reference_configs(family: str, tiny: bool = False) -> dict:
    """{"unet", "vae", "text_encoders": [...], "scheduler"} config dicts for diffusers / transformers."""
    cfg = model_config(family, tiny)
    if tiny:
        texts = [ldmbert_hf_config(t) if isinstance(t, LDMBertConfig) else clip_hf_config(t)
                 for t in cfg.text_encoders]
        return {"unet": diffusers_unet_config(cfg.unet), "vae": vae_diffusers_config(cfg), "text_encoders": texts,
                "scheduler": scheduler_config(cfg)}
    folder, unet, vae, texts, sched = REFERENCE[family]

    def load(name):
        with open(os.path.join(configs_dir(), folder, name)) as f:
            return json.load(f)
    out = {"unet": load(unet), "vae": load(vae), "text_encoders": [load(t) for t in texts], "scheduler": load(sched)}
    # the two sides must build the same network: the official config must be exactly our preset
    if unet_config_from_diffusers(out["unet"]) != cfg.unet:
        raise AssertionError(f"{family}: the official UNet config differs from minisd's preset")
    return out


@contextlib.contextmanager
def building(device, dtype: torch.dtype):
    """Construct modules directly on `device` with floating parameters in `dtype`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


@dataclass
class Parts:
    """The networks of one implementation; vae / text_encoders are None / [] when a case does not need them.
    `info()` counts parameters as they are when called (after LoRA injection: base + adapters)."""
    unet: nn.Module
    vae: nn.Module | None = None
    text_encoders: list = field(default_factory=list)

    def info(self) -> dict:
        return {"unet_params": n_params(self.unet), "vae_params": n_params(self.vae),
                "text_params": n_params(*self.text_encoders)}


def minisd_parts(family: str, tiny: bool, device, unet_dtype: torch.dtype, text_dtype: torch.dtype = torch.bfloat16,
                 vae_dtype: torch.dtype = torch.float32, vae: bool = True, text: bool = True) -> Parts:
    cfg = model_config(family, tiny)
    with building(device, unet_dtype):
        unet = UNetModel(cfg.unet)
    v = None
    if vae:
        with building(device, vae_dtype):
            v = AutoencoderKL(cfg.vae)
    tes = []
    if text:
        with building(device, text_dtype):
            tes = [build_text_encoder(t) for t in cfg.text_encoders]
    return Parts(unet, v, tes)


def _hf_kwargs(d: dict) -> dict:
    """A transformers config dict without the keys its config classes do not take as arguments."""
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype", "model_type",
                                                                               "architectures")}


def diffusers_text_encoder(family: str, d: dict) -> nn.Module:
    if family == "ldm":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as Cfg, LDMBertModel
        return LDMBertModel(Cfg(**_hf_kwargs(d)))
    from transformers import CLIPTextConfig as Cfg, CLIPTextModel, CLIPTextModelWithProjection
    cfg = Cfg(**_hf_kwargs(d))
    # SDXL's second encoder is the one with the pooled projection (official: CLIPTextModelWithProjection)
    with_proj = "CLIPTextModelWithProjection" in d.get("architectures", [])
    return (CLIPTextModelWithProjection if with_proj else CLIPTextModel)(cfg)


def diffusers_parts(family: str, tiny: bool, device, unet_dtype: torch.dtype, text_dtype: torch.dtype = torch.bfloat16,
                    vae_dtype: torch.dtype = torch.float32, vae: bool = True, text: bool = True) -> Parts:
    from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
    conf = reference_configs(family, tiny)
    with building(device, unet_dtype):
        unet = UNet2DConditionModel.from_config(conf["unet"])
    v = None
    if vae:
        with building(device, vae_dtype):
            v = RefVAE.from_config(conf["vae"])
    tes = []
    if text:
        with building(device, text_dtype):
            tes = [diffusers_text_encoder(family, d).to(text_dtype) for d in conf["text_encoders"]]
    return Parts(unet, v, tes)


def token_ids(family: str, tiny: bool, batch: int, device, seed: int = 0) -> torch.Tensor:
    """Random prompt token ids (B, 77): BOS, random words, EOS padding (CLIP); random WordPiece ids (LDMBert)."""
    cfg = model_config(family, tiny).text_encoders[0]
    g = torch.Generator().manual_seed(seed)
    if family == "ldm":
        return torch.randint(1000, min(cfg.vocab_size, 30000), (batch, 77), generator=g).to(device)
    ids = torch.randint(1, 49000, (batch, 77), generator=g)
    ids[:, 0], ids[:, 20:] = 49406, 49407   # 18 words, then <|endoftext|> to the end
    return ids.to(device)
