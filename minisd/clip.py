"""CLIP text transformer (Radford et al. 2021), the text encoder of SD1, SD2 and SDXL.

One class covers the three towers Stable Diffusion uses; `CLIPTextConfig` says which:

    model              width  layers  act         SD reads                          pooled
    OpenAI ViT-L/14    768    12      quick_gelu  SD1: last layer + final LN        -
                                                  SDXL enc. 1: layer -2, no LN      -
    OpenCLIP ViT-H/14  1024   23(24)  gelu        SD2: last of 23 blocks + final LN -
    OpenCLIP ViT-bigG  1280   32      gelu        SDXL enc. 2: layer -2, no LN      projected, 1280

Parameter names are the Hugging Face ones (`text_model.encoder.layers.{i}.self_attn.q_proj`, ...),
which is also how SD1 single files and SDXL's first encoder store them; OpenCLIP files are renamed
by keys_text.py.

A pre-norm transformer with a causal mask (token t sees tokens <= t):
    x_0 = E_tok[ids] + E_pos
    x_l = x_l' + MLP(LN2(x_l')),   x_l' = x_{l-1} + Attn(LN1(x_{l-1}))
    pooled = LN_final(x_L)[EOS position] (@ P when there is a projection)

Shapes: B=batch, T=tokens (77), D=width, nh=heads, hd=head dim = D/nh, F=MLP width.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextConfig

EOS_ID = 49407   # <|endoftext|>: the pooled embedding is read at its first occurrence


class TextEncoderOutput(NamedTuple):
    """What every text encoder returns (CLIP, OpenCLIP, LDMBert), and `StableDiffusion.encode_text` too."""
    hidden: torch.Tensor                 # (B, T, D) the states the UNet cross-attends to
    pooled: torch.Tensor | None = None   # (B, D) or projected (B, P): one vector per prompt; None for LDMBert


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU, x·σ(1.702x): the original CLIP weights were trained
    with it, so using exact GELU there would shift every activation slightly."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}   # F.gelu is the exact erf form, as in OpenCLIP


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Positions are made here rather than kept as a `position_ids` buffer: a non-persistent buffer
        # would stay empty when the model is built on the meta device and then loaded.
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)    # (B, T, D)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention, softmax(q kᵀ/√hd + M) v with M = -inf above the diagonal."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        nh, hd = self.n_head, D // self.n_head
        q, k, v = (p(x).view(B, T, nh, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # (B, nh, T, hd); the 1/√hd scale is SDPA's default.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, D)                              # (B, T, D)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)   # (B, T, F)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)   # (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-norm residual blocks: the residual stream itself is never normalised.
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """`forward(ids (B,T)) -> TextEncoderOutput(hidden (B,T,D), pooled (B,D) or (B,P))`.

    hidden: the output of block `L + cfg.layer + 1` of L (cfg.layer = -1: the last block, -2: the
    one before, "CLIP skip 2"), through `final_layer_norm` iff `cfg.final_norm`. This is what the
    UNet cross-attends to. pooled: the final-LayerNorm'd last block output at each row's first
    <|endoftext|>, times `text_projection` if the config has one (SDXL's pooled text embedding).
    """

    def __init__(self, cfg: CLIPTextConfig, eos_token_id: int = EOS_ID):
        super().__init__()
        if not -cfg.num_hidden_layers <= cfg.layer <= -1:
            raise ValueError(f"layer {cfg.layer} outside -{cfg.num_hidden_layers}..-1")
        self.cfg, self.eos_token_id = cfg, eos_token_id
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:
            # OpenCLIP stores this as a bare [D, P] matrix used as x @ P; as a Linear it is Pᵀ.
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor):
        tm = self.text_model
        x = tm.embeddings(input_ids)                                        # (B, T, D)
        n_layers = len(tm.encoder.layers)
        take = n_layers + self.cfg.layer                                    # index of the block we read
        hidden = None
        for i, block in enumerate(tm.encoder.layers):
            x = block(x)
            if i == take:
                hidden = x
        if self.cfg.final_norm:
            hidden = tm.final_layer_norm(hidden)

        # Pooled: the state at the end-of-text token, the only position that has seen the whole
        # prompt under the causal mask. argmax of the boolean row finds the first EOS, so pad tokens
        # that are themselves EOS (SD1 padding) are skipped. Every tokenized prompt has one; this
        # also equals transformers' legacy rule (argmax of the ids) since 49407 is the largest id.
        last = tm.final_layer_norm(x)                                       # (B, T, D)
        eos = (input_ids == self.eos_token_id).int().argmax(dim=-1)         # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        if self.cfg.projection_dim:
            pooled = self.text_projection(pooled)                           # (B, P)
        return TextEncoderOutput(hidden, pooled)
