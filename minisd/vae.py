"""AutoencoderKL: the VAE that maps images to the latent space the UNet works in, and back.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), Sec. 3.1:
an encoder E gives a diagonal Gaussian q(z|x) = N(μ(x), σ²(x)), a decoder D maps z back to pixels.
One network serves SD1.x, SD2.x, SDXL and LDM-256 (only `scale_factor` differs: 0.18215 vs 0.13025).

Module names are those of the CompVis single file with `first_stage_model.` stripped
(`encoder.down.0.block.1.conv2.weight`, `decoder.mid.attn_1.q.weight`, `quant_conv.weight`), so an
official file loads with `load_state_dict(strict=True)`; keys_vae.py maps diffusers names.

Scaling: `encode` / `decode` work on *unscaled* latents, exactly like the original `encode` / `decode`.
The pipeline multiplies by `cfg.scale_factor` after encoding and divides before decoding (so the
UNet sees unit-variance latents); `encode_latents` / `decode_latents` do that for convenience.

Shapes: B=batch, C=channels, H,W=image size, h,w=latent size = H/f, W/f with f = 2^(levels-1),
z=z_channels (4), N=h*w tokens of the mid attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VAEConfig

# GroupNorm eps of the original `Normalize` (1e-6, not PyTorch's default 1e-5).
NORM_EPS = 1e-6


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """h = conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))); out = shortcut(x) + h. No time embedding, no dropout."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 "network-in-network" conv matches the channel count only where it changes.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, q/k/v/proj_out as 1x1 convs (= Linear per pixel).

    out = x + proj_out(softmax(q kᵀ / √C) v). Used only in the mid blocks (lowest resolution)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        y = self.norm(x)
        # One head of width C: (B, C, h, w) -> (B, 1, N, C)
        # contiguous: SDPA's fused kernels need a unit stride in the last dim, else it falls back to the math
        # kernel, which stores the whole (N, N) score matrix in fp32 (1 GiB per image at 1024 px)
        q, k, v = (t(y).reshape(B, 1, C, h * w).transpose(2, 3).contiguous() for t in (self.q, self.k, self.v))
        # SDPA's fused kernels never materialise the (N, N) matrix: 1 GiB per image at a 1024 px
        # SDXL decode with the plain softmax(q kᵀ) v of the original; they also softmax in fp32.
        y = F.scaled_dot_product_attention(q, k, v)                          # (B, 1, N, C)
        y = y.transpose(2, 3).reshape(B, C, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. The original pads right/bottom only (0,1,0,1) and the
    conv has no padding, so the receptive fields sit differently from `padding=1`: weights depend on it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))                            # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv to smooth the blocks."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution (the only attention in the VAE)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: a `block` list of ResNets; the Encoder/Decoder add `downsample` /
    `upsample` to all levels but the last. (The original also has an empty `attn` list here:
    `attn_resolutions` is [] in every SD/LDM VAE, so it holds no tensors and we leave it out.)"""

    def __init__(self, blocks: list):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2z, h, w): mean and log-variance of q(z|x), stacked on channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, levels = cfg.norm_num_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, g)
                      for j in range(cfg.num_res_blocks)]
            self.down.append(Level(blocks))
            if i != levels - 1:
                self.down[i].downsample = Downsample(block_out)
            block_in = block_out
        self.mid = MidBlock(block_in, g)
        self.norm_out = Normalize(block_in, g)
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                                  # (B, ch, H, W)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)                                                 # (B, ch*mult[i], ...)
            if i != len(self.down) - 1:
                h = level.downsample(h)                                      # H, W halved
        h = self.mid(h)                                                      # (B, ch*mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))                       # (B, 2z, h, w)


class Decoder(nn.Module):
    """(B, z, h, w) -> (B, 3, H, W). `up[i]` is the level of resolution i, so `up[last]` runs first
    (the original builds the list back to front); each level has num_res_blocks + 1 ResNets."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, levels = cfg.norm_num_groups, len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        up = []
        for i in reversed(range(levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, g)
                      for j in range(cfg.num_res_blocks + 1)]
            up.insert(0, Level(blocks))
            if i != 0:
                up[0].upsample = Upsample(block_out)
            block_in = block_out
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))                                        # (B, ch*mult[-1], h, w)
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)                                                 # (B, ch*mult[i], ...)
            if i != 0:
                h = self.up[i].upsample(h)                                   # H, W doubled
        return self.conv_out(F.silu(self.norm_out(h)))                       # (B, 3, H, W)


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)) from the encoder moments (B, 2z, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, self.logvar = moments.chunk(2, dim=1)                     # (B, z, h, w) each
        # The original clamps log σ² to [-30, 20] so exp() neither underflows to 0 nor overflows.
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list | None = None) -> torch.Tensor:
        """z = μ + σ·ε (reparameterisation). ε is drawn as diffusers draws it: shape of the mean,
        dtype of the moments, on the generator's device (a CPU generator gives CPU noise, then moved),
        one draw of shape (1, z, h, w) per generator when a list is given."""
        device, dtype = self.moments.device, self.moments.dtype
        gens = generator if isinstance(generator, list) else [generator]
        rand_device = gens[0].device if gens[0] is not None else device
        if len(gens) == 1:
            eps = torch.randn(self.mean.shape, generator=gens[0], device=rand_device, dtype=dtype)
        else:
            one = (1,) + tuple(self.mean.shape[1:])
            eps = torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in gens])
        return self.mean + self.std * eps.to(device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), per image."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """Encoder + `quant_conv` (moments) and `post_quant_conv` + Decoder, as in ldm/models/autoencoder.py.

    Memory savers for large batches and images (slicing, tiling) are applied from outside:
    minisd/perf/vae_memory.py."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs between the autoencoder's z and the stored latent ("embed_dim"; 4 == z for SD).
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downscale(self) -> int:
        """f: pixels per latent pixel (every level but the last halves the resolution)."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    # -- unscaled API (as the original) ---------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> q(z|x). Latents are NOT multiplied by scale_factor here."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))           # moments (B, 2*embed_dim, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, embed_dim, h, w), NOT scaled by scale_factor -> image (B, 3, H, W), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))                         # (B, 3, H, W)

    # -- scaled API (what the UNet sees) ---------------------------------------------------------
    def encode_latents(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Sampled latents times scale_factor: unit variance, what the diffusion model is trained on."""
        return self.encode(x).sample(generator) * self.cfg.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z / self.cfg.scale_factor)
