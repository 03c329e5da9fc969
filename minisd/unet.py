"""The denoising UNet of latent diffusion (CompVis/Stability `openaimodel.UNetModel`), one
config-driven class for SD1.x, SD2.x, SDXL, LDM-256 and block-removed SD1.5 variants.

It predicts ε (or v, or x_0) from a noisy latent x_t, the timestep t and the text states c:
ε_θ(x_t, t, c), Eq. (3) of Rombach et al. 2022. Structure (Ronneberger et al. 2015 + Ho et al. 2020):

    t -> sinusoid -> time_embed (+ label_emb(y) for SDXL) = emb, added inside every ResBlock
    x -> input_blocks (ResBlocks [+ SpatialTransformer], Downsample between levels), each output kept
      -> middle_block (ResBlock, SpatialTransformer, ResBlock)
      -> output_blocks (each concatenates the last kept skip first; Upsample between levels) -> out

Attribute names are the official single-file keys minus `model.diffusion_model.`, so an official
checkpoint loads with `load_state_dict(strict=True)`. The block table of the two main models
(latent side for 512 px SD1.5 / 1024 px SDXL; R=ResBlock, A=SpatialTransformer xdepth, D/U=down/up):

    SD1.5                                 SDXL
    input_blocks[0]      conv  64² 320    input_blocks[0]      conv  128² 320
    input_blocks[1,2]    R+A   64² 320    input_blocks[1,2]    R     128² 320
    input_blocks[3]      D   ->32² 320    input_blocks[3]      D   -> 64² 320
    input_blocks[4,5]    R+A   32² 640    input_blocks[4,5]    R+A2   64² 640
    input_blocks[6]      D   ->16² 640    input_blocks[6]      D   -> 32² 640
    input_blocks[7,8]    R+A   16² 1280   input_blocks[7,8]    R+A10  32² 1280
    input_blocks[9]      D   -> 8² 1280   middle_block         R+A10+R 32² 1280
    input_blocks[10,11]  R      8² 1280   output_blocks[0,1]   R+A10  32² 1280
    middle_block         R+A+R  8² 1280   output_blocks[2]     R+A10+U -> 64²
    output_blocks[0,1]   R      8² 1280   output_blocks[3,4]   R+A2   64² 640
    output_blocks[2]     R+U  ->16²       output_blocks[5]     R+A2+U -> 128²
    output_blocks[3,4]   R+A   16² 1280   output_blocks[6,7,8] R     128² 320
    output_blocks[5]     R+A+U ->32²
    output_blocks[6,7]   R+A   32² 640
    output_blocks[8]     R+A+U ->64²
    output_blocks[9-11]  R+A   64² 320

Shape legend: B=batch, C=channels, H,W=latent size, T=context tokens, Dc=context width,
E=time-embedding width (4 x model_channels), P=pooled text width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SpatialTransformer
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Sec. 3.5 of Vaswani et al. 2017:
    [cos(t·ω_i), sin(t·ω_i)] with ω_i = max_period^(-i/half), i = 0..half-1 (cosines first: the
    CompVis order, = diffusers `flip_sin_to_cos=True, freq_shift=0`). t (N,) -> (N, dim) fp32."""
    half = dim // 2
    # Same operation order as the references: in fp32 a different order changes ω by an ulp, and
    # t·ω at t≈1000 then moves the cosines by ~1e-5.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                        # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)    # (N, 2*half)
    if dim % 2:  # odd width: a zero column at the end
        emb = F.pad(emb, (0, 1))
    return emb


def sdxl_vector_cond(pooled: torch.Tensor, time_ids: torch.Tensor, embed_dim: int = 256) -> torch.Tensor:
    """SDXL's vector conditioning y (Sec. 2.2 of Podell et al. 2023): the pooled text embedding next
    to a sinusoidal embedding of each size number (original h, w, crop top, left, target h, w).
    pooled (B, P), time_ids (B, 6) -> y (B, P + 6*embed_dim), fed to `label_emb`."""
    B = pooled.shape[0]
    sizes = timestep_embedding(time_ids.flatten(), embed_dim).reshape(B, -1)  # (B, 6*embed_dim), fp32
    # torch.cat promotes to the wider dtype; the UNet casts y to its own dtype.
    return torch.cat([pooled, sizes], dim=-1)


class ResBlock(nn.Module):
    """Residual block with the time embedding added between its two convs (Ho et al. 2020, App. B):
    h = conv(SiLU(norm(x))) + Linear(SiLU(emb)); out = skip(x) + conv(dropout(SiLU(norm(h))))."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32,
                 eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        # in_layers: 0=GroupNorm, 1=SiLU, 2=Conv3x3
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels, eps=eps), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        # emb_layers: 0=SiLU, 1=Linear E -> out_channels (one shift per channel)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # out_layers: 0=GroupNorm, 1=SiLU, 2=Dropout, 3=Conv3x3
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels, eps=eps), nn.SiLU(),
                                        nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # A 1x1 conv only where the width changes (a parameter-free identity otherwise, no key).
        if channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)                                      # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]             # (B, C_out) broadcast over H, W
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv (`op`), keeping the channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)                                          # (B, C, ⌈H/2⌉, ⌈W/2⌉)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv. `size` overrides x2 so that odd latent sizes (e.g. 800 px
    -> 100 -> 50 -> 25 -> 13) come back to their skip's size, as diffusers does; the original fails there."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose layers get what they need: ResBlocks the time embedding, transformers the
    context, Upsample the target size."""

    def forward(self, x, emb, context=None, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """UNetModel(cfg)(x (B,C,H,W), timesteps (B,), context (B,T,Dc), y (B,adm) | None) -> (B,C_out,H,W).

    The forward calls the blocks one by one, so speed and memory tricks can wrap each block from outside
    (gradient checkpointing: minisd/perf/checkpoint.py; torch.compile per block: minisd/perf/compile.py)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.channel_mult)
        for name in ("num_res_blocks", "transformer_depth"):
            if len(getattr(cfg, name)) != levels:
                raise ValueError(f"UNetConfig.{name} needs one entry per level ({levels}): {getattr(cfg, name)}")
        mc, groups, eps = cfg.model_channels, cfg.norm_num_groups, cfg.norm_eps
        E = 4 * mc  # time-embedding width (1280 for SD)

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, E, ch_out, groups, eps)

        def attn(ch: int, depth: int) -> SpatialTransformer:
            heads = cfg.heads(ch)
            return SpatialTransformer(ch, heads, ch // heads, depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, groups)

        # time_embed: 0=Linear, 1=SiLU, 2=Linear
        self.time_embed = nn.Sequential(nn.Linear(mc, E), nn.SiLU(), nn.Linear(E, E))
        if cfg.adm_in_channels:
            # label_emb.0: 0=Linear, 1=SiLU, 2=Linear (the outer Sequential is the official nesting)
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, E), nn.SiLU(),
                                                         nn.Linear(E, E)))
        else:
            self.label_emb = None

        # Encoder. `skips` records each input block's output width: the decoder pops them in reverse.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers = [res(ch, mult * mc)]                       # index 0: ResBlock
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(attn(ch, cfg.transformer_depth[level]))  # index 1: SpatialTransformer
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))  # index 0: Downsample
                skips.append(ch)

        # Bottleneck: 0=ResBlock, 1=SpatialTransformer, 2=ResBlock; absent in block-removed UNets.
        if cfg.mid_block:
            if cfg.transformer_depth_middle < 1:
                raise ValueError("a middle block needs transformer_depth_middle >= 1 (official layout)")
            self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, cfg.transformer_depth_middle),
                                                        res(ch, ch))
        else:
            self.middle_block = None

        # Decoder: one more block per level than the encoder (it also consumes the Downsample's /
        # conv_in's skip). Each block: 0=ResBlock, [1=SpatialTransformer], [last=Upsample].
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = cfg.channel_mult[level] * mc
            for j in range(cfg.num_res_blocks[level] + 1):
                layers = [res(ch + skips.pop(), out_ch)]            # input = h concatenated with a skip
                ch = out_ch
                if cfg.transformer_depth[level]:
                    layers.append(attn(ch, cfg.transformer_depth[level]))
                if level != 0 and j == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # out: 0=GroupNorm, 1=SiLU, 2=Conv3x3 to the latent channels
        self.out = nn.Sequential(nn.GroupNorm(groups, ch, eps=eps), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if timesteps.ndim == 0:  # one timestep for the whole batch
            timesteps = timesteps.expand(x.shape[0])
        # Sinusoids in fp32 (t = 999 is not representable in bf16), then the model's dtype.
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))  # (B, E)
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UNet is vector-conditioned (SDXL): pass y = sdxl_vector_cond(...)")
            emb = emb + self.label_emb(y.to(emb.dtype))                # (B, adm) -> (B, E)
        context = context.to(x.dtype)  # text states may arrive fp32 from an fp32 text encoder

        # Down: keep every block's output for the skip connections.
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        # Bottom of the U.
        if self.middle_block is not None:
            h = self.middle_block(h, emb, context)
        # Up: concatenate the matching skip (channels), and upsample to the next skip's size.
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)                      # (B, C_h + C_skip, H, W)
            size = hs[-1].shape[-2:] if hs else None
            h = block(h, emb, context, size)
        return self.out(h)                                           # (B, C_out, H, W)
