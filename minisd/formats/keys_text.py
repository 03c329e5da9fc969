"""Name tables of the text encoders: OpenCLIP and Hugging Face CLIP, diffusers LDMBert <-> ours.

Our CLIP uses the Hugging Face names and our LDMBert the original CompVis names, so:

    SD1 single file, SDXL enc. 1, diffusers text_encoder/   HF CLIP      -> clip_from_hf (drops position_ids)
    SD2 single file, SDXL enc. 2 (OpenCLIP `model.`)        OpenCLIP     -> clip_from_openclip
    LDM model.ckpt (`cond_stage_model.`)                    CompVis      -> no table, names are ours
    LDM diffusers bert/                                     LDMBertModel -> ldmbert_from_diffusers

OpenCLIP -> HF CLIP is the one real rename besides plain name pairs:
  * `attn.in_proj_weight` [3D, D] / `in_proj_bias` [3D] (torch MultiheadAttention) hold q, k, v
    stacked in that order: split into `q_proj`, `k_proj`, `v_proj`.
  * `positional_embedding` [77, D] and `text_projection` [D, P] are bare parameters; OpenCLIP
    computes `x @ text_projection`, so our Linear weight [P, D] is its TRANSPOSE. The matrix is
    square for ViT-H and bigG: a missing transpose loads without complaint and only shows in numbers.
  * SD2 stores all 24 ViT-H blocks but reads the penultimate layer, i.e. the output of block 22:
    we build 23 blocks and ignore block 23 (so do diffusers' folders). `logit_scale` (the image-text
    contrastive temperature) has no use in a text encoder.

Every function is strict (rename.py): a source tensor is renamed or ignored with a reason (returned
as {name: reason}), never silently dropped; a name the table does not know, or a parameter the table
cannot fill, raises KeyError listing the first few names. Tensors are moved as views where possible
(renames, the q/k/v split), not copied.
"""
from __future__ import annotations

import re

import torch

from ..config import CLIPTextConfig
from .rename import check_names, count_index, strict_rename

TEXT_MODEL = "text_model."
POSITION_IDS = "text_model.embeddings.position_ids"


# ---------------------------------------------------------------------------------------------
# OpenCLIP <-> HF CLIP
# ---------------------------------------------------------------------------------------------

def openclip_pairs(cfg: CLIPTextConfig):
    """(ours, OpenCLIP) for every tensor that is a plain rename (all but q/k/v and the projection)."""
    yield "text_model.embeddings.token_embedding.weight", "token_embedding.weight"
    yield "text_model.embeddings.position_embedding.weight", "positional_embedding"
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for o, t in (("layer_norm1", "ln_1"), ("self_attn.out_proj", "attn.out_proj"),
                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                yield f"{ours}{o}.{p}", f"{theirs}{t}.{p}"
    for p in ("weight", "bias"):
        yield f"text_model.final_layer_norm.{p}", f"ln_final.{p}"


def qkv_pairs(cfg: CLIPTextConfig):
    """(our q, k, v prefixes, OpenCLIP fused prefix) per block: `in_proj_{weight,bias}` = cat(q, k, v)."""
    for i in range(cfg.num_hidden_layers):
        ours = tuple(f"text_model.encoder.layers.{i}.self_attn.{x}_proj" for x in "qkv")
        yield ours, f"transformer.resblocks.{i}.attn.in_proj"


def openclip_ignored(name: str, cfg: CLIPTextConfig) -> str | None:
    """Why an OpenCLIP tensor is not used by a `cfg` model (None: it is used)."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return (f"block {m.group(1)} comes after the layer the UNet reads "
                f"({cfg.num_hidden_layers} blocks are built)")
    if name == "logit_scale":
        return "CLIP's contrastive temperature, not part of the text encoder's computation"
    if name == "text_projection" and not cfg.projection_dim:
        return "pooled-text projection, unused by this model (no projection_dim)"
    if name == "attn_mask":
        return "causal mask buffer, rebuilt at run time"
    return None


def clip_from_openclip(sd: dict, cfg: CLIPTextConfig) -> tuple[dict, dict]:
    """OpenCLIP text tower (prefix `cond_stage_model.model.` / `conditioner.embedders.1.model.`
    already stripped) -> (our state dict, {ignored name: reason})."""
    ignored = {k: why for k in sd if (why := openclip_ignored(k, cfg))}
    src = {k: v for k, v in sd.items() if k not in ignored}
    special = [f"{fused}_{p}" for _, fused in qkv_pairs(cfg) for p in ("weight", "bias")]
    special += ["text_projection"] if cfg.projection_dim else []
    check_names("OpenCLIP text encoder", missing=[n for n in special if n not in src])
    out = {}
    for ours, fused in qkv_pairs(cfg):
        for p in ("weight", "bias"):
            # [3D, D] -> three [D, D] (bias: [3D] -> three [D]), in q, k, v order.
            for name, part in zip(ours, src.pop(f"{fused}_{p}").chunk(3, dim=0)):
                out[f"{name}.{p}"] = part
    if cfg.projection_dim:
        out["text_projection.weight"] = src.pop("text_projection").T.contiguous()   # [D, P] -> [P, D]
    renames = ((theirs, ours) for ours, theirs in openclip_pairs(cfg))
    out.update(strict_rename(src, renames, "OpenCLIP text encoder"))
    return out, ignored


def clip_to_openclip(sd: dict, cfg: CLIPTextConfig) -> dict:
    """Ours -> OpenCLIP names (the inverse of `clip_from_openclip`; tensors it ignored, such as SD2's
    24th block and `logit_scale`, are not recreated: keep them from the source file)."""
    src = dict(sd)
    src.pop(POSITION_IDS, None)          # tolerated: some state dicts still carry the old buffer
    special = [f"{o}.{p}" for ours, _ in qkv_pairs(cfg) for o in ours for p in ("weight", "bias")]
    special += ["text_projection.weight"] if cfg.projection_dim else []
    check_names("CLIP -> OpenCLIP", missing=[n for n in special if n not in src])
    out = {}
    for ours, fused in qkv_pairs(cfg):
        for p in ("weight", "bias"):
            # three [D, D] -> [3D, D] (bias: three [D] -> [3D])
            out[f"{fused}_{p}"] = torch.cat([src.pop(f"{o}.{p}") for o in ours])
    if cfg.projection_dim:
        out["text_projection"] = src.pop("text_projection.weight").T.contiguous()   # [P, D] -> [D, P]
    out.update(strict_rename(src, openclip_pairs(cfg), "CLIP -> OpenCLIP"))
    return out


# ---------------------------------------------------------------------------------------------
# HF CLIP (single files, diffusers folders)
# ---------------------------------------------------------------------------------------------

HF_CLIP_NAME = re.compile(
    r"text_model\.(embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))"
    r"|text_projection\.weight")


def clip_from_hf(sd: dict) -> tuple[dict, dict]:
    """Hugging Face CLIPTextModel(WithProjection) names -> ours (the same names), checking each one.
    Names without the `text_model.` prefix (transformers >= 5 writes CLIPTextModel so) get it back;
    `position_ids` (a persistent buffer in transformers < 4.31) is ignored."""
    out, ignored, unknown = {}, {}, []
    for k, v in sd.items():
        name = k if k.startswith((TEXT_MODEL, "text_projection")) else TEXT_MODEL + k
        if name == POSITION_IDS:
            ignored[k] = "position indices 0..76, recomputed at run time"
        elif HF_CLIP_NAME.fullmatch(name):
            out[name] = v
        else:
            unknown.append(k)
    check_names("CLIP text encoder", unexpected=unknown)
    return out, ignored


# ---------------------------------------------------------------------------------------------
# LDMBert: diffusers `bert/` (LDMBertModel) <-> ours (CompVis names)
# ---------------------------------------------------------------------------------------------

def ldmbert_pairs(n_layer: int):
    """(ours, diffusers) for every LDMBert tensor. Our layers alternate attention (2i) and
    feed-forward (2i+1) sub-layers; diffusers groups both into `model.layers.{i}`."""
    yield "transformer.token_emb.weight", "model.embed_tokens.weight"
    yield "transformer.pos_emb.emb.weight", "model.embed_positions.weight"
    for i in range(n_layer):
        attn, ff = f"transformer.attn_layers.layers.{2 * i}.", f"transformer.attn_layers.layers.{2 * i + 1}."
        d = f"model.layers.{i}."
        for p in ("weight", "bias"):
            yield f"{attn}0.{p}", f"{d}self_attn_layer_norm.{p}"
        for ours, theirs in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj")):
            yield f"{attn}1.{ours}.weight", f"{d}self_attn.{theirs}.weight"    # no bias
        for p in ("weight", "bias"):
            yield f"{attn}1.to_out.{p}", f"{d}self_attn.out_proj.{p}"
            yield f"{ff}0.{p}", f"{d}final_layer_norm.{p}"
            yield f"{ff}1.net.0.0.{p}", f"{d}fc1.{p}"
            yield f"{ff}1.net.2.{p}", f"{d}fc2.{p}"
    for p in ("weight", "bias"):
        yield f"transformer.norm.{p}", f"model.layer_norm.{p}"
        yield f"transformer.to_logits.{p}", f"to_logits.{p}"


def ldmbert_from_diffusers(sd: dict) -> dict:
    """diffusers `bert/` state dict (LDMBertModel) -> ours. The layer count comes from the names."""
    n = count_index(sd, r"model\.layers\.(\d+)\.")
    return strict_rename(sd, ((theirs, ours) for ours, theirs in ldmbert_pairs(n)), "LDMBert (diffusers)")


def ldmbert_to_diffusers(sd: dict) -> dict:
    """Ours -> diffusers `bert/` names."""
    n = count_index(sd, r"transformer\.attn_layers\.layers\.(\d+)\.")
    return strict_rename(sd, ldmbert_pairs((n + 1) // 2), "LDMBert -> diffusers")
