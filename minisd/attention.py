"""The UNet's transformers: cross-attention, the GEGLU feed-forward, and the SpatialTransformer that
wraps them around a feature map (CompVis `ldm/modules/attention.py`, Rombach et al. 2022, Sec. 3.3).

    SpatialTransformer: GroupNorm -> proj_in -> depth x BasicTransformerBlock -> proj_out, + residual
    BasicTransformerBlock: x += attn1(norm1(x))            self-attention over the H*W pixels
                           x += attn2(norm2(x), context)   cross-attention to the text tokens
                           x += ff(norm3(x))               GEGLU MLP, 4x wide

Attribute names are the official checkpoint keys (`attn1.to_q`, `ff.net.0.proj`, `proj_in`, ...);
LoRA finds its target Linear layers by these names, so they must not change.

Shape legend: B=batch, C=channels (= transformer width D here), H,W=feature map size, N=H*W pixel
tokens, T=context tokens, Dc=context width, nh=heads, hd=head dim (nh*hd = D in every official model).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttention(nn.Module):
    """Multi-head attention, Eq. (1) of Vaswani et al. 2017: softmax(QKᵀ/√hd)·V, per head.

    Self-attention when `context` is None (keys/values from x), cross-attention otherwise
    (keys/values from the text encoder states, Eq. (3) of Rombach et al. 2022)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        # Projections without bias, as in the original (only the output projection has one).
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # to_out: 0=Linear, 1=Dropout (index kept: the checkpoint key is `to_out.0`)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        context = x if context is None else context
        nh = self.heads
        q = self.to_q(x)                                            # (B, N, nh*hd)
        k = self.to_k(context)                                      # (B, T, nh*hd)
        v = self.to_v(context)
        # Split the width into heads: (B, L, nh*hd) -> (B, nh, L, hd).
        q, k, v = (t.view(B, t.shape[1], nh, -1).transpose(1, 2) for t in (q, k, v))
        # Fused kernel; its default scale is 1/√hd. The flash / memory-efficient kernels keep the
        # softmax statistics in fp32, so fp16/bf16 attention does not overflow (what SD2.1's
        # `upcast_attention: true` guards against in the unfused original).
        out = F.scaled_dot_product_attention(q, k, v)               # (B, nh, N, hd)
        out = out.transpose(1, 2).reshape(B, N, -1)                 # (B, N, nh*hd)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU, Shazeer 2020 "GLU Variants Improve Transformer": x·W ⊙ GELU(x·V), with W and V
    fused into one Linear of twice the width (value half first, gate half second)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)                     # 2 x (B, N, dim_out)
        return x * F.gelu(gate)                                     # exact (erf) GELU, not tanh


class FeedForward(nn.Module):
    """Position-wise MLP D -> 4D (gated) -> D."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        # net: 0=GEGLU (holds `proj`), 1=Dropout, 2=Linear back to D
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, feed-forward, each residual."""

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)          # self
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)   # to the text
        # LayerNorm eps 1e-5 (PyTorch default), as in the original and diffusers.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """A transformer over the pixels of a feature map, conditioned on `context` by cross-attention.

    `use_linear` picks the projection type of the official checkpoints: 1x1 convs applied on the map
    (SD1, LDM) or Linear layers applied on the token sequence (SD2, SDXL). Both compute the same
    function; only the weight shape ([C, C, 1, 1] vs [C, C]) and where the reshape happens differ."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int, context_dim: int,
                 use_linear: bool = False, norm_num_groups: int = 32):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        # eps 1e-6 here (not the ResBlocks' 1e-5): the original `Normalize` and diffusers both use it.
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth)])
        if use_linear:
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)                                     # (B, D, H, W)
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, -1)             # (B, N, D) pixels as tokens
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
