"""Name table between diffusers' `AutoencoderKL` (`vae/` or `vqvae/` folder) and ours (= CompVis names).

The whole converter is `module_pairs`: one (ours, diffusers) module-name pair per line; a tensor name
is its module name + `.weight` / `.bias`. Three things are not plain renames:

  * diffusers indexes the decoder's `up_blocks` in execution order, CompVis by resolution level:
    `up_blocks.i` = `decoder.up.{levels-1-i}`.
  * The mid attention's q/k/v/out are `nn.Linear` [C, C] in diffusers, 1x1 convs [C, C, 1, 1] here.
  * Two attention namings exist in real diffusers files (both accepted, chosen on export):
        new    : to_q, to_k, to_v, to_out.0   (diffusers >= 0.14: SD1.5 fp16 variant, SDXL)
        legacy : query, key, value, proj_attn (older files: SD1.5 fp32, SD2.1, LDM-256 `vqvae/`)
    `group_norm` is the same in both.

Strictness (rename.py's `strict_rename`): every source tensor must be consumed, and every module of the
table present (the `nin_shortcut` 1x1 convs exist only where a ResNet changes width, so they are
optional); otherwise a KeyError lists the first offending names. The level / block counts come from
the names themselves.
"""
from __future__ import annotations

from .rename import count_index, strict_rename, tensor_pairs

# ours -> (new diffusers name, legacy diffusers name), inside `mid.attn_1` / `mid_block.attentions.0`.
ATTENTION_NAMES = {
    "norm": ("group_norm", "group_norm"),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}
# Our 1x1 convs that are Linear layers in diffusers (weight reshaped [C, C] <-> [C, C, 1, 1]).
LINEAR_IN_DIFFUSERS = ("q", "k", "v", "proj_out")


def resnet_pairs(ours: str, theirs: str):
    """ResnetBlock (CompVis) <-> ResnetBlock2D (diffusers): only the shortcut is renamed."""
    for name in ("norm1", "conv1", "norm2", "conv2"):
        yield f"{ours}.{name}", f"{theirs}.{name}"
    yield f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut"                 # optional (width change)


def mid_pairs(part: str, legacy: bool):
    """encoder/decoder `mid` (block_1, attn_1, block_2) <-> `mid_block` (resnets.0, attentions.0, resnets.1)."""
    yield from resnet_pairs(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
    for ours, names in ATTENTION_NAMES.items():
        yield f"{part}.mid.attn_1.{ours}", f"{part}.mid_block.attentions.0.{names[legacy]}"
    yield from resnet_pairs(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")


def module_pairs(levels: int, blocks: int, legacy: bool = False):
    """Every (ours, diffusers) module pair of a VAE with `levels` resolutions and `blocks` ResNets per
    encoder level (decoder levels have blocks + 1)."""
    yield "encoder.conv_in", "encoder.conv_in"
    for i in range(levels):
        for j in range(blocks):
            yield from resnet_pairs(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != levels - 1:
            yield f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"
    yield from mid_pairs("encoder", legacy)
    yield "encoder.norm_out", "encoder.conv_norm_out"
    yield "encoder.conv_out", "encoder.conv_out"
    yield "quant_conv", "quant_conv"
    yield "post_quant_conv", "post_quant_conv"
    yield "decoder.conv_in", "decoder.conv_in"
    yield from mid_pairs("decoder", legacy)
    for i in range(levels):
        level = levels - 1 - i  # diffusers runs up_blocks.0 first = our lowest resolution
        for j in range(blocks + 1):
            yield from resnet_pairs(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if level != 0:
            yield f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"
    yield "decoder.norm_out", "decoder.conv_norm_out"
    yield "decoder.conv_out", "decoder.conv_out"


def _is_linear_weight(ours: str) -> bool:
    """Our tensor `ours` is a mid-attention 1x1 conv weight that diffusers stores as a Linear weight."""
    module, _, param = ours.rpartition(".")
    return param == "weight" and module.rsplit(".", 1)[-1] in LINEAR_IN_DIFFUSERS and ".mid.attn_1." in module


def _shortcut(name: str) -> bool:
    """The 1x1 shortcut convs exist only where a ResNet changes width: their pairs are optional."""
    return name.rpartition(".")[0].endswith(("nin_shortcut", "conv_shortcut"))


def vae_from_diffusers(sd: dict) -> dict:
    """diffusers AutoencoderKL state dict (either attention naming) -> ours."""
    legacy = any(".mid_block.attentions.0.query." in k for k in sd)
    levels = count_index(sd, r"encoder\.down_blocks\.(\d+)\.")
    blocks = count_index(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    pairs = tensor_pairs((theirs, ours) for ours, theirs in module_pairs(levels, blocks, legacy))

    def reshape(_, ours, t):  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        return t.reshape(*t.shape[:2], 1, 1) if _is_linear_weight(ours) else t

    return strict_rename(sd, pairs, "vae_from_diffusers", optional=_shortcut, fix=reshape)


def vae_to_diffusers(sd: dict, attention_names: str = "new") -> dict:
    """Our state dict -> diffusers AutoencoderKL names; attention_names "new" (to_q ...) or "legacy"."""
    if attention_names not in ("new", "legacy"):
        raise ValueError(f"attention_names must be 'new' or 'legacy', not {attention_names!r}")
    levels = count_index(sd, r"encoder\.down\.(\d+)\.")
    blocks = count_index(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    pairs = tensor_pairs(module_pairs(levels, blocks, attention_names == "legacy"))

    def reshape(ours, _, t):  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        return t.reshape(t.shape[:2]) if _is_linear_weight(ours) else t

    return strict_rename(sd, pairs, "vae_to_diffusers", optional=_shortcut, fix=reshape)
