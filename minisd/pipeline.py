"""Text -> image and image -> image with classifier-free guidance.

The loop is the one every Stable Diffusion sampler shares:

    x_T ~ N(0, I) · init_noise_sigma                 (drawn with a CPU generator: same seed, same image
    for t in timesteps:                                as diffusers, whatever the device)
        ε_u, ε_c = UNet(x_t, t, c_neg), UNet(x_t, t, c)
        ε = ε_u + s·(ε_c − ε_u)                       classifier-free guidance, Ho & Salimans 2022, Eq. 6
        x_{t-1} = sampler.step(ε, t, x_t)
    image = VAE.decode(x_0 / scale_factor)

With `cuda_graph=True` the UNet call is replayed from a CUDA graph (minisd/graphs.py): the loop does the same
arithmetic with the same kernels, only their launches are recorded once instead of issued one by one from Python.

Shapes: B=batch, T=77 tokens, D=text width, h,w = latent size = image size / vae_scale.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .perf.graphs import CudaGraph
from .model import StableDiffusion
from .samplers import make_sampler
from .unet import sdxl_vector_cond


class UNetGraphs:
    """unet(x, t, context, y=None), each call replayed from a CUDA graph; one graph per input signature (shape and
    dtype of x, t and context; y given or not, and its shape), so calls of the sizes seen before reuse their
    recording. Per signature the first call runs eagerly (cuDNN / cuBLAS pick their algorithms), the second records
    and replays, every later one copies its inputs in and replays. Used by Pipeline(cuda_graph=True) and by the
    minisd sampling benchmark (bench/sampling.py).

    Each graph keeps a private memory pool of about one UNet forward's activations (plus its input buffers) until
    `clear()` or until this object goes. The recording fixes everything Python decided during it: after swapping
    modules, rebinding parameters (`p.data = ...`) or changing Python-side settings the UNet reads (a LoRA scale),
    call `clear()`. Weights updated in place (`load_state_dict`, `copy_`) are seen by the next replay."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.graphs: dict[tuple, CudaGraph] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in (x, t, context, y))
        graph = self.graphs.get(key)
        if graph is None:
            # one eager warm-up call is enough for inference (no autograd state to initialise)
            graph = self.graphs[key] = CudaGraph(self._forward, warmup=1)
        # CudaGraph's buffers, streams and recording use the current CUDA device: make it x's (cuda:1 too)
        with torch.cuda.device(x.get_device()):                      # -1 (a CPU tensor): no switch
            return graph(x, t, context, y)

    def _forward(self, x, t, context, y):
        return self.unet(x, t, context, y=y)

    def clear(self) -> None:
        """Drop every recording and its memory pool."""
        self.graphs.clear()


class Pipeline:
    """Text -> image (and image -> image) with a StableDiffusion model; `pipe(prompt, ...)` returns PIL images.

    cuda_graph: replay the UNet call of the denoising loop from a CUDA graph (UNetGraphs above). It removes the
    Python and launch overhead of the UNet's several thousand small kernels, which dominates for small batches,
    small images and many steps (SD1.5, 512 px, batch 1 on an H100: 31.5 -> 76.7 UNet it/s, bench/NOTES.md); large
    SDXL images gain less, their kernels are long already. Same kernels, same order: the images do not change.
    Costs: the first call of each size (batch, width x height, guidance on/off) runs one step eagerly and records
    at the second, which takes about one extra step; each recorded size keeps a private memory pool of about one
    UNet forward's activations while the pipeline lives (`pipe.graphs.clear()` frees them). CUDA devices only.

    compile: torch.compile each UNet block (`UNetModel.compile_blocks`): fuses the elementwise work around the
    matmuls and convolutions (a fifth of SDXL's GPU time), on top of cuda_graph. The first image compiles."""

    def __init__(self, model: StableDiffusion, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cast: bool = True, cuda_graph: bool = False,
                 compile: bool = False):
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, not {str(device)!r}")
        self.model = model.eval().to(device)
        if compile:  # each UNet block through torch.compile (UNetModel.compile_blocks); compiles on first use
            self.model.unet.compile_blocks()
        self.device, self.dtype = torch.device(device), dtype
        self.graphs = UNetGraphs(self.model.unet) if cuda_graph else None
        if not cast:
            # the caller's dtypes stay as they are (a trainer: frozen base in bf16, adapters in fp32, which a
            # cast would round); `dtype` is then only the UNet input dtype
            self.vae_dtype = next(model.vae.parameters()).dtype
            return
        # The UNet and text encoders run in `dtype`; the VAE stays fp32 when its config asks for it
        # (the SDXL VAE overflows in fp16 and decodes black images).
        self.model.unet.to(dtype)
        for te in self.model.text_encoders:
            te.to(dtype)
        self.vae_dtype = torch.float32 if model.cfg.vae.force_upcast else dtype
        self.model.vae.to(self.vae_dtype)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], chunks: int | None = None):
        """Prompts -> (context (B,T,D) for cross-attention, pooled (B,P) or None for SDXL).

        Prompts longer than 75 tokens are read the A1111 way with CLIP: in chunks of 75 tokens, each wrapped and
        padded to 77 and encoded on its own, the hidden states concatenated (T = 77 · chunks; the UNet's
        cross-attention takes any T), pooled from the first chunk. A prompt up to 75 tokens is one chunk, exactly
        what diffusers encodes. `chunks`: the number to use (conditioning() makes prompt and negative agree)."""
        hidden, pooled = [], None
        for tok, te in zip(self.model.tokenizers, self.model.text_encoders):
            if hasattr(tok, "chunk_ids"):
                ids = tok.chunk_ids(prompts, chunks).to(self.device)   # (B, chunks, 77)
            else:  # BERT (LDM): one window; the rest is cut (sample.py warns)
                ids = tok(prompts).to(self.device)[:, None]             # (B, 1, T)
            hs, p = [], None
            for c in range(ids.shape[1]):
                out = te(ids[:, c])
                h, pc = out if isinstance(out, tuple) else (out, None)
                hs.append(h)
                p = pc if c == 0 else p                                 # pooled of the first chunk (A1111)
            pooled = p if p is not None else pooled                     # SDXL: pooled of the last encoder
            hidden.append(torch.cat(hs, dim=1))                          # (B, 77 · chunks, D)
        return torch.cat(hidden, dim=-1), pooled                     # SDXL: (B, T, 768 + 1280)

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
                 progress: bool = False) -> list[Image.Image]:
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

        unet = m.unet if self.graphs is None else self.graphs
        timesteps = smp.timesteps
        loop = range(start, len(timesteps))
        if progress:
            from tqdm import tqdm
            loop = tqdm(loop, desc="sampling", unit="step")
        for i in loop:
            t = timesteps[i]
            xin = smp.scale_model_input(x, i)
            xin = torch.cat([xin, xin]) if guidance else xin                # (2B, C, h, w)
            # Timesteps stay fp32: in bf16, t = 999 would round to 1000.
            tt = torch.full((len(xin),), float(t), device=self.device)
            eps = unet(xin.to(self.dtype), tt, ctx, y=y).float()
            if guidance:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            x = smp.step(eps, i, x, generator=gen)
        return self.decode(x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        img = self.model.vae.decode((latents / self.model.cfg.vae.scale_factor).to(self.vae_dtype))
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
