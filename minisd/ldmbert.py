"""LDMBert: the text encoder of CompVis ldm-text2im-large-256 (Rombach et al. 2022, `BERTEmbedder`).

Despite the name it is not BERT's network: a 32-layer pre-norm transformer encoder (the
x-transformers `TransformerWrapper` of latent-diffusion, trained from scratch with the diffusion
model) that only borrows bert-base-uncased's WordPiece vocabulary. No attention mask: padding
tokens are attended to like any other, as in training. diffusers ports it as `LDMBertModel`.

    x_0 = E_tok[ids] + E_pos
    x_l' = x_{l-1} + Attn(LN(x_{l-1}))          8 heads of 64: q, k, v project 1280 -> 512 (no bias)
    x_l  = x_l' + W2·GELU(W1·LN(x_l') + b1) + b2   1280 -> 5120 -> 1280
    out  = LN(x_L)                                 (B, T, 1280), the UNet's cross-attention context

Attribute names are the original checkpoint's (after `cond_stage_model.`):

    transformer.token_emb                      Embedding(30522, 1280)
    transformer.pos_emb.emb                    Embedding(77, 1280)
    transformer.attn_layers.layers.{2i}        attention sub-layer i:    0=LayerNorm, 1=Attention
    transformer.attn_layers.layers.{2i+1}      feed-forward sub-layer i: 0=LayerNorm, 1=FeedForward
    transformer.norm                           final LayerNorm
    transformer.to_logits                      Linear(1280, 30522): the token head of training, unused
                                               here but kept so the checkpoint loads strictly

Shapes: B=batch, T=tokens (77), D=d_model (1280), nh=heads (8), hd=head dim (64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import TextEncoderOutput
from .config import LDMBertConfig


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)

    def forward(self, T: int, device) -> torch.Tensor:
        return self.emb(torch.arange(T, device=device))                     # (T, D)


class Attention(nn.Module):
    """Full (non-causal) self-attention, softmax(q kᵀ/√hd) v, with a narrower inner width nh·hd."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.n_heads, inner = cfg.n_heads, cfg.n_heads * cfg.head_dim
        self.to_q = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_k = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_v = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nh = self.n_heads
        q, k, v = (p(x).view(B, T, nh, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)                          # (B, nh, T, hd)
        return self.to_out(y.transpose(1, 2).reshape(B, T, -1))              # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        # net: 0=(0=Linear D->F, 1=GELU), 1=Dropout (p=0, a placeholder), 2=Linear F->D
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_dim), nn.GELU()),
            nn.Identity(),
            nn.Linear(cfg.ffn_dim, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionLayers(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        layers = []
        for _ in range(cfg.n_layer):
            # Each entry: 0=LayerNorm, 1=block. (The original's index 2 is a parameter-free
            # Residual module; the addition is written out in forward.)
            layers.append(nn.ModuleList([nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps), Attention(cfg)]))
            layers.append(nn.ModuleList([nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps), FeedForward(cfg)]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))        # pre-norm residual, alternating attention / feed-forward
        return x


class TransformerWrapper(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = AbsolutePositionalEmbedding(cfg)
        self.attn_layers = AttentionLayers(cfg)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.to_logits = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1], ids.device)    # (B, T, D)
        # BERTEmbedder asks for the embeddings, so the final LayerNorm's output is returned and
        # to_logits is skipped.
        return self.norm(self.attn_layers(x))


class LDMBert(nn.Module):
    """`forward(ids (B,T)) -> TextEncoderOutput(hidden (B, T, d_model), pooled None)`: the hidden states for the
    UNet's cross-attention; no pooled vector (LDM conditions on the sequence only)."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = TransformerWrapper(cfg)

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        return TextEncoderOutput(self.transformer(input_ids))
