"""Configuration dataclasses and named presets for every model minisd builds.

Field names follow the official yaml files (`v1-inference.yaml`, `v2-inference(-v).yaml`,
`sd_xl_base.yaml`, `txt2img-1p4B-eval.yaml`) so a reader can diff a preset against its source.
Where the yaml uses one number for all levels (`num_res_blocks: 2`, `transformer_depth: 1`) we
store one number per level, which is what lets block-removed UNets (segmind small-sd / tiny-sd,
BK-SDM) be expressed with the same class.

Presets: SD15, SD2_BASE, SD2_V, SDXL_BASE, LDM_256, TINY (tests and the embedded model).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

# What the repository ships beside the package: vocabularies, the embedded model minisd-tiny and its probe.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


@dataclass
class UNetConfig:
    """openaimodel.UNetModel parameters (`unet_config.params` / `network_config.params`)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320               # channels of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: tuple = (2, 2, 2, 2)    # ResBlocks per input level; output levels get one more each
    transformer_depth: tuple = (1, 1, 1, 0)  # SpatialTransformer blocks per level; 0 = no attention there
    transformer_depth_middle: int = 1
    mid_block: bool = True                  # False for block-removed UNets without a middle block
    num_heads: int = -1                     # fixed head count (SD1, LDM) ...
    num_head_channels: int = -1             # ... or fixed head width (SD2, SDXL: 64); exactly one is set
    context_dim: int = 768                  # width of the text-encoder states used as cross-attention keys
    use_linear_in_transformer: bool = False  # SD2/SDXL: Linear proj_in/out; SD1/LDM: 1x1 conv
    adm_in_channels: Optional[int] = None   # SDXL: 2816 = pooled text (1280) + 6 size values x 256
    addition_time_embed_dim: int = 256      # SDXL: sinusoidal width of each of the 6 size values
    norm_num_groups: int = 32               # GroupNorm groups (32 in every official model)
    norm_eps: float = 1e-5                  # ResBlock / output GroupNorm eps (the transformers' GroupNorm uses 1e-6)

    def heads(self, channels: int) -> int:
        """Number of attention heads of a transformer with `channels` width."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels
        return self.num_heads


@dataclass
class VAEConfig:
    """AutoencoderKL `ddconfig` + `embed_dim` (ldm/models/autoencoder.py)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True                   # encoder outputs mean and log-variance
    norm_num_groups: int = 32
    # Latent scale: the latents' standard deviation was measured on training data and its inverse
    # stored, so the UNet sees unit-variance latents. 0.18215 for the SD1/SD2/LDM VAE, 0.13025 SDXL.
    scale_factor: float = 0.18215
    # SDXL's own VAE overflows in fp16 (NaN / black images); keep it in fp32 unless told otherwise.
    force_upcast: bool = True


@dataclass
class CLIPTextConfig:
    """CLIP text transformer (Hugging Face `CLIPTextConfig` names), plus how SD reads it."""
    kind: str = "clip"
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"          # OpenAI CLIP: x*sigmoid(1.702x); OpenCLIP: exact gelu
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None    # SDXL text_encoder_2: pooled -> text_projection (no bias)
    # Which hidden state feeds the UNet: -1 = last layer, -2 = penultimate (SDXL, "clip skip 2").
    layer: int = -1
    # Apply final_layer_norm to that hidden state (SD1, SD2: yes; SDXL: no).
    final_norm: bool = True
    pad_token: str = "<|endoftext|>"        # SD1 & SDXL enc. 1 pad with EOS; OpenCLIP (SD2, SDXL enc. 2) with "!"


@dataclass
class LDMBertConfig:
    """LDMBert of CompVis ldm-text2im-large-256 (`BERTEmbedder`, x-transformers encoder)."""
    kind: str = "ldmbert"
    vocab_size: int = 30522
    max_position_embeddings: int = 77
    n_layer: int = 32
    d_model: int = 1280
    n_heads: int = 8
    head_dim: int = 64                      # q/k/v project 1280 -> 8 x 64 = 512
    ffn_dim: int = 5120
    layer_norm_eps: float = 1e-5


@dataclass
class ScheduleConfig:
    """DDPM training schedule and the sampling conventions of the official scheduler configs."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085             # `linear_start` in the yaml
    beta_end: float = 0.012                 # `linear_end`
    beta_schedule: str = "scaled_linear"    # betas = linspace(sqrt(start), sqrt(end), T) ** 2
    prediction_type: str = "epsilon"        # "epsilon" | "v_prediction" | "sample"
    # How inference timesteps are spread ("leading" | "linspace" | "trailing"). None = the sampler's
    # own default, as diffusers does when a scheduler config has no such key (SD1/SD2 hub configs):
    # leading for DDIM/DDPM, linspace for Euler, Euler a and DPM++.
    timestep_spacing: Optional[str] = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False


TEXT_CONFIGS = {"clip": CLIPTextConfig, "ldmbert": LDMBertConfig}


@dataclass
class ModelConfig:
    """A whole text-to-image model: what `weights/NAME/config.json` stores."""
    family: str = "sd1"                     # "sd1" | "sd2" | "sdxl" | "ldm"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoders: list = field(default_factory=lambda: [CLIPTextConfig()])
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resolution: int = 512                   # default image side in pixels
    # SDXL: an empty negative prompt means zero embeddings (force_zeros_for_empty_prompt).
    zero_empty_negative: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of a config.json; ValueError naming the field on an unknown name, wrong type or range."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")

        def build(klass, values, where):
            if not isinstance(values, dict):
                raise ValueError(f"{where} must be an object, got {type(values).__name__}")
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        for key in ("family", "unet", "vae", "text_encoders", "schedule"):
            if key not in d:
                raise ValueError(f"missing field {key!r}")
        tes = d["text_encoders"]
        if not isinstance(tes, list) or not all(isinstance(t, dict) for t in tes):
            raise ValueError("text_encoders must be a list of objects")
        if any(t.get("kind", "clip") not in TEXT_CONFIGS for t in tes):
            raise ValueError(f"text_encoders[].kind must be one of {', '.join(TEXT_CONFIGS)}")
        cfg = cls(
            family=d["family"],
            unet=build(UNetConfig, d["unet"], "unet"),
            vae=build(VAEConfig, d["vae"], "vae"),
            text_encoders=[build(TEXT_CONFIGS[t.get("kind", "clip")], t, f"text_encoders[{i}]")
                           for i, t in enumerate(tes)],
            schedule=build(ScheduleConfig, d["schedule"], "schedule"),
            resolution=d.get("resolution", 512),
            zero_empty_negative=d.get("zero_empty_negative", False),
        )
        check_config(cfg)
        return cfg


# ---------------------------------------------------------------------------------------------
# Checking a config read from a file: every field of its type, in range (a config file is input)
# ---------------------------------------------------------------------------------------------
SIZE_LIMIT = 1 << 20  # no official width, count or vocabulary comes near it: a larger value is a broken file
CHOICES = {"family": ("sd1", "sd2", "sdxl", "ldm"), "hidden_act": ("quick_gelu", "gelu"),
           "beta_schedule": ("scaled_linear", "linear"), "prediction_type": ("epsilon", "v_prediction", "sample"),
           "timestep_spacing": ("leading", "linspace", "trailing")}
MAY_BE_NEGATIVE = {"num_heads", "num_head_channels", "layer"}  # -1 = "not set" / "the last layer"
MAY_BE_ZERO = {"num_res_blocks", "transformer_depth", "transformer_depth_middle", "steps_offset"}


def check_config(cfg, where: str = "") -> None:
    """Raise ValueError naming `where.field` for a field of the wrong type (a bool for an int, a list where a
    number goes, an object nested where none belongs) or out of range (sizes >= 1 and below SIZE_LIMIT, floats
    finite and positive, names from CHOICES), and for parts that do not fit together."""
    for f in dataclasses.fields(cfg):
        v, name = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        kind = f.type.replace("Optional[", "").rstrip("]")
        if v is None and f.type.startswith("Optional"):
            continue
        if f.name == "text_encoders":
            if not isinstance(v, list) or not v:
                raise ValueError(f"{name} must be a non-empty list")
            for i, t in enumerate(v):
                check_config(t, f"{name}[{i}]")
            continue
        if dataclasses.is_dataclass(v):
            check_config(v, name)
            continue
        items = v if kind == "tuple" else (v,)
        if kind == "tuple" and (not isinstance(v, tuple) or not v):
            raise ValueError(f"{name} must be a non-empty list of whole numbers, got {v!r}")
        for x in items:
            if kind in ("int", "tuple"):
                ok = isinstance(x, int) and not isinstance(x, bool)
                lo = -SIZE_LIMIT if f.name in MAY_BE_NEGATIVE else 0 if f.name in MAY_BE_ZERO else 1
                if not ok or not lo <= x <= SIZE_LIMIT:
                    raise ValueError(f"{name} must be a whole number in [{lo}, {SIZE_LIMIT}], got {x!r}")
            elif kind == "float":
                ok = isinstance(x, (int, float)) and not isinstance(x, bool)
                if not ok or not 0 < x < float("inf"):
                    raise ValueError(f"{name} must be a finite positive number, got {x!r}")
            elif kind == "bool" and not isinstance(x, bool):
                raise ValueError(f"{name} must be true or false, got {x!r}")
            elif kind == "str":
                if not isinstance(x, str) or f.name in CHOICES and x not in CHOICES[f.name]:
                    allowed = f" ({', '.join(CHOICES[f.name])})" if f.name in CHOICES else ""
                    raise ValueError(f"{name} must be a name{allowed}, got {x!r}")
    if isinstance(cfg, UNetConfig):
        if not len(cfg.channel_mult) == len(cfg.num_res_blocks) == len(cfg.transformer_depth):
            raise ValueError(f"{where}: channel_mult, num_res_blocks and transformer_depth must have one entry "
                             "per level")
        if (cfg.num_heads > 0) == (cfg.num_head_channels > 0):
            raise ValueError(f"{where}: exactly one of num_heads and num_head_channels must be set (> 0)")
        if any(cfg.model_channels * m % cfg.norm_num_groups for m in cfg.channel_mult):
            raise ValueError(f"{where}.norm_num_groups {cfg.norm_num_groups} must divide every level's channels")
    if isinstance(cfg, VAEConfig) and any(cfg.ch * m % cfg.norm_num_groups for m in cfg.ch_mult):
        raise ValueError(f"{where}.norm_num_groups {cfg.norm_num_groups} must divide every level's channels")
    if isinstance(cfg, CLIPTextConfig) and cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{where}.num_attention_heads {cfg.num_attention_heads} must divide hidden_size")
    if isinstance(cfg, ScheduleConfig) and not cfg.beta_start < cfg.beta_end < 1:
        raise ValueError(f"{where}: beta_start < beta_end < 1 expected, got {cfg.beta_start}, {cfg.beta_end}")


# ---------------------------------------------------------------------------------------------
# Official presets
# ---------------------------------------------------------------------------------------------

# configs/stable-diffusion/v1-inference.yaml (CompVis) + CLIP ViT-L/14 text tower.
SD15 = ModelConfig(
    family="sd1",
    unet=UNetConfig(num_heads=8, context_dim=768),
    vae=VAEConfig(),
    text_encoders=[CLIPTextConfig()],
    schedule=ScheduleConfig(),
    resolution=512,
)

# v2-inference.yaml: OpenCLIP ViT-H/14, penultimate layer. The penultimate output of a 24-block tower
# is the last output of its first 23 blocks, so we build 23 blocks (as diffusers does) and the
# converter ignores block 23 of the single file.
_OPENCLIP_H = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                             num_hidden_layers=23, hidden_act="gelu", pad_token="!")
SD2_BASE = ModelConfig(
    family="sd2",
    unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    text_encoders=[_OPENCLIP_H],
    resolution=512,
)
# v2-inference-v.yaml: same networks, trained with v-prediction at 768 px.
SD2_V = dataclasses.replace(SD2_BASE, schedule=ScheduleConfig(prediction_type="v_prediction"),
                            resolution=768)

# sd_xl_base.yaml: no attention at level 0, depth 2 and 10 at levels 1, 2; CLIP-L + OpenCLIP bigG,
# both read at the penultimate layer without final norm; bigG's pooled output is projected.
SDXL_BASE = ModelConfig(
    family="sdxl",
    unet=UNetConfig(channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), transformer_depth=(0, 2, 10),
                    transformer_depth_middle=10, num_head_channels=64, context_dim=2048,
                    use_linear_in_transformer=True, adm_in_channels=2816),
    vae=VAEConfig(scale_factor=0.13025),
    text_encoders=[
        CLIPTextConfig(layer=-2, final_norm=False),
        CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                       num_hidden_layers=32, hidden_act="gelu", projection_dim=1280,
                       layer=-2, final_norm=False, pad_token="!"),
    ],
    schedule=ScheduleConfig(timestep_spacing="leading"),   # sdxl scheduler_config.json says so
    resolution=1024,
    zero_empty_negative=True,
)

# txt2img-1p4B-eval.yaml (CompVis latent-diffusion): LDMBert context 1280, 8 fixed heads.
# Its scheduler (DDIM, set_alpha_to_one False) has no steps_offset.
LDM_256 = ModelConfig(
    family="ldm",
    unet=UNetConfig(num_heads=8, context_dim=1280),
    text_encoders=[LDMBertConfig()],
    schedule=ScheduleConfig(beta_end=0.012, steps_offset=0),
    resolution=256,
)

# About one million UNet parameters: the unit-test model and the architecture of minisd-tiny.
TINY = ModelConfig(
    family="sd1",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                    transformer_depth=(1, 1), transformer_depth_middle=1, num_head_channels=8,
                    context_dim=32, norm_num_groups=8),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8),
    text_encoders=[CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_hidden_layers=2)],
    resolution=64,
)

PRESETS = {"sd15": SD15, "sd2_base": SD2_BASE, "sd2_v": SD2_V, "sdxl_base": SDXL_BASE,
           "ldm_256": LDM_256, "tiny": TINY}

# minisd-tiny, the embedded model trained from scratch on the procedural world (`minisd/world/pretrain.py`).
# Sized for a laptop CPU: a 64 px image is a 16x16x4 latent (VAE f = 4), the UNet has two levels of
# 64 / 128 channels with attention at both, and the text encoder is 96 wide. Its CLIP token embedding
# (49408 x 96) is a third of the weights; 28 MB in all as stored (fp16). scale_factor is a placeholder:
# pretraining measures the latents' std and stores 1/std in the saved config.json.
WORLD_TINY = ModelConfig(
    family="sd1",
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(2, 2),
                    transformer_depth=(1, 1), transformer_depth_middle=1, num_head_channels=32,
                    context_dim=96, norm_num_groups=32),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, norm_num_groups=32, scale_factor=1.0),
    text_encoders=[CLIPTextConfig(hidden_size=96, intermediate_size=384, num_attention_heads=4,
                                  num_hidden_layers=3)],
    resolution=64,
)
PRESETS["world_tiny"] = WORLD_TINY
