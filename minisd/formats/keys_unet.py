"""Name table between diffusers' `UNet2DConditionModel` (`unet/` folder) and ours (= CompVis names),
and the two configs (`unet/config.json` <-> `UNetConfig`).

The whole converter is `unet_name_pairs`: one (ours, diffusers) module pair per line, generated
from the config; a tensor name is its module name + `.weight` / `.bias`. How the two layouts differ:

  * diffusers groups by level (`down_blocks.l.resnets.j`, `.attentions.j`, `.downsamplers.0`),
    CompVis numbers blocks in execution order (`input_blocks.i.0` ResBlock, `.1` transformer).
  * ResBlock parts: in_layers.0/2 = norm1/conv1, emb_layers.1 = time_emb_proj,
    out_layers.0/3 = norm2/conv2, skip_connection = conv_shortcut.
  * Inside a transformer every name is the same (norm, proj_in, transformer_blocks.k.attn1.to_q,
    ff.net.0.proj, ..., proj_out). proj_in/proj_out are 1x1 convs or Linear in both layouts alike
    (diffusers' `use_linear_projection` = our `use_linear_in_transformer`); a conv weight arriving
    where a Linear is configured (or back) is reshaped on import.

Strictness (rename.py's `strict_rename`): every source tensor must be consumed and every module of the
table filled (weight, and bias except for the bias-free q/k/v); otherwise a KeyError lists the first
offending names.
"""
from __future__ import annotations

from ..config import UNetConfig
from .rename import strict_rename, tensor_pairs

# ResBlock: ours -> diffusers ResnetBlock2D, inside `input_blocks.i.0` / `down_blocks.l.resnets.j`.
RESBLOCK = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
            ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
NO_BIAS = ("to_q", "to_k", "to_v")


def _resblock(ours: str, theirs: str, shortcut: bool):
    for a, b in RESBLOCK:
        yield f"{ours}.{a}", f"{theirs}.{b}"
    if shortcut:  # only where the width changes
        yield f"{ours}.skip_connection", f"{theirs}.conv_shortcut"


def _transformer(ours: str, theirs: str, depth: int):
    """SpatialTransformer <-> Transformer2DModel: identical names below the block prefix."""
    inner = ["norm", "proj_in", "proj_out"]
    for k in range(depth):
        blk = f"transformer_blocks.{k}"
        for a in ("attn1", "attn2"):
            inner += [f"{blk}.{a}.to_q", f"{blk}.{a}.to_k", f"{blk}.{a}.to_v", f"{blk}.{a}.to_out.0"]
        inner += [f"{blk}.norm1", f"{blk}.norm2", f"{blk}.norm3", f"{blk}.ff.net.0.proj", f"{blk}.ff.net.2"]
    for name in inner:
        yield f"{ours}.{name}", f"{theirs}.{name}"


def unet_name_pairs(cfg: UNetConfig) -> list[tuple[str, str]]:
    """Every (ours, diffusers) module pair of the UNet that `cfg` describes."""
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2")]
    if cfg.adm_in_channels:  # SDXL vector conditioning
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    pairs.append(("input_blocks.0.0", "conv_in"))
    levels, mc = len(cfg.channel_mult), cfg.model_channels
    i, ch = 1, mc
    for lvl, mult in enumerate(cfg.channel_mult):
        depth = cfg.transformer_depth[lvl]
        for j in range(cfg.num_res_blocks[lvl]):
            pairs += _resblock(f"input_blocks.{i}.0", f"down_blocks.{lvl}.resnets.{j}", ch != mult * mc)
            ch = mult * mc
            if depth:
                pairs += _transformer(f"input_blocks.{i}.1", f"down_blocks.{lvl}.attentions.{j}", depth)
            i += 1
        if lvl != levels - 1:
            pairs.append((f"input_blocks.{i}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv"))
            i += 1
    if cfg.mid_block:
        pairs += _resblock("middle_block.0", "mid_block.resnets.0", False)
        pairs += _transformer("middle_block.1", "mid_block.attentions.0", cfg.transformer_depth_middle)
        pairs += _resblock("middle_block.2", "mid_block.resnets.1", False)
    i = 0
    for u, lvl in enumerate(reversed(range(levels))):  # diffusers' up_blocks.0 is our deepest level
        depth = cfg.transformer_depth[lvl]
        for j in range(cfg.num_res_blocks[lvl] + 1):
            # Decoder ResBlocks always get a shortcut: their input is h and a skip concatenated.
            pairs += _resblock(f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", True)
            if depth:
                pairs += _transformer(f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", depth)
            if lvl != 0 and j == cfg.num_res_blocks[lvl]:
                pairs.append((f"output_blocks.{i}.{2 if depth else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv"))
            i += 1
    pairs += [("out.0", "conv_norm_out"), ("out.2", "conv_out")]
    return pairs


def _bias_free(name: str) -> bool:
    """The attention's q/k/v Linear layers have no bias: their `.bias` pair is optional."""
    module, _, param = name.rpartition(".")
    return param == "bias" and module.endswith(NO_BIAS)


def unet_from_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    """diffusers UNet2DConditionModel state dict -> ours (the same tensor objects, renamed)."""
    pairs = tensor_pairs((theirs, ours) for ours, theirs in unet_name_pairs(cfg))

    def fix(_, ours, t):  # proj_in/out stored as the other kind than configured: reshape
        if ours.endswith(("proj_in.weight", "proj_out.weight")):
            if cfg.use_linear_in_transformer and t.ndim == 4:
                return t.reshape(t.shape[:2])                 # [C, C, 1, 1] -> [C, C]
            if not cfg.use_linear_in_transformer and t.ndim == 2:
                return t.reshape(*t.shape, 1, 1)              # [C, C] -> [C, C, 1, 1]
        return t

    return strict_rename(sd, pairs, "unet_from_diffusers", optional=_bias_free, fix=fix)


def unet_to_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    """Our UNet state dict -> diffusers UNet2DConditionModel names."""
    return strict_rename(sd, tensor_pairs(unet_name_pairs(cfg)), "unet_to_diffusers", optional=_bias_free)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

# What our UNet always is; a diffusers config saying otherwise describes another architecture.
FIXED = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
         "mid_block_scale_factor": 1, "center_input_sample": False}
# Keys whose only supported value is the given one (a null in the file is accepted too).
UNSUPPORTED = {"class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
               "encoder_hid_dim_type": None, "time_cond_proj_dim": None, "num_attention_heads": None,
               "dual_cross_attention": False, "only_cross_attention": False, "time_embedding_type": "positional",
               "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3,
               "reverse_transformer_layers_per_block": None, "attention_type": "default",
               "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
               "class_embeddings_concat": False, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
               "cross_attention_norm": None, "mid_block_only_cross_attention": False}
UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def _per_level(value, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels or any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError(f"unet config: {name} must be one number per level, got {value}")
    return values


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """diffusers `unet/config.json` -> UNetConfig. Only the architectures our UNet builds are accepted.

    diffusers' `attention_head_dim` is a historical misnomer: it is the number of heads (diffusers
    issue 2011). One number = fixed heads (SD1: 8, LDM: 8); a list = heads per level, which in SD2 /
    SDXL ([5, 10, 20, 20] for widths 320..1280) means a fixed head width of 64."""
    for key, want in FIXED.items():
        if d.get(key, want) != want:
            raise ValueError(f"unet config: {key}={d[key]!r} is not supported (only {want!r})")
    for key, want in UNSUPPORTED.items():
        if d.get(key) not in (want, None):
            raise ValueError(f"unet config: {key}={d[key]!r} is not supported")
    if d.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(f"unet config: addition_embed_type={d['addition_embed_type']!r} is not supported")
    channels = list(d["block_out_channels"])
    levels, mc = len(channels), channels[0]
    down = list(d["down_block_types"])
    if any(t not in UP_OF_DOWN for t in down) or len(down) != levels:
        raise ValueError(f"unet config: unsupported down_block_types {down}")
    if list(d["up_block_types"]) != [UP_OF_DOWN[t] for t in reversed(down)]:
        raise ValueError(f"unet config: up_block_types {d['up_block_types']} do not mirror {down}")
    if any(c % mc for c in channels):
        raise ValueError(f"unet config: block_out_channels {channels} are not multiples of the first")
    mid_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"unet config: mid_block_type {mid_type!r} is not supported")

    has_attn = [t == "CrossAttnDownBlock2D" for t in down]
    layers = _per_level(d.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    heads = _per_level(d.get("attention_head_dim", 8), levels, "attention_head_dim")
    # Fixed heads or fixed width, judged on the levels that attend (the middle uses the last level's).
    used = [lvl for lvl in range(levels) if has_attn[lvl] or (lvl == levels - 1 and mid_type)] or [0]
    counts = {heads[lvl] for lvl in used}
    widths = {channels[lvl] / heads[lvl] for lvl in used}
    width = channels[used[0]] / heads[used[0]]
    num_heads, head_channels = -1, -1
    if len(counts) == 1:                                    # SD1, LDM: 8 heads everywhere
        num_heads = counts.pop()
    elif len(widths) == 1 and width.is_integer():           # SD2, SDXL: 64-wide heads
        head_channels = int(width)
    else:
        raise ValueError(f"unet config: attention_head_dim {heads} is neither fixed heads nor fixed width")

    cross = d.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
        raise ValueError("unet config: per-level cross_attention_dim is not supported")
    adm = None
    if d.get("addition_embed_type") == "text_time":
        adm = d["projection_class_embeddings_input_dim"]
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=tuple(_per_level(d.get("layers_per_block", 2), levels, "layers_per_block")),
        transformer_depth=tuple(n if a else 0 for n, a in zip(layers, has_attn)),
        transformer_depth_middle=layers[-1] if mid_type else 0,
        mid_block=mid_type is not None,
        num_heads=num_heads,
        num_head_channels=head_channels,
        context_dim=cross,
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=adm,
        addition_time_embed_dim=d.get("addition_time_embed_dim") or 256,
        norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
    )


def diffusers_unet_config(cfg: UNetConfig, addition_time_embed_dim: int | None = None) -> dict:
    """UNetConfig -> the `UNet2DConditionModel` config that builds the same network (no `sample_size`:
    that is a pipeline property)."""
    addition_time_embed_dim = addition_time_embed_dim or cfg.addition_time_embed_dim
    levels, mc = len(cfg.channel_mult), cfg.model_channels
    channels = [m * mc for m in cfg.channel_mult]
    has_attn = [d > 0 for d in cfg.transformer_depth]
    # diffusers' middle block takes the last level's transformer depth: make that entry the middle's.
    layers = [d if d else 1 for d in cfg.transformer_depth]
    if cfg.mid_block:
        if has_attn[-1] and layers[-1] != cfg.transformer_depth_middle:
            raise ValueError("diffusers cannot express a middle depth different from the last level's")
        layers[-1] = cfg.transformer_depth_middle
    # "attention_head_dim" = number of heads (see unet_config_from_diffusers).
    heads = [max(1, cfg.heads(c)) for c in channels] if cfg.num_head_channels > 0 else cfg.num_heads

    def compact(values: list):  # one number when all levels agree, as the official configs write it
        return values[0] if len(set(values)) == 1 else list(values)

    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
    d = {
        **FIXED,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": channels,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.mid_block else None,
        "up_block_types": [UP_OF_DOWN[t] for t in reversed(down)],
        "layers_per_block": compact(list(cfg.num_res_blocks)),
        "transformer_layers_per_block": compact(layers),
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
    }
    if cfg.adm_in_channels:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                 projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return d
