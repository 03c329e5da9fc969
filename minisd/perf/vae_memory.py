"""VAE memory savers, applied from outside vae.py: slicing and tiling of `encode` / `decode`.

    set_vae_memory(vae, slicing=True)                  # train.py --vae-slicing
    set_vae_memory(vae, tiling=True)                   # train.py --vae-tiling (tiles of 64 latent pixels)

What they change:
  slicing  nothing but rounding: one image of the batch at a time through the same layers. Each image's numbers
           are computed alone instead of in a batch, so a kernel chosen for batch 1 may round differently in the
           last bit (measured on the CPU, a tiny random VAE: 3e-7 on the moments, 3e-6 on decoded pixels of
           magnitude ~5; tests/test_vae.py holds it to 1e-5). Peak memory: one image's activations, not the batch's.
  tiling   an approximation: overlapping tiles of `tile_latent` latent pixels (`tile_latent`·f image pixels when
           encoding), each through the whole encoder / decoder, blended linearly over `tile_overlap` latent pixels.
           GroupNorm statistics and the mid-block attention then see one tile, not the image, so results are close
           to, not equal to, the untiled ones (relative L2 error ~0.1 on random weights and noise, far less on real
           images: tests/test_vae.py). Use it only where an image does not fit. Peak memory: one tile's activations.

`set_vae_memory` stores the settings on the VAE as plain attributes (`vae.slicing`, `vae.tiling`, `vae.tile_latent`,
`vae.tile_overlap`; not in the state dict) and replaces `vae.encode` / `vae.decode` on this instance by the
functions below, which read those attributes at every call and fall back to the chapter's own methods.
"""
from __future__ import annotations

import functools

import torch

from ..vae import AutoencoderKL, DiagonalGaussian


def set_vae_memory(vae: AutoencoderKL, slicing: bool = False, tiling: bool = False, tile_latent: int = 64,
                   tile_overlap: int = 16) -> AutoencoderKL:
    """Turn slicing and/or tiling of `vae.encode` / `vae.decode` on or off (see the module docstring). The default
    tile is 64 latent pixels (512 px for f = 8) with a 16-pixel overlap. Returns the VAE."""
    vae.slicing, vae.tiling = slicing, tiling
    vae.tile_latent, vae.tile_overlap = tile_latent, tile_overlap
    if slicing or tiling:
        # instance attributes: `vae.encode(x)` (and encode_latents, the pipeline, the trainer) now call these;
        # partial() rather than a closure, so copy.deepcopy(vae) gets functions bound to the copy
        vae.encode = functools.partial(encode, vae)
        vae.decode = functools.partial(decode, vae)
    else:
        vae.__dict__.pop("encode", None)
        vae.__dict__.pop("decode", None)
    return vae


def encode(vae: AutoencoderKL, x: torch.Tensor) -> DiagonalGaussian:
    """`AutoencoderKL.encode`, per image and/or per tile: the moments of q(z|x) assembled from the pieces."""
    f = vae.downscale

    def moments(piece):
        return type(vae).encode(vae, piece).moments                       # (b, 2*embed_dim, h', w')
    return DiagonalGaussian(_run(vae, moments, x, vae.tile_latent * f, vae.tile_overlap * f, 1 / f))


def decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKL.decode`, per image and/or per tile."""
    def image(piece):
        return type(vae).decode(vae, piece)                                # (b, 3, f*h', f*w')
    return _run(vae, image, z, vae.tile_latent, vae.tile_overlap, vae.downscale)


def _run(vae: AutoencoderKL, fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply fn (the encoder or decoder half) whole, per image (slicing) and/or per tile (tiling)."""
    if getattr(vae, "slicing", False) and x.shape[0] > 1:
        return torch.cat([_run(vae, fn, xi, tile, overlap, scale) for xi in x.split(1)])
    if getattr(vae, "tiling", False) and max(x.shape[-2:]) > tile:
        return tiled(fn, x, tile, overlap, scale)
    return fn(x)


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Σ_t ramp_t · fn(x_t) / Σ_t ramp_t over overlapping tiles t. The ramp rises linearly over the
    overlap at every tile edge; dividing by the summed ramps makes the weights of each output pixel
    add up to 1, so seams fade instead of showing. `scale` = output pixels per input pixel."""
    H, W = x.shape[-2:]
    stride = max(tile - overlap, 1)

    def starts(n):  # tile origins covering [0, n): regular steps, last tile flush with the edge
        s = list(range(0, max(n - tile, 0) + 1, stride))
        return s if s[-1] + tile >= n else s + [n - tile]

    out = weight = None
    for i in starts(H):
        for j in starts(W):
            y = fn(x[..., i:i + tile, j:j + tile])                      # (B, C', tile*scale, ...)
            th, tw = y.shape[-2:]
            ramp_len = max(int(overlap * scale), 1)
            ry = torch.arange(th, device=y.device)
            rx = torch.arange(tw, device=y.device)
            # Distance to the nearest tile edge, 1 at the edge, saturating at 1 after the overlap.
            wy = ((torch.minimum(ry, th - 1 - ry) + 1) / ramp_len).clamp(max=1.0)
            wx = ((torch.minimum(rx, tw - 1 - rx) + 1) / ramp_len).clamp(max=1.0)
            w = (wy[:, None] * wx[None, :]).to(y.dtype)                  # (tile*scale, tile*scale)
            if out is None:
                shape = (*y.shape[:2], int(H * scale), int(W * scale))
                out, weight = y.new_zeros(shape), y.new_zeros(shape[-2:])
            oi, oj = int(i * scale), int(j * scale)
            out[..., oi:oi + th, oj:oj + tw] += y * w
            weight[oi:oi + th, oj:oj + tw] += w
    return out / weight
