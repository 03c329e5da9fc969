"""Text -> image and image -> image with classifier-free guidance.

The loop is the one every Stable Diffusion sampler shares:

    x_T ~ N(0, I) · init_noise_sigma                 (drawn with a CPU generator: same seed, same image
    for t in timesteps:                                as diffusers, whatever the device)
        ε_u, ε_c = UNet(x_t, t, c_neg), UNet(x_t, t, c)
        ε = ε_u + s·(ε_c − ε_u)                       classifier-free guidance, Ho & Salimans 2022, Eq. 6
        x_{t-1} = sampler.step(ε, t, x_t)
    image = VAE.decode(x_0 / scale_factor)

The loop's UNet call is one method, `run_unet`, so that speed tricks can replace it from outside the chapter
(minisd/perf/graphs.py replays it from a CUDA graph; minisd/perf/compile.py compiles the UNet's blocks).

Shapes: B=batch, T=77 tokens, D=text width, h,w = latent size = image size / vae_scale.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .clip import TextEncoderOutput
from .model import StableDiffusion
from .samplers import make_sampler
from .unet import sdxl_vector_cond


class Pipeline:
    """Text -> image (and image -> image) with a StableDiffusion model; `pipe(prompt, ...)` returns PIL images.

    Faster sampling on a GPU is applied from outside: `minisd.perf.graphs.use_cuda_graph(pipe)` (sample.py
    --cuda-graph) and `minisd.perf.compile.compile_unet_blocks(pipe.model.unet)` (sample.py --compile)."""

    def __init__(self, model: StableDiffusion, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cast: bool = True, vae_dtype: torch.dtype | None = None):
        self.model = model.eval().to(device)
        self.device, self.dtype = torch.device(device), dtype
        if not cast:
            # the caller's dtypes stay as they are (a trainer: frozen base in bf16, adapters in fp32, which a
            # cast would round); `dtype` is then only the UNet input dtype
            self.vae_dtype = next(model.vae.parameters()).dtype
            return
        # The UNet and text encoders run in `dtype`; the VAE stays fp32 when its config asks for it
        # (the SDXL VAE overflows in fp16 and decodes black images), unless `vae_dtype` names one: bf16 has fp32's
        # exponent range, so it does not overflow where fp16 does, and decodes on the tensor cores (SDXL 1024 px
        # on an H100: the fp32 decode was 317 ms of a 1396 ms image, bench/results/h100-2026-11-23-compile).
        self.model.unet.to(dtype)
        for te in self.model.text_encoders:
            te.to(dtype)
        if vae_dtype is not None:
            self.vae_dtype = vae_dtype
        else:
            self.vae_dtype = torch.float32 if model.cfg.vae.force_upcast else dtype
        self.model.vae.to(self.vae_dtype)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], chunks: int | None = None):
        """Prompts -> (context (B,T,D) for cross-attention, pooled (B,P) or None): `StableDiffusion.encode_text`.

        Prompts longer than 75 tokens are read the A1111 way with CLIP: in chunks of 75 tokens, each wrapped and
        padded to 77 and encoded on its own, the hidden states concatenated (T = 77 · chunks; the UNet's
        cross-attention takes any T), pooled from the first chunk. A prompt up to 75 tokens is one chunk, exactly
        what diffusers encodes. `chunks`: the number to use (conditioning() makes prompt and negative agree)."""
        ids = [tok.chunk_ids(prompts, chunks) if hasattr(tok, "chunk_ids")  # (B, chunks, 77)
               else tok(prompts)[:, None]                                  # BERT (LDM): one window, the rest cut
               for tok in self.model.tokenizers]
        outs = [self.model.encode_text([x[:, c].to(self.device) for x in ids]) for c in range(ids[0].shape[1])]
        return TextEncoderOutput(torch.cat([o.hidden for o in outs], dim=1), outs[0].pooled)  # (B, 77·chunks, D)

    def n_chunks(self, prompts: list[str]) -> int:
        """75-token chunks the longest prompt needs (1 for every prompt diffusers reads whole)."""
        tok = self.model.tokenizers[0]
        if not hasattr(tok, "chunk_ids"):
            return 1
        n = tok.max_length - 2
        return max(1, *((len(tok.prompt_tokens(p)) + n - 1) // n for p in prompts))

    def conditioning(self, prompts: list[str], negatives: list[str] | None, guidance: bool):
        """Context (and SDXL pooled) for [negatives..., prompts...] when guidance is on."""
        chunks = self.n_chunks(prompts + (negatives or []))
        ctx, pooled = self.encode_prompt(prompts, chunks)
        if not guidance:
            return ctx, pooled
        if negatives is None and self.model.cfg.zero_empty_negative:
            # SDXL was trained to read zeros, not the embedding of "", as "no prompt".
            n_ctx, n_pooled = torch.zeros_like(ctx), None if pooled is None else torch.zeros_like(pooled)
        else:
            n_ctx, n_pooled = self.encode_prompt(negatives or [""] * len(prompts), chunks)
        pooled = None if pooled is None else torch.cat([n_pooled, pooled])
        return torch.cat([n_ctx, ctx]), pooled

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative: str | list[str] | None = None, steps: int = 30,
                 sampler: str = "ddim", karras: bool = False, cfg_scale: float = 7.5, seed: int = 0,
                 width: int | None = None, height: int | None = None, batch: int = 1,
                 init_image: Image.Image | None = None, strength: float = 0.8, eta: float = 0.0,
                 progress: bool | str = False) -> list[Image.Image]:
        m, cfg = self.model, self.model.cfg
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(batch)]           # batch images per prompt
        if isinstance(negative, str):  # one negative for every prompt
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
            negative = [negative] * n_prompts if negative else None
        negatives = None if negative is None else [n for n in negative for _ in range(batch)]
        height = height or cfg.resolution
        width = width or cfg.resolution
        f = m.vae_scale
        if height % f or width % f:
            raise ValueError(f"width and height must be multiples of {f}, got {width}x{height}")
        B = len(prompts)
        guidance = cfg_scale > 1.0
        ctx, pooled = self.conditioning(prompts, negatives, guidance)
        y = None
        if cfg.unet.adm_in_channels:
            # SDXL micro-conditioning: (original h, w, crop top, left, target h, w); no crop here.
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=ctx.dtype,
                                    device=self.device).repeat(len(ctx), 1)
            y = sdxl_vector_cond(pooled, time_ids, embed_dim=cfg.unet.addition_time_embed_dim)

        # All randomness comes from one CPU generator, drawn in diffusers' order.
        gen = torch.Generator("cpu").manual_seed(seed)
        smp = make_sampler(sampler, cfg.schedule, steps, karras=karras, eta=eta)
        shape = (B, cfg.unet.in_channels, height // f, width // f)
        start = 0
        if init_image is None:
            x = torch.randn(shape, generator=gen, dtype=torch.float32) * smp.init_noise_sigma
        else:
            img = image_to_tensor(init_image.resize((width, height)), self.vae_dtype, self.device)
            x0 = m.vae.encode(img).sample(generator=gen) * cfg.vae.scale_factor     # (1, 4, h, w)
            x0 = x0.float().cpu().repeat(B, 1, 1, 1)
            start = smp.img2img_start(strength)
            noise = torch.randn(shape, generator=gen, dtype=torch.float32)
            x = smp.add_noise(x0, noise, start)
        x = x.to(self.device)

        timesteps = smp.timesteps
        loop = range(start, len(timesteps))
        if progress:  # a tqdm bar on stderr; a string names it (sample.py: "image 2/5")
            from tqdm import tqdm
            loop = tqdm(loop, desc=progress if isinstance(progress, str) else "sampling", unit="step")
        for i in loop:
            t = timesteps[i]
            xin = smp.scale_model_input(x, i)
            xin = torch.cat([xin, xin]) if guidance else xin                # (2B, C, h, w)
            # Timesteps stay fp32: in bf16, t = 999 would round to 1000.
            tt = torch.full((len(xin),), float(t), device=self.device)
            eps = self.run_unet(xin.to(self.dtype), tt, ctx, y=y).float()
            if guidance:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            x = smp.step(eps, i, x, generator=gen)
        return self.decode(x)

    def run_unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        """The loop's UNet call: ε (or v, x_0) for x (B, C, h, w) at timesteps t (B,) with context (B, T, D)."""
        return self.model.unet(x, t, context, y=y)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        img = self.model.vae.decode((latents / self.model.cfg.vae.scale_factor).to(self.vae_dtype))
        if not bool(torch.isfinite(img).all()):  # would be saved as a black picture
            raise ValueError("the decoded image holds NaN/Inf values (an overflow: try --dtype fp32 or "
                             "--vae-dtype bf16): nothing written")
        return tensor_to_images(img)


def image_to_tensor(img: Image.Image, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1], the VAE's input range."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(a).permute(2, 0, 1)[None]
    return (t * 2 - 1).to(device=device, dtype=dtype)


def tensor_to_images(img: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers does (x·255, round)."""
    a = (img.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    a = (a * 255).round().astype("uint8")
    return [Image.fromarray(x) for x in a]
